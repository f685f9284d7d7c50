"""Helpers for tests that run the real proxy process on loopback.

Everything here is bounded: every wait has a deadline, every server thread
is a daemon and stops with its test.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, ContextManager

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .e2e import netns

REPO_ROOT = Path(__file__).resolve().parents[1]


def skip_unless_possible(reason: str | None, what: str) -> None:
    """Skip a test that cannot run on this machine, naming why; under CI=true fail instead.

    CI runs as root with namespaces and iptables, so a skip there would only
    hide a missing install step.
    """
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {what} can't run: {reason}")
    pytest.skip(reason)


def require_netns() -> None:
    skip_unless_possible(netns.unavailable_reason(), "the network-namespace tests")


def require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    skip_unless_possible(f"needs {', '.join(missing)}" if missing else None, "these tests")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def relay_config(backend_port: int, **listener_extra) -> dict:
    """A config with one plain relay listener in front of ``backend_port``."""
    return {
        "version": 1,
        "node": {"id": "test"},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"relay": {"address": "127.0.0.1", "port": free_port(), "protocol": "tcp",
                                "routes": "main", **listener_extra}},
        "clusters": {"backend": {"endpoints": [f"127.0.0.1:{backend_port}"], "connect_timeout": "1s"}},
        "route_tables": {"main": [{"match": {}, "cluster": "backend"}]},
    }


def terminate(proc: subprocess.Popen, timeout: float, what: str, log: Callable[[], str]) -> int:
    """SIGTERM and wait; the exit code. A process that outlives ``timeout`` is killed and fails the test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"{what} did not exit within {timeout}s of SIGTERM:\n{log()}") from None
    return proc.returncode


def stop_all(proxies: list["Proxy"], log_tail: int = 6000) -> list[str]:
    """Stop each proxy; what went wrong: a hang, a non-zero exit, a traceback in its log."""
    failures = []
    for proxy in proxies:
        name = proxy.log_path.parent.name
        try:
            code = proxy.stop()
        except AssertionError as exc:
            failures.append(str(exc))
            continue
        if code != 0:
            failures.append(f"{name} exited with {code} after SIGTERM; log:\n{proxy.log()[-log_tail:]}")
        if "Traceback" in proxy.log():
            failures.append(f"a traceback in {name}'s log:\n{proxy.log()[-log_tail:]}")
    return failures


class Proxy:
    """``python -m sidecar_proxy run`` as a child process, with an admin client.

    ``wrap`` rewrites the command line (e.g. to run it inside a network
    namespace or as another group) and ``enter`` is a context manager factory
    entered around every admin request (e.g. that namespace).
    """

    def __init__(self, config: dict, tmp_path: Path, drain_time_s: float = 2.0, extra_args=(), *,
                 wrap: Callable[[list[str]], list[str]] | None = None,
                 enter: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.config = config
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.path = tmp_path / "proxy.yaml"
        self.write_config(config)
        self.log_path = tmp_path / "proxy.log"
        self._log = open(self.log_path, "wb")
        argv = [sys.executable, "-m", "sidecar_proxy", "run", "--config", str(self.path), "--log-level", "debug",
                "--drain-time-s", str(drain_time_s), *extra_args]
        self.proc = subprocess.Popen(wrap(argv) if wrap else argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.drain_time_s = drain_time_s
        self._enter = enter
        self.admin = (config["admin"]["address"], config["admin"]["port"])

    def write_config(self, config: dict) -> None:
        if isinstance(config, dict) and "telemetry" not in config:
            # Tests run many proxies on one host: the default scrape port (15090) would collide, and
            # an access-log line per request would bury the log a failing test prints.
            config = {**config, "telemetry": {"metrics": {"port": 0}, "access_log": {"enabled": False}}}
        self.path.write_text(yaml.safe_dump(config))

    def port(self, listener: str = "relay") -> int:
        return self.config["listeners"][listener]["port"]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> "Proxy":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode} before ready:\n{self.log()}")
            try:
                return self.get("/ready")[0] == 200
            except (OSError, http.client.HTTPException):
                return False
        try:
            wait_for(ready, timeout, 0.05, "proxy /ready")
        except AssertionError:
            self.kill()
            raise AssertionError(f"proxy not ready within {timeout}s; log:\n{self.log()}") from None
        return self

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes, dict]:
        conn = http.client.HTTPConnection(*self.admin, timeout=5)
        with self._enter():  # the socket belongs to the namespace it is made in
            conn.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        status, body, _ = self.request("GET", path)
        return status, body

    def post_config(self, config: dict | str) -> tuple[int, dict]:
        body = config if isinstance(config, str) else json.dumps(config)
        status, data, _ = self.request("POST", "/config", body.encode())
        return status, json.loads(data)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted label items): value}, parsed by prometheus-client's parser."""
        status, body = self.get("/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels) -> float:
        """The sample's value; 0 when absent (a counter nothing has incremented)."""
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_for_metric(self, name: str, at_least: float, timeout: float = 5.0, **labels) -> float:
        """Poll until the sample reaches ``at_least``; return its last value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def connections(self) -> list[dict]:
        status, body = self.get("/connections")
        assert status == 200
        return json.loads(body)["connections"]

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM; the exit code. Fails if it outlives the drain time plus a grace period."""
        code = terminate(self.proc, self.drain_time_s + 10 if timeout is None else timeout, "proxy", self.log)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


class ThreadedServer:
    """A TCP server on loopback running ``handler(conn)`` per connection in a thread."""

    def __init__(self, handler, host: str = "127.0.0.1", backlog: int = 128) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.results: list = []
        self.errors: list[BaseException] = []
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            result = self.handler(conn)
            if result is not None:
                self.results.append(result)
        except BaseException as exc:  # recorded for the test to inspect
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def pattern(size: int, seed: int) -> bytes:
    """Deterministic, non-repeating-looking bytes so a reordering would be caught."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    chunks = []
    total = 0
    while limit is None or total < limit:
        data = sock.recv(1 << 20)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def round_trip_upper(sock: socket.socket, payload: bytes) -> None:
    """Send to an upper-casing server (tests/e2e/conftest.UpperServer) and check the answer."""
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload.upper()


class ControlPlane:
    """``sidecar-proxy control-server`` over a resource directory; can be killed and restarted on its port."""

    def __init__(self, directory: Path, logdir: Path, *, poll_interval: float = 0.05,
                 max_wait: float = 1.0) -> None:
        self.directory = directory
        self.logdir = logdir
        self.poll_interval, self.max_wait = poll_interval, max_wait
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.log_paths: list[Path] = []
        self._log = None

    def start(self) -> "ControlPlane":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        path = self.logdir / f"control-{self.runs}.log"
        self.log_paths.append(path)
        self._log = open(path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar_proxy", "control-server", "--dir", str(self.directory),
             "--port", str(self.port), "--max-wait-s", str(self.max_wait),
             "--poll-interval-s", str(self.poll_interval), "--log-level", "debug"],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

        def live():
            if self.proc.poll() is not None:
                raise AssertionError(f"control server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.request("GET", "/live")[0] == 200
            except OSError:
                return False
        wait_for(live, 10, 0.02, "control server /live")
        return self

    def log(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace") for p in self.log_paths if p.exists())

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 5) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def status(self) -> dict:
        status, body = self.request("GET", "/status")
        assert status == 200, body
        return json.loads(body)

    def node_type(self, kind: str, node: str) -> dict:
        return self.status()["nodes"].get(node, {}).get("types", {}).get(kind, {})

    def kill(self) -> None:
        """SIGKILL: no goodbye to the held polls."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self._log is not None:
            self._log.close()

    def stop(self, timeout: float = 5) -> int | None:
        if self.proc is None:
            return None
        code = terminate(self.proc, timeout, "control server", self.log)
        if self._log is not None:
            self._log.close()
        return code

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
        timeout = self.drain_time_s + 10 if timeout is None else timeout
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"proxy did not exit within {timeout}s of SIGTERM:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

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

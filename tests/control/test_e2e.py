"""The control plane end to end: real control server, real proxy, real traffic, on loopback.

``sidecar-proxy control-server`` serves listeners, routes, clusters and
endpoints from a directory; ``sidecar-proxy run`` starts from a bootstrap
that only says who it is, where its admin endpoint is and where the control
server is, and gets everything else from there. Backends are small threaded
HTTP/1.1 keep-alive servers answering every request with their name ("A",
"B"); the proxy relays TCP to them, so wrk and the probes speak HTTP through
it. Resource files are written the way a config tool should: a temporary
file in the same directory, then a rename.

Every wait has a deadline, every process is stopped at teardown (the proxy
must exit 0 after SIGTERM, no log may hold a traceback), and the logs of
everything a test started are printed at teardown, so pytest shows them
with a failed test.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from sidecar_proxy.control.server import version_of

from ..support import ControlPlane, Proxy, ThreadedServer, free_port, require_tools, stop_all, wait_for

pytestmark = pytest.mark.e2e

NODE_ID = "e2e-node"
INITIAL_FETCH_TIMEOUT_S = 2.0
BACKOFF_MAX_S = 0.5
# How long the server holds a poll at the current version before 304.
MAX_WAIT_S = 5.0
# How often the server looks at its files.
POLL_INTERVAL_S = 0.02
PUSH_DEADLINE_S = 1.0
LOG_TAIL_CHARS = 4000


# --- backends ---------------------------------------------------------------------------------------


class HttpBackend:
    """A threaded HTTP/1.1 server answering every request 200 with its name as the body.

    Keep-alive is honoured (``Connection: close`` and HTTP/1.0 close after
    the response); request bodies with a Content-Length are read and dropped.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        body = name.encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
        self._keep = head + b"\r\n" + body
        self._close = head + b"Connection: close\r\n\r\n" + body
        self.requests = 0
        self._lock = threading.Lock()
        self.server = ThreadedServer(self._handle)
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                headers = {}
                for line in lines[1:]:
                    key, _, value = line.partition(b":")
                    headers[key.strip().lower()] = value.strip().lower()
                length = int(headers.get(b"content-length", b"0") or 0)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                close = headers.get(b"connection") == b"close" or lines[0].endswith(b"HTTP/1.0")
                with self._lock:
                    self.requests += 1
                conn.sendall(self._close if close else self._keep)
                if close:
                    return
        except OSError:  # the client went away mid-request (wrk stopping)
            return

    def close(self) -> None:
        self.server.close()


def http_get(port: int, timeout: float = 3.0) -> str:
    """One request on a NEW connection through ``port``; the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200 "), f"bad response through :{port}: {data!r}"
    return body.decode()


class KeepAliveClient:
    """One persistent connection through the proxy, for requests before and after a change."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)

    def get(self) -> str:
        self.conn.request("GET", "/")
        resp = self.conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()

    def close(self) -> None:
        self.conn.close()


class Prober(threading.Thread):
    """A NEW connection through ``port`` every ``interval`` seconds: (monotonic time, body or error)."""

    def __init__(self, port: int, interval: float = 0.02, max_probes: int = 1000) -> None:
        super().__init__(daemon=True)
        self.port, self.interval, self.max_probes = port, interval, max_probes
        self.results: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set() and len(self.results) + len(self.failures) < self.max_probes:
            try:
                body = http_get(self.port)
                self.results.append((time.monotonic(), body))
            except (OSError, AssertionError) as exc:
                self.failures.append((time.monotonic(), repr(exc)))
            self._halt.wait(self.interval)

    def first(self, body: str, after: float) -> float | None:
        return next((t for t, b in list(self.results) if b == body and t >= after), None)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        assert not self.is_alive(), "the prober did not stop"


# --- the control server as a process ----------------------------------------------------------------


# --- resources ----------------------------------------------------------------------------------------


def write_resources(directory: Path, kind: str, resources: list[dict]) -> None:
    """Replace ``<kind>.yaml`` atomically: the server never reads half a file."""
    target = directory / f"{kind}.yaml"
    tmp = directory / f".{kind}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(resources))
    os.replace(tmp, target)


def listener(name: str, port: int, routes: str) -> dict:
    return {"name": name, "address": "127.0.0.1", "port": port, "protocol": "tcp", "routes": routes}


def endpoints(*addresses: str, cluster: str = "app") -> list[dict]:
    return [{"cluster_name": cluster, "endpoints": list(addresses)}]


BAD_ENDPOINTS = endpoints("127.0.0.1:0")


class Stack:
    """Everything one test starts; torn down by the ``stack`` fixture."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.backends: list[HttpBackend] = []
        self.planes: list[ControlPlane] = []
        self.proxies: list[Proxy] = []
        self.procs: list[subprocess.Popen] = []
        self.cleanups: list = []

    def backend(self, name: str) -> HttpBackend:
        b = HttpBackend(name)
        self.backends.append(b)
        return b

    def control_plane(self, endpoint_list: list[dict], *, listen_port: int | None = None,
                      name: str = "resources", **kwargs) -> tuple[ControlPlane, Path, int]:
        """A resource directory (listener ``web`` -> routes ``web-routes`` -> cluster ``app``) and its server.

        Returns the (started) server, the directory and the listener's port.
        """
        directory = self.tmp_path / name
        directory.mkdir()
        port = listen_port or free_port()
        write_resources(directory, "listeners", [listener("web", port, "web-routes")])
        write_resources(directory, "routes", [{"name": "web-routes", "routes": [{"match": {}, "cluster": "app"}]}])
        write_resources(directory, "clusters", [{"name": "app", "connect_timeout": "1s"}])
        write_resources(directory, "endpoints", endpoint_list)
        plane = ControlPlane(directory, self.tmp_path, **{"poll_interval": POLL_INTERVAL_S, "max_wait": MAX_WAIT_S, **kwargs})
        self.planes.append(plane)
        return plane.start(), directory, port

    def bootstrap(self, server_url: str, cache: Path, **static) -> dict:
        return {"version": 1, "node": {"id": NODE_ID},
                "admin": {"address": "127.0.0.1", "port": free_port()},
                "control": {"server": server_url, "cache": str(cache),
                            "initial_fetch_timeout": f"{INITIAL_FETCH_TIMEOUT_S:g}s",
                            "backoff_max": f"{int(BACKOFF_MAX_S * 1000)}ms"},
                **static}

    def proxy(self, config: dict, wait: bool = True) -> Proxy:
        proxy = Proxy(config, self.tmp_path / f"proxy-{len(self.proxies)}")
        self.proxies.append(proxy)
        return proxy.wait_ready() if wait else proxy

    def logs(self) -> str:
        parts = [f"=== {p.log_path.parent.name} log (tail)\n{p.log()[-LOG_TAIL_CHARS:]}" for p in self.proxies]
        parts += [f"=== control server log (tail)\n{c.log()[-LOG_TAIL_CHARS:]}" for c in self.planes]
        return "\n".join(parts)


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    print(s.logs())  # shown by pytest only when the test failed
    failures = []
    for cleanup in reversed(s.cleanups):
        with contextlib.suppress(Exception):
            cleanup()
    for proc in s.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    failures += stop_all(s.proxies)
    for plane in s.planes:
        try:
            plane.stop()
        except AssertionError as exc:
            failures.append(str(exc))
        if "Traceback" in plane.log():
            failures.append("a traceback in the control server's log")
    for backend in s.backends:
        backend.close()
    if failures:
        pytest.fail("\n".join(failures))


# --- admin helpers ----------------------------------------------------------------------------------------


def config_dump(proxy: Proxy) -> dict:
    status, body = proxy.get("/config_dump")
    assert status == 200, body
    return json.loads(body)


def live_endpoints(proxy: Proxy, cluster: str = "app") -> list:
    live = config_dump(proxy)["live"]
    return [e if isinstance(e, str) else e["address"] for e in live["config"]["clusters"][cluster]["endpoints"]]


def endpoints_version(proxy: Proxy) -> str | None:
    return config_dump(proxy)["live"]["resource_versions"].get("endpoints")


def wait_endpoints_version(proxy: Proxy, version: str, timeout: float = 5.0, what: str = "") -> None:
    wait_for(lambda: endpoints_version(proxy) == version, timeout, 0.02,
             what or f"live endpoints version {version}")


def metric_sum(proxy: Proxy, name: str) -> float:
    return sum(v for (n, _), v in proxy.metrics().items() if n == name)


# --- 1. a push while wrk runs ---------------------------------------------------------------------------

WRK_SCRIPT = r"""
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) a = 0; b = 0; other = 0 end
function response(status, headers, body)
  if body == "A" then a = a + 1 elseif body == "B" then b = b + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, b, other = 0, 0, 0
  for _, t in ipairs(threads) do a = a + t:get("a"); b = b + t:get("b"); other = other + t:get("other") end
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "connect": %d, "read": %d, "write": %d, "status": %d, '
    .. '"timeout": %d, "a": %d, "b": %d, "other": %d}\n', summary.requests, e.connect, e.read, e.write,
    e.status, e.timeout, a, b, other))
end
"""


def test_push_changes_routing_within_a_second_while_wrk_runs(stack, tmp_path):
    require_tools("wrk")
    a, b = stack.backend("A"), stack.backend("B")
    # The server's default file polling (0.2 s): the latency a default deployment gets.
    plane, directory, port = stack.control_plane(endpoints(a.address), poll_interval=0.2)
    proxy = stack.proxy(stack.bootstrap(plane.url, tmp_path / "cache.json"))
    assert http_get(port) == "A"
    before = config_dump(proxy)["live"]
    assert before["source"] == "control" and before["resource_versions"]["endpoints"] == version_of(
        endpoints(a.address))

    script = tmp_path / "count.lua"
    script.write_text(WRK_SCRIPT)
    wrk = subprocess.Popen(["wrk", "-t1", "-c10", "-d4s", "--timeout", "2s", "-s", str(script),
                            f"http://127.0.0.1:{port}/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stack.procs.append(wrk)
    prober = Prober(port, interval=0.02, max_probes=400)
    prober.start()
    stack.cleanups.append(prober.stop)
    time.sleep(1.0)  # wrk's keep-alive connections are established on A and busy
    assert wrk.poll() is None, wrk.stdout.read()

    write_resources(directory, "endpoints", endpoints(b.address))
    written = time.monotonic()
    wait_for(lambda: prober.first("B", written), 3, 0.01, "a probe answered by B")
    latency = prober.first("B", written) - written
    out, _ = wrk.communicate(timeout=15)
    prober.stop()
    print(f"push latency, file write -> first new connection answered by B: {latency * 1000:.0f} ms")
    print(out)

    assert latency < PUSH_DEADLINE_S, f"B answered {latency:.3f}s after the write"
    assert prober.failures == [], prober.failures
    after = [body for t, body in prober.results if t >= written + latency]
    assert after and set(after) == {"B"}, "a new connection went to A after the switch"
    assert wrk.returncode == 0, out
    assert "Socket errors" not in out and "Non-2xx" not in out, out
    match = re.search(r"^WRK_JSON (\{.*\})$", out, re.M)
    assert match, out
    result = json.loads(match.group(1))
    assert result["requests"] > 1000, result
    assert {k: result[k] for k in ("connect", "read", "write", "status", "timeout", "other")} == dict.fromkeys(
        ("connect", "read", "write", "status", "timeout", "other"), 0), result
    # Keep-alive connections keep the snapshot they were accepted under: wrk's stay on A.
    assert result["a"] > 0
    live = config_dump(proxy)
    assert live["live"]["resource_versions"]["endpoints"] == version_of(endpoints(b.address))
    assert live["control"]["types"]["endpoints"]["last_nack"] is None
    assert proxy.metric("sidecar_control_updates_total", type="endpoints", result="nack") == 0


# --- 2. an invalid push ----------------------------------------------------------------------------------


def test_invalid_push_is_nacked_and_traffic_stays_on_the_old_version(stack, tmp_path):
    a, b = stack.backend("A"), stack.backend("B")
    plane, directory, port = stack.control_plane(endpoints(a.address))
    proxy = stack.proxy(stack.bootstrap(plane.url, tmp_path / "cache.json"))
    keep_alive = KeepAliveClient(port)
    stack.cleanups.append(keep_alive.close)
    assert keep_alive.get() == "A"
    before = config_dump(proxy)["live"]
    good = version_of(endpoints(a.address))
    bad = version_of(BAD_ENDPOINTS)
    assert before["resource_versions"]["endpoints"] == good

    write_resources(directory, "endpoints", BAD_ENDPOINTS)
    nack = wait_for(lambda: config_dump(proxy)["control"]["types"]["endpoints"]["last_nack"], 5, 0.02,
                    "the NACK on /config_dump")
    assert nack["version"] == bad
    assert "clusters.app.endpoints[0]" in nack["error"] and "port must be 1..65535" in nack["error"], nack
    assert nack["at"] > 0
    # The server heard it: the NACK, its error and the version it rejects.
    server_side = wait_for(lambda: plane.node_type("endpoints", NODE_ID).get("nacked"), 3, 0.02, "the NACK on /status")
    assert server_side["version"] == bad and server_side["error"] == nack["error"], server_side
    assert plane.node_type("endpoints", NODE_ID)["acked"] == good
    # The proxy keeps what it had, all of it.
    dump = config_dump(proxy)
    assert dump["live"]["version"] == before["version"]
    assert dump["live"]["resource_versions"] == before["resource_versions"]
    assert dump["control"]["types"]["endpoints"]["version"] == good
    assert dump["control"]["connected"] is True
    assert proxy.metric("sidecar_control_updates_total", type="endpoints", result="nack") >= 1
    assert proxy.get("/ready")[0] == 200
    for _ in range(5):
        assert http_get(port) == "A"
    assert keep_alive.get() == "A"
    # A rejected version is not re-sent in a loop: one NACK, then the server waits for the files.
    time.sleep(0.5)
    assert proxy.metric("sidecar_control_updates_total", type="endpoints", result="nack") == 1

    # The next good push is applied.
    write_resources(directory, "endpoints", endpoints(b.address))
    wait_endpoints_version(proxy, version_of(endpoints(b.address)))
    assert http_get(port) == "B"
    wait_for(lambda: plane.node_type("endpoints", NODE_ID).get("acked") == version_of(endpoints(b.address)), 3, 0.02,
             "the ACK of B on /status")


# --- 3. the control server dies and comes back ---------------------------------------------------------


def test_control_server_killed_traffic_continues_and_it_reconnects(stack, tmp_path):
    a, b = stack.backend("A"), stack.backend("B")
    plane, directory, port = stack.control_plane(endpoints(a.address))
    proxy = stack.proxy(stack.bootstrap(plane.url, tmp_path / "cache.json"))
    assert proxy.wait_for_metric("sidecar_control_connected", 1, timeout=3) == 1
    keep_alive = KeepAliveClient(port)
    stack.cleanups.append(keep_alive.close)
    assert keep_alive.get() == "A"
    version = config_dump(proxy)["live"]["version"]

    plane.kill()
    killed = time.monotonic()
    wait_for(lambda: proxy.metric("sidecar_control_connected") == 0, 3, 0.02, "sidecar_control_connected 0")
    wait_for(lambda: proxy.metric("sidecar_control_errors_total", type="endpoints") >= 1, 3, 0.05,
             "a control error counted")
    dump = config_dump(proxy)
    assert dump["control"]["connected"] is False
    assert dump["live"]["version"] == version
    assert proxy.get("/ready")[0] == 200
    age_1 = proxy.metric("sidecar_config_age_seconds")
    for _ in range(10):  # a second of traffic while the server is away
        assert http_get(port) == "A"
        time.sleep(0.1)
    assert keep_alive.get() == "A"
    age_2 = proxy.metric("sidecar_config_age_seconds")
    assert age_2 - age_1 >= 0.9, (age_1, age_2)
    assert age_2 >= time.monotonic() - killed - 0.1

    plane.start()  # same port, same files
    restarted = time.monotonic()
    wait_for(lambda: proxy.metric("sidecar_control_connected") == 1, 3, 0.02, "sidecar_control_connected 1")
    reconnect = time.monotonic() - restarted
    print(f"reconnected {reconnect * 1000:.0f} ms after the restart")
    assert config_dump(proxy)["control"]["connected"] is True
    # Unchanged files: nothing is re-applied, and the new server learns what the proxy runs.
    assert config_dump(proxy)["live"]["version"] == version
    wait_for(lambda: plane.node_type("endpoints", NODE_ID).get("acked") == version_of(endpoints(a.address)), 3, 0.02,
             "the restarted server knows the proxy's endpoints version")

    write_resources(directory, "endpoints", endpoints(b.address))
    wait_endpoints_version(proxy, version_of(endpoints(b.address)), timeout=3)
    assert http_get(port) == "B"
    assert keep_alive.get() == "A"  # the old connection kept its snapshot through all of it


# --- 4. start-up from the cache ---------------------------------------------------------------------


def test_start_from_cache_when_the_server_is_down_and_not_ready_without_either(stack, tmp_path):
    a, b = stack.backend("A"), stack.backend("B")
    plane, directory, port = stack.control_plane(endpoints(a.address))
    cache = tmp_path / "cache.json"
    bootstrap = stack.bootstrap(plane.url, cache)
    first = stack.proxy(bootstrap)
    assert http_get(port) == "A"
    versions = config_dump(first)["live"]["resource_versions"]
    wait_for(cache.exists, 3, 0.02, "the cache file")
    # A NACKed push never reaches the cache: it keeps the last good config.
    write_resources(directory, "endpoints", BAD_ENDPOINTS)
    wait_for(lambda: config_dump(first)["control"]["types"]["endpoints"]["last_nack"], 5, 0.02, "the NACK")
    assert first.stop() == 0
    plane.kill()
    assert json.loads(cache.read_text())["versions"] == versions

    # No server, a cache: ready quickly, on the cached config.
    started = time.monotonic()
    second = stack.proxy(bootstrap, wait=False)
    # No server, no cache: never ready, and /ready says why.
    bootstrap_without = stack.bootstrap(plane.url, tmp_path / "no-such-dir" / "cache.json")
    without = stack.proxy(bootstrap_without, wait=False)
    second.wait_ready(10)
    ready_after = time.monotonic() - started
    print(f"ready from the cache {ready_after * 1000:.0f} ms after the start")
    # A refused connection is not waited out: well within initial_fetch_timeout.
    assert ready_after < INITIAL_FETCH_TIMEOUT_S
    dump = config_dump(second)
    assert dump["live"]["source"] == "cache", dump["live"]
    assert dump["live"]["resource_versions"] == versions
    assert dump["control"]["source"] == "cache" and dump["control"]["connected"] is False
    snapshot = dump["live"]["version"]
    assert http_get(port) == "A"
    assert second.metric("sidecar_control_connected") == 0
    assert "serving the cached config" in second.log()

    wait_for(lambda: without.proc.poll() is None and _admin_up(without), 10, 0.05, "the admin endpoint")
    deadline = started + INITIAL_FETCH_TIMEOUT_S + 1.5
    while time.monotonic() < deadline:
        status, body = without.get("/ready")
        assert status == 503, body
        assert without.proc.poll() is None
        time.sleep(0.1)
    status, body = without.get("/ready")
    assert status == 503 and b"control server" in body and b"no cache at" in body, body
    assert config_dump(without)["live"]["source"] == "file"
    assert without.stop() == 0  # it would get the same listener port as ``second``

    # The server comes back with what the cache has: the proxy reconnects and re-applies nothing.
    write_resources(directory, "endpoints", endpoints(a.address))
    plane.start()
    wait_for(lambda: second.metric("sidecar_control_connected") == 1, 3, 0.02, "sidecar_control_connected 1")
    time.sleep(0.2)
    dump = config_dump(second)
    assert (dump["live"]["source"], dump["live"]["version"]) == ("cache", snapshot), dump["live"]
    assert second.metric("sidecar_control_updates_total", type="endpoints", result="ack") == 0
    # Then a change: the cache-started proxy takes it.
    write_resources(directory, "endpoints", endpoints(b.address))
    wait_endpoints_version(second, version_of(endpoints(b.address)), timeout=5)
    assert http_get(port) == "B"
    dump = config_dump(second)
    assert dump["live"]["source"] == "control" and dump["control"]["connected"] is True


# --- 5. a burst of mixed pushes --------------------------------------------------------------------


BURST_WRITES = 1000


def test_a_thousand_mixed_pushes_no_failure_no_leak(stack, tmp_path):
    a, b = stack.backend("A"), stack.backend("B")
    plane, directory, port = stack.control_plane(endpoints(a.address), poll_interval=0.005)
    proxy = stack.proxy(stack.bootstrap(plane.url, tmp_path / "cache.json"))
    assert http_get(port) == "A"
    time.sleep(0.3)
    fds_before = proxy.metric("process_open_fds")
    tasks_before = proxy.metric("sidecar_event_loop_tasks")
    snapshot_before = config_dump(proxy)["live"]["version"]
    variants = [endpoints(a.address), endpoints(b.address), BAD_ENDPOINTS]

    prober = Prober(port, interval=0.001, max_probes=5000)
    prober.start()
    stack.cleanups.append(prober.stop)
    started = time.monotonic()
    for i in range(BURST_WRITES - 2):
        write_resources(directory, "endpoints", variants[i % 3])
        time.sleep(0.002)
    # The last two: a valid one the proxy takes, then an invalid one it must refuse.
    write_resources(directory, "endpoints", endpoints(b.address))
    wait_endpoints_version(proxy, version_of(endpoints(b.address)), timeout=5, what="the last valid push live")
    write_resources(directory, "endpoints", BAD_ENDPOINTS)
    burst = time.monotonic() - started
    wait_for(lambda: (config_dump(proxy)["control"]["types"]["endpoints"]["last_nack"] or {}).get("version")
             == version_of(BAD_ENDPOINTS) and plane.node_type("endpoints", NODE_ID).get("nacked", {}).get("version")
             == version_of(BAD_ENDPOINTS), 5, 0.05, "the last (invalid) push NACKed")
    prober.stop()

    acks = proxy.metric("sidecar_control_updates_total", type="endpoints", result="ack")
    nacks = proxy.metric("sidecar_control_updates_total", type="endpoints", result="nack")
    dump = config_dump(proxy)
    print(f"{BURST_WRITES} writes in {burst:.2f}s; proxy decided {acks:.0f} ACK + {nacks:.0f} NACK, "
          f"snapshots {snapshot_before} -> {dump['live']['version']}; {len(prober.results)} probes")
    assert prober.failures == [], prober.failures[:10]
    assert len(prober.results) >= 50
    assert {body for _, body in prober.results} <= {"A", "B"}
    assert acks > 1 and nacks > 1
    assert dump["live"]["resource_versions"]["endpoints"] == version_of(endpoints(b.address))
    assert live_endpoints(proxy) == [b.address]
    assert dump["control"]["types"]["endpoints"]["version"] == version_of(endpoints(b.address))
    assert dump["control"]["connected"] is True
    assert http_get(port) == "B"

    # Settled: nothing left behind by the burst.
    def settled():
        m = proxy.metrics()
        active = sum(v for (n, _), v in m.items() if n == "sidecar_tcp_connections_active")
        fds = m[("process_open_fds", ())]
        tasks = m[("sidecar_event_loop_tasks", ())]
        return (active == 0 and fds <= fds_before + 5 and tasks <= tasks_before + 5) and (active, fds, tasks)
    try:
        wait_for(settled, 5, 0.1, "connections, descriptors and tasks back to their levels")
    finally:
        m = proxy.metrics()
        print("before: fds", fds_before, "tasks", tasks_before, "; after: fds", m[("process_open_fds", ())],
              "tasks", m[("sidecar_event_loop_tasks", ())], "active",
              sum(v for (n, _), v in m.items() if n == "sidecar_tcp_connections_active"))


# --- 6. static and dynamic together ----------------------------------------------------------------


def test_static_bootstrap_listener_with_dynamic_ones(stack, tmp_path):
    a, b = stack.backend("A"), stack.backend("B")
    plane, directory, port = stack.control_plane(endpoints(a.address))
    static_port = free_port()
    bootstrap = stack.bootstrap(
        plane.url, tmp_path / "cache.json",
        listeners={"static-in": {"address": "127.0.0.1", "port": static_port, "routes": "static-routes"}},
        route_tables={"static-routes": [{"match": {}, "cluster": "static-backend"}]},
        clusters={"static-backend": {"endpoints": [b.address], "connect_timeout": "1s"}})
    proxy = stack.proxy(bootstrap)
    assert http_get(static_port) == "B"
    assert http_get(port) == "A"
    dump = config_dump(proxy)
    assert set(dump["live"]["config"]["listeners"]) == {"static-in", "web"}
    assert set(dump["live"]["config"]["clusters"]) == {"static-backend", "app"}
    assert set(dump["listeners_bound"]) == {"static-in", "web"}
    version = dump["live"]["version"]
    good_listeners = [listener("web", port, "web-routes")]
    good_clusters = [{"name": "app", "connect_timeout": "1s"}]

    # A dynamic listener reusing the static listener's name.
    write_resources(directory, "listeners",
                    good_listeners + [listener("static-in", free_port(), "web-routes")])
    nack = wait_for(lambda: config_dump(proxy)["control"]["types"]["listeners"]["last_nack"], 5, 0.02,
                    "the listeners NACK")
    assert "listeners[1]" in nack["error"] and "'static-in' is also defined statically" in nack["error"], nack
    assert config_dump(proxy)["live"]["version"] == version
    assert http_get(static_port) == "B" and http_get(port) == "A"
    write_resources(directory, "listeners", good_listeners)
    wait_for(lambda: config_dump(proxy)["control"]["types"]["listeners"]["pending_version"] is None, 5, 0.02,
             "the listeners reverted")

    # A dynamic cluster reusing the static cluster's name.
    write_resources(directory, "clusters", good_clusters + [{"name": "static-backend", "connect_timeout": "2s"}])
    nack = wait_for(lambda: config_dump(proxy)["control"]["types"]["clusters"]["last_nack"], 5, 0.02,
                    "the clusters NACK")
    assert "clusters[1]" in nack["error"] and "'static-backend' is also defined statically" in nack["error"], nack
    dump = config_dump(proxy)
    assert dump["live"]["config"]["clusters"]["static-backend"]["connect_timeout"] == "1s"
    assert http_get(static_port) == "B" and http_get(port) == "A"
    assert plane.node_type("clusters", NODE_ID)["nacked"]["error"] == nack["error"]

    # A dynamic change still applies next to the static part.
    write_resources(directory, "clusters", good_clusters)
    write_resources(directory, "endpoints", endpoints(b.address))
    wait_endpoints_version(proxy, version_of(endpoints(b.address)))
    assert http_get(port) == "B" and http_get(static_port) == "B"
    assert set(config_dump(proxy)["live"]["config"]["listeners"]) == {"static-in", "web"}


# --- 7. the readiness gauge ------------------------------------------------------------------------


def test_ready_gauge_agrees_with_the_ready_endpoint(stack, tmp_path):
    """``sidecar_ready`` is "1 when /ready answers 200": also while waiting for the control server."""
    a = stack.backend("A")
    plane, directory, port = stack.control_plane(endpoints(a.address))
    plane.kill()
    proxy = stack.proxy(stack.bootstrap(plane.url, tmp_path / "cache.json"), wait=False)
    wait_for(lambda: proxy.proc.poll() is None and _admin_up(proxy), 10, 0.05, "the admin endpoint")
    time.sleep(INITIAL_FETCH_TIMEOUT_S + 0.3)  # past the cache fallback, which finds no cache
    waiting = (proxy.get("/ready")[0], proxy.metric("sidecar_ready"))
    plane.start()
    proxy.wait_ready(5)
    assert http_get(port) == "A"
    serving = (proxy.get("/ready")[0], proxy.metric("sidecar_ready"))
    assert (waiting, serving) == ((503, 0), (200, 1)), \
        f"(/ready status, sidecar_ready) while waiting: {waiting}, once serving: {serving}"


def _admin_up(proxy: Proxy) -> bool:
    try:
        proxy.get("/live")
        return True
    except OSError:
        return False

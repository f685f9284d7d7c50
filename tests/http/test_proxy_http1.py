"""The HTTP/1.1 L7 path end to end: the real proxy process, real clients, real origin servers.

Every test runs once per codec (``http: {codec: h11 | httptools}`` on the
listener). Clients are curl, http.client, raw sockets and the ``websockets``
package; origins are h11 servers in threads (``Upstream``) that record what
reached them and count the connections they accepted, so keep-alive and
pooling are observed where they happen rather than inferred.

Most routing tests share one proxy per codec (``world``); tests that need an
origin with particular manners (slow, closing idle connections, WebSocket,
server-first) start their own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import random
import socket
import subprocess
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Callable, Iterable

import h11
import pytest

from ..support import Proxy, free_port, pattern, recv_exactly, require_tools, stop_all, wait_for

pytestmark = pytest.mark.e2e

CODECS = ["h11", "httptools"]
RAW_WINDOW = 256 * 1024
LOG_TAIL = 6000
MiB = 1 << 20


# ----------------------------------------------------------------------------- origin servers


@dataclasses.dataclass
class Seen:
    """One request as an origin received it."""

    conn: int                     # index of the accepted connection it came on (0-based)
    peer: tuple
    method: str
    target: str
    http_version: str
    headers: list[tuple[str, str]]  # names lower-case (h11 lower-cases them)
    body: bytes | None            # None when longer than Upstream.keep_body
    body_len: int
    body_sha256: str

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def value(self, name: str) -> str | None:
        values = self.values(name)
        return ", ".join(values) if values else None

    def as_json(self, upstream: str) -> dict:
        return {"upstream": upstream, "conn": self.conn, "method": self.method, "target": self.target,
                "http_version": self.http_version, "headers": self.headers, "body_len": self.body_len,
                "body_sha256": self.body_sha256}


@dataclasses.dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | Iterable[bytes] = b""


Respond = Callable[["Upstream", Seen], Reply]


def default_respond(upstream: "Upstream", seen: Seen) -> Reply:
    """``*/echo`` echoes the body; ``*/chunked`` answers chunked; anything else describes the request as JSON."""
    path = seen.target.split("?", 1)[0]
    common = [("x-upstream", upstream.name), ("x-secret", "s3cr3t"), ("x-upstream-says", "original")]
    if path.endswith("/echo"):
        return Reply(200, [("content-type", "application/octet-stream"),
                           ("content-length", str(seen.body_len)), *common], seen.body or b"")
    if path.endswith("/chunked"):
        return Reply(200, [("content-type", "text/plain"), *common], [b"chunk-one\n", b"chunk-two\n", b"end\n"])
    body = json.dumps(seen.as_json(upstream.name)).encode()
    return Reply(200, [("content-type", "application/json"), ("content-length", str(len(body))), *common], body)


class Upstream:
    """An HTTP/1.1 origin (h11) on loopback, a thread per connection.

    ``idle_close``: close a connection that has been idle between requests
    this long (Node's keepAliveTimeout, without a Keep-Alive header to warn
    the client). ``read_delay``: sleep this long after each 64 KiB read of a
    request body (a slow reader).
    """

    def __init__(self, name: str, respond: Respond = default_respond, *, idle_close: float | None = None,
                 read_delay: float = 0.0, keep_body: int = 4 * MiB) -> None:
        self.name = name
        self.respond = respond
        self.idle_close = idle_close
        self.read_delay = read_delay
        self.keep_body = keep_body
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.accepted = 0
        self.requests: list[Seen] = []
        self.raw: dict[int, bytearray] = {}   # the last RAW_WINDOW bytes received per connection
        self.errors: list[BaseException] = []
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                index = self.accepted
                self.accepted += 1
                self.raw[index] = bytearray()
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, peer, index), daemon=True).start()

    def _recv(self, conn: socket.socket, index: int) -> bytes:
        data = conn.recv(65536)
        raw = self.raw[index]
        raw += data
        del raw[:-RAW_WINDOW]
        return data

    def _next_event(self, h: h11.Connection, conn: socket.socket, index: int):
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            if h.they_are_waiting_for_100_continue:
                conn.sendall(h.send(h11.InformationalResponse(status_code=100, headers=[])))
            between_requests = h.their_state is h11.IDLE
            conn.settimeout(self.idle_close if between_requests and self.idle_close else 30)
            try:
                data = self._recv(conn, index)
            except TimeoutError:
                if between_requests:
                    return None  # idle: close, as a keep-alive timeout does
                raise
            if data and h.their_state is h11.SEND_BODY and self.read_delay:
                time.sleep(self.read_delay)
            h.receive_data(data)

    def _serve(self, conn: socket.socket, peer, index: int) -> None:
        h = h11.Connection(h11.SERVER)
        try:
            while True:
                event = self._next_event(h, conn, index)
                if event is None or isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                seen = self._read_request(h, conn, index, event, peer)
                with self.lock:
                    self.requests.append(seen)
                self._send(h, conn, seen, self.respond(self, seen))
                if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()
        except (OSError, h11.ProtocolError):
            pass  # the proxy went away or closed the connection: its business
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _read_request(self, h, conn, index, request: h11.Request, peer) -> Seen:
        digest = hashlib.sha256()
        kept = bytearray()
        length = 0
        while True:
            event = self._next_event(h, conn, index)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                length += len(event.data)
                if length <= self.keep_body:
                    kept += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r} in a request body")
        return Seen(index, peer, request.method.decode(), request.target.decode(),
                    request.http_version.decode(),
                    [(k.decode(), v.decode("latin-1")) for k, v in request.headers],
                    bytes(kept) if length <= self.keep_body else None, length, digest.hexdigest())

    @staticmethod
    def _send(h, conn, seen: Seen, reply: Reply) -> None:
        reason = HTTPStatus(reply.status).phrase if reply.status in HTTPStatus._value2member_map_ else ""
        conn.sendall(h.send(h11.Response(status_code=reply.status, headers=reply.headers, reason=reason)))
        if seen.method != "HEAD":
            chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
            for chunk in chunks:
                if chunk:
                    conn.sendall(h.send(h11.Data(data=chunk)))
        conn.sendall(h.send(h11.EndOfMessage()))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


# ----------------------------------------------------------------------------- clients


@dataclasses.dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    def json(self) -> dict:
        return json.loads(self.body)


def request(port: int, method: str, target: str, headers: dict | None = None, body: bytes | None = None,
            timeout: float = 10, conn: http.client.HTTPConnection | None = None) -> Answer:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, resp.getheaders(), resp.read())
    finally:
        if own:
            conn.close()


def get(port: int, target: str, host: str | None = None, **headers) -> Answer:
    fields = {k.replace("_", "-"): v for k, v in headers.items()}
    if host is not None:
        fields["Host"] = host
    return request(port, "GET", target, fields)


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """curl, never through an environment proxy; fails the test on a non-zero exit."""
    out = subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout - 5), *args],
                         capture_output=True, timeout=timeout)
    assert out.returncode == 0, f"curl {' '.join(args)} exited {out.returncode}: {out.stderr.decode()}"
    return out


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head (without the blank line) and the bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed inside a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A Content-Length-framed response from a raw socket."""
    head, rest = read_head(sock)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    length = int(fields.get("content-length", "0"))
    body = rest + recv_exactly(sock, length - len(rest)) if length > len(rest) else rest[:length]
    return status, fields, body


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class RssWatch:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` in KiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss_kib(self.pid))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        return self.peak


# ----------------------------------------------------------------------------- configs and fixtures


def http_config(codec: str, clusters: dict[str, int], routes: list[dict], *, protocol: str = "http",
                listener: dict | None = None, http: dict | None = None) -> dict:
    return {
        "version": 1,
        "node": {"id": "http-test"},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"web": {"address": "127.0.0.1", "port": free_port(), "protocol": protocol, "routes": "web",
                              "http": {"codec": codec, **(http or {})}, **(listener or {})}},
        "clusters": {name: {"endpoints": [f"127.0.0.1:{port}"], "connect_timeout": "1s"}
                     for name, port in clusters.items()},
        "route_tables": {"web": routes},
    }


def one_route(codec: str, port: int) -> dict:
    """A plain HTTP listener whose only route sends everything to the origin on ``port``."""
    return http_config(codec, {"origin": port}, [{"match": {"path_prefix": "/"}, "cluster": "origin"}])


@pytest.fixture(scope="module", params=CODECS)
def codec(request) -> str:
    return request.param


class Harness:
    """Proxies and origins of one test (or one module); everything is stopped at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proxies: list[Proxy] = []
        self.closers: list[Callable[[], None]] = []

    def proxy(self, config: dict) -> Proxy:
        proxy = Proxy(config, self.tmp / f"proxy-{len(self.proxies)}")
        self.proxies.append(proxy)
        return proxy.wait_ready()

    def upstream(self, name: str, respond: Respond = default_respond, **options) -> Upstream:
        server = Upstream(name, respond, **options)
        self.closers.append(server.close)
        return server

    def finish(self) -> list[str]:
        for close in self.closers:
            close()
        for proxy in self.proxies:
            # Shown by pytest only when the test failed.
            print(f"--- {proxy.log_path}\n{proxy.log()[-LOG_TAIL:]}")
        return stop_all(self.proxies, LOG_TAIL)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    failures = h.finish()
    if failures:
        pytest.fail("\n\n".join(failures))


# The shared world: two origins that answer with their own name, and a route table exercising every match.
WORLD_ROUTES = [
    {"name": "exact-host", "match": {"host": "exact.example"}, "cluster": "alpha"},
    {"name": "suffix-host", "match": {"host": "*.beta.example"}, "cluster": "beta"},
    {"name": "host-list", "match": {"host": ["one.example", "two.example"]}, "cluster": "beta"},
    {"name": "prefix-a", "match": {"path_prefix": "/a/"}, "cluster": "alpha"},
    {"name": "prefix-b", "match": {"path_prefix": "/b/"}, "cluster": "beta"},
    {"match": {"path": "/method", "method": ["PUT", "DELETE"]}, "cluster": "beta"},
    {"match": {"path": "/method", "method": "GET"}, "cluster": "alpha"},
    {"match": {"path": "/hdr", "headers": [{"name": "x-canary", "exact": "yes"}]}, "cluster": "beta"},
    {"match": {"path": "/hdr", "headers": [{"name": "x-version", "regex": "v2\\.[0-9]+"}]}, "cluster": "beta"},
    {"match": {"path": "/hdr", "headers": [{"name": "x-tier", "prefix": "gold"}]}, "cluster": "beta"},
    {"match": {"path": "/hdr", "headers": [{"name": "x-debug", "present": True}]}, "cluster": "beta"},
    {"match": {"path": "/hdr"}, "cluster": "alpha"},
    {"match": {"path": "/inv", "headers": [{"name": "x-env", "exact": "prod", "invert": True}]}, "cluster": "beta"},
    {"match": {"path": "/inv"}, "cluster": "alpha"},
    {"match": {"path_regex": "/re/[0-9]+"}, "cluster": "beta"},
    {"match": {"path_prefix": "/re/"}, "cluster": "alpha"},
    {"name": "weighted", "match": {"path_prefix": "/weighted"},
     "weighted_clusters": [{"cluster": "alpha", "weight": 50}, {"cluster": "beta", "weight": 50}]},
    {"name": "direct", "match": {"path": "/direct"},
     "direct_response": {"status": 418, "body": "short and stout\n", "content_type": "text/plain"}},
    {"name": "redirect-full", "match": {"path_prefix": "/old"},
     "redirect": {"status": 301, "scheme": "https", "host": "new.example", "port": 8443, "path": "/new",
                  "strip_query": True}},
    {"name": "redirect-host", "match": {"path_prefix": "/moved"}, "redirect": {"status": 302, "host": "other.example"}},
    {"name": "header-edits", "match": {"path_prefix": "/hdrs"}, "cluster": "alpha",
     "request_headers": {"add": {"x-added": "by-proxy"}, "set": {"x-set": "fixed"}, "remove": ["x-remove-me"]},
     "response_headers": {"add": {"x-resp-added": "yes"}, "set": {"x-upstream-says": "overridden"},
                          "remove": ["x-secret"]}},
    {"name": "rewrite", "match": {"path_prefix": "/rewrite"}, "cluster": "alpha", "host_rewrite": "internal.svc"},
    {"name": "curl", "match": {"path_prefix": "/c/"}, "cluster": "alpha"},
]


@dataclasses.dataclass
class World:
    proxy: Proxy
    alpha: Upstream
    beta: Upstream

    @property
    def port(self) -> int:
        return self.proxy.port("web")


@pytest.fixture(scope="module")
def _world(codec, tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp(f"world-{codec}"))
    alpha, beta = h.upstream("alpha"), h.upstream("beta")
    try:
        proxy = h.proxy(http_config(codec, {"alpha": alpha.port, "beta": beta.port}, WORLD_ROUTES))
        yield World(proxy, alpha, beta)
    finally:
        failures = h.finish()
    if failures:
        pytest.fail("\n\n".join(failures))


@pytest.fixture
def world(_world):
    start = len(_world.proxy.log())
    yield _world
    # Printed on teardown: pytest shows it only with a failed test.
    print(f"--- proxy log during this test\n{_world.proxy.log()[start:][-LOG_TAIL:]}")


def routed_to(answer: Answer) -> str:
    assert answer.status == 200, (answer.status, answer.body[:500])
    return answer.header("x-upstream")


# ----------------------------------------------------------------------------- curl as the client


def test_curl_get_is_forwarded_with_proxy_headers(world):
    require_tools("curl")
    url = f"http://127.0.0.1:{world.port}/c/hello?x=1"
    out = curl("-D", "-", "-H", "X-Custom-Header: Mixed", url)
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    seen = json.loads(body)
    assert seen["upstream"] == "alpha"
    assert (seen["method"], seen["target"]) == ("GET", "/c/hello?x=1")
    headers = dict(seen["headers"])
    assert headers["host"] == f"127.0.0.1:{world.port}", "Host is kept without host_rewrite"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers.get("x-request-id"), "x-request-id is generated when absent"
    assert headers["x-custom-header"] == "Mixed"
    # Received names go on as curl wrote them (h11 would lower-case them, so look at the bytes:
    # the head of this body-less request is the last thing its connection carried).
    raw = bytes(world.alpha.raw[seen["conn"]])
    head = raw[raw.rindex(b"GET /c/hello?x=1 "):]
    assert b"\r\nX-Custom-Header: Mixed\r\n" in head, head
    assert b"\r\nx-forwarded-proto: http\r\n" in head, head


def test_curl_post_1mib_is_echoed_byte_exact(world, tmp_path):
    require_tools("curl")
    data = pattern(MiB, seed=1)
    src, dst = tmp_path / "body.bin", tmp_path / "echo.bin"
    src.write_bytes(data)
    out = curl("--data-binary", f"@{src}", "-H", "Content-Type: application/octet-stream", "-o", str(dst),
               "-w", "%{http_code}", f"http://127.0.0.1:{world.port}/c/echo")
    assert out.stdout == b"200"
    assert dst.read_bytes() == data
    seen = world.alpha.requests[-1]
    assert (seen.method, seen.body_len) == ("POST", MiB)
    assert seen.body == data


def test_curl_chunked_upload_is_echoed_byte_exact(world, tmp_path):
    require_tools("curl")
    data = pattern(300_000, seed=2)
    src, dst = tmp_path / "body.bin", tmp_path / "echo.bin"
    src.write_bytes(data)
    out = curl("--data-binary", f"@{src}", "-H", "Transfer-Encoding: chunked", "-o", str(dst),
               "-w", "%{http_code}", f"http://127.0.0.1:{world.port}/c/echo")
    assert out.stdout == b"200"
    assert dst.read_bytes() == data
    seen = world.alpha.requests[-1]
    assert seen.body == data
    # Either framing is fine upstream, but exactly one of them.
    assert (seen.value("transfer-encoding") == "chunked") != (seen.value("content-length") is not None), seen.headers


def test_curl_http10_gets_an_unchunked_body(world):
    require_tools("curl")
    # The origin answers chunked; a 1.0 client must not receive Transfer-Encoding (RFC 9112 6.1).
    out = curl("--http1.0", "--raw", "-D", "-", f"http://127.0.0.1:{world.port}/c/chunked")
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head
    assert b"transfer-encoding" not in head.lower(), head
    assert body == b"chunk-one\nchunk-two\nend\n"
    plain = curl("--http1.0", f"http://127.0.0.1:{world.port}/c/plain")
    assert json.loads(plain.stdout)["upstream"] == "alpha"


def test_curl_head_and_then_get_on_one_connection(world):
    require_tools("curl")
    out = curl("-I", f"http://127.0.0.1:{world.port}/c/head")
    assert out.stdout.startswith(b"HTTP/1.1 200"), out.stdout
    assert b"content-length:" in out.stdout.lower()
    # A HEAD answer has no body even with Content-Length: the next response must parse.
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        head = request(world.port, "HEAD", "/c/head", conn=conn)
        assert head.status == 200 and head.body == b""
        sock = conn.sock
        assert sock is not None, "the HEAD answer came with 'Connection: close'"
        after = request(world.port, "GET", "/c/after-head", conn=conn)
        assert after.json()["target"] == "/c/after-head"
        assert conn.sock is sock, "the connection was replaced"
    finally:
        conn.close()


def test_curl_expect_100_continue(world, tmp_path):
    require_tools("curl")
    data = pattern(256 * 1024, seed=3)
    src, dst = tmp_path / "body.bin", tmp_path / "echo.bin"
    src.write_bytes(data)
    # curl waits this long for "100 Continue" before sending the body anyway: a proxy that swallows
    # the 100 (and sends none itself) shows up as a 5 s request.
    out = curl("--expect100-timeout", "5", "-H", "Expect: 100-continue", "--data-binary", f"@{src}",
               "-o", str(dst), "-w", "%{http_code} %{time_total}", f"http://127.0.0.1:{world.port}/c/echo")
    code, elapsed = out.stdout.decode().split()
    assert code == "200"
    assert dst.read_bytes() == data
    assert float(elapsed) < 3.0, f"took {elapsed}s: no 100 Continue reached curl"


def test_keep_alive_one_downstream_and_one_upstream_connection(harness, codec):
    require_tools("curl")
    origin = harness.upstream("ka")
    proxy = harness.proxy(one_route(codec, origin.port))
    args = []
    for i in range(20):
        args += [f"http://127.0.0.1:{proxy.port('web')}/item/{i}", "-o", "/dev/null"]
    out = curl("-w", "%{num_connects} %{http_code}\n", *args)
    lines = out.stdout.decode().split()
    connects, codes = [int(x) for x in lines[0::2]], lines[1::2]
    assert codes == ["200"] * 20
    assert sum(connects) == 1, f"curl opened {sum(connects)} connections to the proxy for 20 URLs"
    assert [r.target for r in origin.requests] == [f"/item/{i}" for i in range(20)]
    assert origin.accepted == 1, f"the origin accepted {origin.accepted} connections for 20 sequential requests"
    # A new downstream connection per request still reuses the pooled upstream one.
    for i in range(5):
        assert get(proxy.port("web"), f"/fresh/{i}").status == 200
    assert origin.accepted == 1, f"pooled connection not reused: the origin accepted {origin.accepted}"


# ----------------------------------------------------------------------------- routing


def test_host_exact_and_suffix(world):
    assert routed_to(get(world.port, "/x", host="exact.example")) == "alpha"
    assert routed_to(get(world.port, "/x", host="api.beta.example")) == "beta"
    assert routed_to(get(world.port, "/x", host="a.b.beta.example")) == "beta"
    assert routed_to(get(world.port, "/x", host="one.example")) == "beta"
    assert routed_to(get(world.port, "/x", host="two.example")) == "beta"
    # "*.beta.example" needs a label before ".beta.example".
    assert get(world.port, "/x", host="beta.example").status == 404
    assert get(world.port, "/x", host="xbeta.example").status == 404
    assert get(world.port, "/x", host="exact.example.evil").status == 404


def test_host_match_ignores_case_and_port(world):
    # Host names are case-insensitive (RFC 9110 4.2.3) and a port is not part of the name.
    assert routed_to(get(world.port, "/x", host="EXACT.Example")) == "alpha"
    assert routed_to(get(world.port, "/x", host="exact.example:8080")) == "alpha"
    assert routed_to(get(world.port, "/x", host="Api.BETA.example:80")) == "beta"


def test_path_prefix_to_two_clusters(world):
    assert routed_to(get(world.port, "/a/thing", host="h")) == "alpha"
    assert routed_to(get(world.port, "/b/thing?q=/a/", host="h")) == "beta"
    answer = get(world.port, "/b/deep/path?x=1", host="h")
    assert answer.json()["target"] == "/b/deep/path?x=1", "the target is forwarded unchanged"
    assert get(world.port, "/c", host="h").status == 404, "prefix '/c/' does not match '/c'"


def test_path_regex(world):
    assert routed_to(get(world.port, "/re/123", host="h")) == "beta"
    assert routed_to(get(world.port, "/re/abc", host="h")) == "alpha"
    # Like Envoy's safe_regex, the whole path must match: "/re/[0-9]+" is not a prefix test.
    assert routed_to(get(world.port, "/re/123abc", host="h")) == "alpha"


def test_method_match(world):
    for method, expected in (("PUT", "beta"), ("DELETE", "beta"), ("GET", "alpha")):
        assert routed_to(request(world.port, method, "/method", {"Host": "h"})) == expected, method
    assert request(world.port, "POST", "/method", {"Host": "h"}, body=b"x").status == 404


def test_header_match(world):
    def to(**headers):
        return routed_to(get(world.port, "/hdr", host="h", **headers))
    assert to() == "alpha"
    assert to(x_canary="yes") == "beta"
    assert to(x_canary="no") == "alpha"
    assert to(x_version="v2.7") == "beta"
    assert to(x_version="v1.9") == "alpha"
    assert to(x_tier="golden") == "beta"
    assert to(x_tier="silver") == "alpha"
    assert to(x_debug="1") == "beta"
    # invert: matches when the condition does not hold (absent counts as not "prod").
    assert routed_to(get(world.port, "/inv", host="h", x_env="prod")) == "alpha"
    assert routed_to(get(world.port, "/inv", host="h", x_env="dev")) == "beta"
    assert routed_to(get(world.port, "/inv", host="h")) == "beta"


def test_weighted_clusters_split_traffic(world):
    counts = {"alpha": 0, "beta": 0}
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        for i in range(200):
            counts[routed_to(request(world.port, "GET", f"/weighted/{i}", {"Host": "h"}, conn=conn))] += 1
    finally:
        conn.close()
    # Binomial(200, 0.5): 60..140 is more than 5 standard deviations either way.
    assert 60 <= counts["alpha"] <= 140 and counts["alpha"] + counts["beta"] == 200, counts


def test_direct_response(world):
    before = len(world.alpha.requests) + len(world.beta.requests)
    answer = get(world.port, "/direct", host="h")
    assert answer.status == 418
    assert answer.body == b"short and stout\n"
    assert answer.header("content-type").startswith("text/plain")
    assert answer.header("content-length") == str(len(answer.body))
    assert len(world.alpha.requests) + len(world.beta.requests) == before, "an origin was contacted"


def test_redirect(world):
    answer = get(world.port, "/old/page?a=1", host="site.example")
    assert answer.status == 301
    assert answer.header("location") == "https://new.example:8443/new"
    answer = get(world.port, "/moved/here?a=1", host="site.example")
    assert answer.status == 302
    assert answer.header("location") == "http://other.example/moved/here?a=1"


def test_request_and_response_header_edits(world):
    answer = request(world.port, "GET", "/hdrs", {"Host": "h", "x-added": "by-client", "x-set": "client-value",
                                                   "x-remove-me": "1", "x-keep": "k"})
    seen = dict_of_lists(answer.json()["headers"])
    assert seen["x-added"] == ["by-client", "by-proxy"] or seen["x-added"] == ["by-client, by-proxy"], seen
    assert seen["x-set"] == ["fixed"]
    assert "x-remove-me" not in seen
    assert seen["x-keep"] == ["k"]
    assert answer.header("x-resp-added") == "yes"
    assert answer.header("x-upstream-says") == "overridden"
    assert answer.header("x-secret") is None
    assert answer.header("x-upstream") == "alpha"


def dict_of_lists(pairs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name, []).append(value)
    return out


def test_host_rewrite(world):
    seen = get(world.port, "/rewrite/x", host="public.example").json()
    assert dict(seen["headers"])["host"] == "internal.svc"


def test_forwarding_headers_and_hop_by_hop(world):
    answer = request(world.port, "GET", "/a/fwd", {
        "Host": "h", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https", "X-Request-Id": "given-id",
        "Connection": "keep-alive, x-hop", "X-Hop": "1", "Keep-Alive": "timeout=5", "Proxy-Connection": "keep-alive",
        "Upgrade-Insecure-Requests": "1"})
    seen = dict_of_lists(answer.json()["headers"])
    assert ", ".join(seen["x-forwarded-for"]) == "203.0.113.7, 127.0.0.1"
    assert seen["x-forwarded-proto"] == ["https"], "kept when present"
    assert seen["x-request-id"] == ["given-id"], "kept when present"
    # RFC 9110 7.6.1: fields named by Connection MUST go; Proxy-Connection SHOULD.
    for hop in ("x-hop", "keep-alive", "proxy-connection"):
        assert hop not in seen, f"hop-by-hop field {hop} was forwarded: {seen}"
    assert "x-hop" not in ", ".join(seen.get("connection", [])).lower()
    assert seen["upgrade-insecure-requests"] == ["1"], "an end-to-end field that merely looks hop-ish is kept"


def test_request_ids_are_unique(world):
    ids = {dict(get(world.port, f"/a/id/{i}", host="h").json()["headers"])["x-request-id"] for i in range(10)}
    assert len(ids) == 10, ids


def test_no_route_is_404_on_a_plain_listener(world):
    answer = get(world.port, "/nothing-here", host="nowhere.example")
    assert answer.status == 404
    assert get(world.port, "/a/", host="nowhere.example").status == 200


def test_connection_stays_open_after_a_no_route_404(world):
    # A 404 for a request read whole (no body) is an answer, not a broken connection:
    # the next request on it must be served.
    conn = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        assert request(world.port, "GET", "/nothing", {"Host": "n"}, conn=conn).status == 404
        sock = conn.sock
        assert sock is not None, "the 404 came with 'Connection: close'"
        assert routed_to(request(world.port, "GET", "/a/then", {"Host": "n"}, conn=conn)) == "alpha"
        assert conn.sock is sock
    finally:
        conn.close()


# ----------------------------------------------------------------------------- WebSocket and upgrades


@pytest.fixture
def ws_origin():
    from websockets.sync.server import serve

    outcomes: list[str] = []

    def echo(ws):
        from websockets.exceptions import ConnectionClosedOK
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosedOK:
            pass
        outcomes.append(f"closed {ws.close_code}")

    server = serve(echo, "127.0.0.1", 0, max_size=4 * MiB)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1], outcomes
    server.shutdown()
    thread.join(5)


def test_websocket_echo_through_the_proxy(harness, codec, ws_origin):
    from websockets.sync.client import connect

    port, outcomes = ws_origin
    proxy = harness.proxy(one_route(codec, port))
    sizes = [0, 1, 2, 125, 126, 127, 1000, 4096, 65535, 65536, 65537, 100 * 1024]
    rnd = random.Random(7)
    messages = []
    for i in range(50):
        size = sizes[i % len(sizes)] if i < 2 * len(sizes) else rnd.randrange(0, 100 * 1024)
        data = pattern(size, seed=100 + i)
        messages.append(data if i % 2 else data.hex()[:size])
    assert any(len(m) == 100 * 1024 for m in messages)
    with connect(f"ws://127.0.0.1:{proxy.port('web')}/chat", proxy=None, max_size=4 * MiB,
                 open_timeout=5, close_timeout=5) as ws:
        for message in messages:
            ws.send(message)
            assert ws.recv(timeout=10) == message
        ws.close()
        assert ws.close_code == 1000
    wait_for(lambda: outcomes, 5, what="the origin to see the close")
    assert outcomes == ["closed 1000"]


def declining_respond(upstream: Upstream, seen: Seen) -> Reply:
    if seen.target == "/no-upgrade":
        return Reply(200, [("content-length", "12"), ("x-upstream", upstream.name)], b"not upgraded")
    return default_respond(upstream, seen)


def test_declined_upgrade_keeps_the_connection_usable(harness, codec):
    origin = harness.upstream("plain", declining_respond)
    proxy = harness.proxy(one_route(codec, origin.port))
    with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=10) as sock:
        sock.sendall(b"GET /no-upgrade HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        status, fields, body = read_response(sock)
        assert (status, body) == (200, b"not upgraded")
        assert fields.get("connection", "").lower() != "close"
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
        status, fields, body = read_response(sock)
        assert status == 200, body
        assert json.loads(body)["target"] == "/after"
    assert [r.target for r in origin.requests] == ["/no-upgrade", "/after"]
    first = origin.requests[0]
    assert first.value("upgrade") == "websocket", "the Upgrade request reached the origin as one"


# ----------------------------------------------------------------------------- streaming


STREAM_BYTES = 64 * MiB
RSS_HEADROOM_KIB = 40 * 1024
STREAM_DEADLINE_S = 20


def stream_blocks() -> Iterable[bytes]:
    for i in range(STREAM_BYTES // MiB):
        yield pattern(MiB, seed=1000 + i)


def stream_digest() -> str:
    digest = hashlib.sha256()
    for block in stream_blocks():
        digest.update(block)
    return digest.hexdigest()


def warm_baseline(port: int, pid: int) -> int:
    """RSS after the path has been used once (imports, pools), in KiB."""
    for _ in range(3):
        assert request(port, "POST", "/warm", body=b"x" * 100_000).status == 200
    time.sleep(0.2)
    return rss_kib(pid)


def test_64mib_upload_to_a_slow_origin_is_streamed(harness, codec):
    # 64 KiB reads with 4 ms pauses: at most ~16 MiB/s, far slower than the client can send.
    origin = harness.upstream("slow", read_delay=0.004, keep_body=0)
    proxy = harness.proxy(one_route(codec, origin.port))
    baseline = warm_baseline(proxy.port("web"), proxy.proc.pid)
    expected = stream_digest()
    watch = RssWatch(proxy.proc.pid)
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=STREAM_DEADLINE_S) as sock:
            sock.sendall(f"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {STREAM_BYTES}\r\n"
                         f"Content-Type: application/octet-stream\r\n\r\n".encode())
            for block in stream_blocks():
                sock.sendall(block)
                assert time.monotonic() - began < STREAM_DEADLINE_S, "upload too slow"
            status, _, body = read_response(sock)
    finally:
        peak = watch.stop()
    took = time.monotonic() - began
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["body_len"], seen["body_sha256"]) == (STREAM_BYTES, expected)
    assert took < STREAM_DEADLINE_S
    assert took > 2.0, f"the slow origin read 64 MiB in {took:.1f}s: it was not slow, the test proves nothing"
    assert peak - baseline < RSS_HEADROOM_KIB, (
        f"proxy RSS grew {(peak - baseline) / 1024:.1f} MiB over its {baseline / 1024:.1f} MiB baseline "
        f"while relaying a 64 MiB upload to a slow reader")


def download_respond(upstream: Upstream, seen: Seen) -> Reply:
    if seen.target == "/download":
        return Reply(200, [("content-length", str(STREAM_BYTES)), ("content-type", "application/octet-stream")],
                     stream_blocks())
    return default_respond(upstream, seen)


def test_64mib_download_to_a_slow_client_is_streamed(harness, codec):
    origin = harness.upstream("fast", download_respond)
    proxy = harness.proxy(one_route(codec, origin.port))
    baseline = warm_baseline(proxy.port("web"), proxy.proc.pid)
    expected = stream_digest()
    watch = RssWatch(proxy.proc.pid)
    began = time.monotonic()
    digest, received = hashlib.sha256(), 0
    try:
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=STREAM_DEADLINE_S) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            sock.sendall(b"GET /download HTTP/1.1\r\nHost: h\r\n\r\n")
            head, rest = read_head(sock)
            assert head.split(b" ")[1] == b"200", head
            assert b"content-length: %d" % STREAM_BYTES in head.lower(), head
            digest.update(rest)
            received = len(rest)
            while received < STREAM_BYTES:
                chunk = sock.recv(min(65536, STREAM_BYTES - received))
                assert chunk, f"closed after {received} bytes"
                digest.update(chunk)
                received += len(chunk)
                time.sleep(0.004)  # a slow reader: at most ~16 MiB/s
                assert time.monotonic() - began < STREAM_DEADLINE_S, f"only {received} bytes in time"
    finally:
        peak = watch.stop()
    assert digest.hexdigest() == expected
    assert peak - baseline < RSS_HEADROOM_KIB, (
        f"proxy RSS grew {(peak - baseline) / 1024:.1f} MiB over its {baseline / 1024:.1f} MiB baseline "
        f"while relaying a 64 MiB download to a slow reader")


# ----------------------------------------------------------------------------- pool idle race


def test_origin_closing_idle_keepalive_connections_never_fails_a_request(harness, codec):
    # Like Node's keepAliveTimeout: an idle connection is closed after 200 ms without warning.
    origin = harness.upstream("node-like", idle_close=0.2)
    proxy = harness.proxy(one_route(codec, origin.port))
    rnd = random.Random(11)
    # Pauses straddle the 200 ms close, several land right on it.
    pauses = [0.15, 0.19, 0.2, 0.2, 0.21, 0.25, 0.3, 0.35, 0.195, 0.205] + [rnd.uniform(0.15, 0.35) for _ in range(20)]
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port("web"), timeout=10)
    failures = []
    try:
        conn.connect()
        sock = conn.sock
        for i, pause in enumerate(pauses):
            answer = request(0, "GET", f"/r/{i}", {"Host": "h"}, conn=conn)
            if answer.status != 200:
                failures.append((i, pause, answer.status, answer.body[:200]))
            assert conn.sock is sock, f"the proxy closed the client's connection at request {i}"
            time.sleep(pause)
    finally:
        conn.close()
    assert not failures, f"requests failed after an upstream idle close: {failures}"
    assert len(origin.requests) == len(pauses)
    assert origin.accepted > 5, f"only {origin.accepted} upstream connections: the origin never closed one"


# ----------------------------------------------------------------------------- detection on an "auto" listener


def banner_server() -> tuple[socket.socket, list[bytes], threading.Event]:
    """A server-first protocol: the server greets, then reads one line."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    got: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.sendall(b"220 smtp.example ESMTP ready\r\n")
                    got.append(conn.recv(100))
                    conn.sendall(b"250 ok\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return listener, got, stop


def test_auto_listener_serves_http_at_l7_and_relays_a_server_first_protocol(harness, codec):
    origin = harness.upstream("web")
    listener, got, stop = banner_server()
    harness.closers += [stop.set, listener.close]
    routes = [{"match": {"path_prefix": "/"}, "cluster": "web"}, {"match": {}, "cluster": "smtp"}]
    config = http_config(codec, {"web": origin.port, "smtp": listener.getsockname()[1]}, routes, protocol="auto",
                         listener={"detection_timeout": "300ms"})
    proxy = harness.proxy(config)
    port = proxy.port("web")

    seen = get(port, "/via-l7", host="h").json()
    assert seen["upstream"] == "web"
    assert dict(seen["headers"]).get("x-request-id"), "no x-request-id: the request was not handled at L7"

    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.recv(100).startswith(b"220 ")
        waited = time.monotonic() - began
        client.sendall(b"EHLO me\r\n")
        assert client.recv(100) == b"250 ok\r\n"
    assert 0.25 < waited < 2.0, waited
    assert got == [b"EHLO me\r\n"]

    detections = lambda outcome: proxy.metric("sidecar_protocol_detections_total", listener="web", outcome=outcome)
    assert (detections("http1"), detections("timeout")) == (1, 1)
    # HTTP still works after the relayed connection.
    assert get(port, "/again", host="h").json()["target"] == "/again"

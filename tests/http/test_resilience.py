"""Retries, timeouts, circuit breakers, outlier detection and load balancing through the real proxy.

The upstreams are ``RecordingUpstream`` servers the test scripts: answer 503
N times, close before answering, stall, answer half a response and close; a
closed port refuses connections. Every assertion counts what reached the
upstreams (exact attempts) next to what the client got and what /metrics says.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from ..support import Proxy, free_port, stop_all, wait_for
from .upstreams import RecordingUpstream, Script, reply

pytestmark = pytest.mark.e2e

R503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
R200 = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CLOSE = Script(send=(), after="close")   # read the request, close without a byte
HOLD = Script(send=(), after="hold")     # read the request, answer nothing


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused."""
    return free_port()


def config(endpoints: dict[str, list[int]], routes: list[dict], **cluster_extra) -> dict:
    clusters = {name: {"endpoints": [f"127.0.0.1:{p}" for p in ports], **cluster_extra.get(name, {})}
                for name, ports in endpoints.items()}
    return {
        "version": 1, "node": {"id": "resilience"},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"web": {"address": "127.0.0.1", "port": free_port(), "protocol": "http", "routes": "main"}},
        "clusters": clusters,
        "route_tables": {"main": routes},
    }


class Client:
    """A keep-alive HTTP/1.1 client on a raw socket that reads exactly one response per request."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, method: str, path: str, body: bytes = b"", headers: str = "") -> None:
        framing = f"content-length: {len(body)}\r\n" if body or method == "POST" else ""
        self.sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\n{framing}{headers}\r\n".encode() + body)

    def response(self) -> tuple[int, dict, bytes]:
        """(status, fields, body); raises ConnectionError when the proxy closed or reset first."""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields.get("content-length", "0"))
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(lines[0].split()[1]), fields, body

    def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, dict, bytes]:
        self.send(method, path, body, headers)
        return self.response()

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        self.buf += data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def world(tmp_path):
    """Starts proxies and upstreams on demand and stops all of them after the test."""
    proxies: list[Proxy] = []
    upstreams: list[RecordingUpstream] = []

    class World:
        def upstream(self) -> RecordingUpstream:
            up = RecordingUpstream()
            upstreams.append(up)
            return up

        def proxy(self, cfg: dict) -> Proxy:
            proxy = Proxy(cfg, tmp_path / f"proxy{len(proxies)}")
            proxies.append(proxy)
            return proxy.wait_ready()

    yield World()
    # Whatever each test did (overflows, retries, timeouts, abandoned tries), every slot came back.
    for proxy in proxies:
        def leaked() -> dict:
            return {(labels, name): value for (name, labels), value in proxy.metrics().items()
                    if name == "sidecar_circuit_breaker_active" and value
                    and dict(labels)["breaker"] in ("requests", "pending", "retries")}
        try:
            wait_for(lambda: not leaked(), 5, what="the breaker gauges back at 0")
        except AssertionError:
            raise AssertionError(f"breaker slots still held: {leaked()}") from None
    errors = stop_all(proxies)
    for up in upstreams:
        up.close()
    assert not errors, errors
    for up in upstreams:
        assert not up.errors, up.errors


def route(retry: dict | None = None, cluster: str = "backend", path: str = "/", **extra) -> dict:
    r = {"match": {"path_prefix": path}, "cluster": cluster, **extra}
    if retry is not None:
        r["retry"] = retry
    return r


# ----------------------------------------------------------------------------- retries


def test_503_twice_then_200_takes_exactly_three_tries_on_one_kept_connection(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route({"on": ["gateway-error"], "attempts": 3})]))
    up.script(reply(R503), reply(R503))
    client = Client(proxy.port("web"))
    status, _, body = client.request("GET", "/a")
    assert (status, body) == (200, b"ok 2")
    assert len(up.requests) == 3
    # The same request each time: one x-request-id, and the retried 503s were read to their end
    # so the connection was kept (one accepted connection for all three tries).
    assert len({tuple(r.header(b"x-request-id")) for r in up.requests}) == 1
    assert up.accepted == 1
    assert proxy.metric("sidecar_http_retries_total", cluster="backend", reason="status") == 2
    assert proxy.metric("sidecar_http_upstream_attempts_total", cluster="backend") == 3
    assert proxy.metric("sidecar_http_requests_total", listener="web",
                        route="main[0]", cluster="backend", code_class="2xx", flags="-") == 1


def test_a_retried_response_over_the_discard_limit_closes_its_connection_instead_of_being_read(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route({"on": ["gateway-error"], "attempts": 2})]))
    big = 100 << 10  # over the 64 KiB the proxy reads to keep a retried response's connection
    up.script(reply(b"HTTP/1.1 503 Busy\r\ncontent-length: %d\r\n\r\n" % big + b"x" * big))
    client = Client(proxy.port("web"))
    assert client.request("GET", "/big")[:3:2] == (200, b"ok 1")
    assert up.accepted == 2  # the first connection was given up, not drained
    # A small retried response is read to its end: its connection stays.
    up.script(reply(R503))
    assert client.request("GET", "/small")[:3:2] == (200, b"ok 3")
    assert up.accepted == 2 and len(up.requests) == 4


def test_when_attempts_run_out_the_last_answer_goes_to_the_client_flagged_URX(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route({"on": ["5xx"], "attempts": 3})]))
    up.script(*[reply(R503)] * 4)
    status, _, body = Client(proxy.port("web")).request("GET", "/a")
    assert (status, body) == (503, b"busy")  # the upstream's own answer, not one the proxy made up
    assert len(up.requests) == 3
    assert proxy.metric("sidecar_http_requests_total", listener="web",
                        route="main[0]", cluster="backend", code_class="5xx", flags="URX") == 1
    assert proxy.metric("sidecar_http_retries_skipped_total", cluster="backend", reason="attempts") == 1


def test_a_close_before_any_byte_is_retried_for_get_but_not_for_post(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route({"on": ["reset"], "attempts": 3})]))
    up.script(CLOSE)
    assert Client(proxy.port("web")).request("GET", "/get")[0] == 200
    assert [r.method for r in up.requests] == [b"GET", b"GET"]

    # A POST reached the upstream, which may have acted on it: not sent twice.
    up.script(CLOSE)
    status, _, _ = Client(proxy.port("web")).request("POST", "/post", b"payload")
    assert status == 502
    assert [r.method for r in up.requests] == [b"GET", b"GET", b"POST"]
    assert proxy.metric("sidecar_http_retries_skipped_total", cluster="backend", reason="non_idempotent") == 1


def test_a_post_body_is_replayed_byte_exact_when_the_route_allows_it(world):
    up = world.upstream()
    retry = {"on": ["reset"], "attempts": 2, "retry_non_idempotent": True, "buffer_limit": 4096}
    proxy = world.proxy(config({"backend": [up.port]}, [route(retry)]))
    body = bytes(range(256)) * 8  # 2 KiB, within buffer_limit
    up.script(CLOSE)
    client = Client(proxy.port("web"))
    assert client.request("POST", "/p", body)[0] == 200
    assert [bytes(r.body) for r in up.requests] == [body, body]

    # Chunked, in pieces: replayed as the same chunks' data.
    up.script(CLOSE)
    client.sock.sendall(b"POST /c HTTP/1.1\r\nHost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                        b"5\r\nhello\r\n")
    time.sleep(0.05)
    client.sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
    assert client.response()[0] == 200
    assert [bytes(r.body) for r in up.requests[2:]] == [b"hello world", b"hello world"]

    # Over buffer_limit the body is not kept, so nothing can be replayed.
    up.script(CLOSE)
    assert client.request("POST", "/big", b"x" * 5000)[0] == 502
    assert len(up.requests) == 5
    assert proxy.metric("sidecar_http_retries_skipped_total", cluster="backend", reason="body_not_buffered") == 1


def test_no_retry_once_part_of_the_response_went_to_the_client(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route({"on": ["reset", "5xx"], "attempts": 3})]))
    up.script(reply(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b", after="close"))
    client = Client(proxy.port("web"))
    with pytest.raises(ConnectionError):
        client.request("GET", "/partial")
    assert b"only ten b" in client.buf
    assert len(up.requests) == 1
    assert proxy.metric("sidecar_http_retries_total", cluster="backend", reason="reset") == 0


def test_a_stalled_try_is_abandoned_at_the_per_try_timeout_and_tried_again(world):
    up = world.upstream()
    retry = {"on": ["reset"], "attempts": 2, "per_try_timeout": "300ms"}
    proxy = world.proxy(config({"backend": [up.port]}, [route(retry)]))
    up.script(HOLD)
    began = time.monotonic()
    status, _, body = Client(proxy.port("web")).request("GET", "/slow")
    assert (status, body) == (200, b"ok 1")
    assert time.monotonic() - began >= 0.29
    assert len(up.requests) == 2
    assert up.accepted == 2  # the stalled connection was given up, not reused
    assert proxy.metric("sidecar_http_retries_total", cluster="backend", reason="per-try-timeout") == 1
    wait_for(lambda: up.peer_closed >= 1, 5, what="the proxy to close the stalled connection")


def test_the_route_timeout_bounds_every_try_together(world):
    up = world.upstream()
    retry = {"on": ["reset"], "attempts": 10, "per_try_timeout": "300ms", "backoff": {"base": "1ms", "cap": "1ms"}}
    proxy = world.proxy(config({"backend": [up.port]}, [route(retry, timeout="700ms")]))
    up.script(*[HOLD] * 10)
    began = time.monotonic()
    status, _, _ = Client(proxy.port("web")).request("GET", "/stall")
    elapsed = time.monotonic() - began
    assert status == 504
    assert 0.69 <= elapsed < 3.0
    # 300 ms + 300 ms, then the 700 ms total leaves no room for a third full try.
    assert 2 <= len(up.requests) <= 3
    assert proxy.metric("sidecar_http_requests_total", listener="web",
                        route="main[0]", cluster="backend", code_class="5xx", flags="UT") == 1


def test_retry_after_is_honoured_up_to_max_retry_after(world):
    up = world.upstream()
    retry = {"on": ["gateway-error"], "attempts": 2, "max_retry_after": "400ms"}
    proxy = world.proxy(config({"backend": [up.port]}, [route(retry)]))
    up.script(reply(b"HTTP/1.1 503 Busy\r\nretry-after: 30\r\ncontent-length: 0\r\n\r\n"))
    began = time.monotonic()
    assert Client(proxy.port("web")).request("GET", "/ra")[0] == 200
    elapsed = time.monotonic() - began
    assert 0.39 <= elapsed < 5  # waited the capped 400 ms, not 30 s


def test_a_refused_connect_is_retried_on_the_other_endpoint(world):
    up = world.upstream()
    dead = closed_port()
    retry = {"on": ["connect-failure"], "attempts": 2}
    proxy = world.proxy(config({"backend": [dead, up.port]}, [route(retry)]))
    client = Client(proxy.port("web"))
    for i in range(6):
        assert client.request("GET", f"/r{i}")[0] == 200
    assert len(up.requests) == 6
    # Round robin sends every other first try to the dead endpoint; each such try failed to connect
    # and its retry avoided it.
    assert proxy.metric("sidecar_http_retries_total", cluster="backend", reason="connect-failure") == 3
    assert proxy.metric("sidecar_http_upstream_attempts_total", cluster="backend") == 9


# ----------------------------------------------------------------------------- budget and breakers


def test_sustained_failure_stays_within_the_retry_budget(world):
    """40 clients against an upstream that always fails: the retry budget (20 % of active requests)
    keeps what reaches the upstream under 1.2 x the requests, where attempts: 3 alone would triple it."""
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route({"on": ["gateway-error"], "attempts": 3})]))
    up.script(*[reply(R503)] * 20000)
    clients, per_client = 40, 40
    answered = []
    errors = []

    def run() -> None:
        try:
            c = Client(proxy.port("web"))
            n = 0
            for _ in range(per_client):
                status, _, _ = c.request("GET", "/x")
                assert status == 503
                n += 1
            answered.append(n)
            c.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    requests = sum(answered)
    assert requests == clients * per_client
    attempts = len(up.requests)
    assert attempts == proxy.metric("sidecar_http_upstream_attempts_total", cluster="backend")
    assert requests < attempts <= 1.2 * requests, (attempts, requests)
    assert proxy.metric("sidecar_http_retries_skipped_total", cluster="backend", reason="budget") > 0


def test_breaker_overflow_is_answered_503_at_once_and_counted(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route()],
                               backend={"circuit_breakers": {"max_requests": 2}}))
    up.script(reply(1.0, R200), reply(1.0, R200))
    slow = [Client(proxy.port("web")) for _ in range(2)]
    for c in slow:
        c.send("GET", "/slow")
    wait_for(lambda: len(up.requests) == 2, 5, what="both slow requests at the upstream")
    began = time.monotonic()
    for i in range(8):
        status, fields, _ = Client(proxy.port("web")).request("GET", f"/burst{i}")
        assert status == 503
    assert time.monotonic() - began < 0.9  # answered before either slow request finished
    assert [c.response()[0] for c in slow] == [200, 200]
    assert len(up.requests) == 2  # nothing of the burst reached the upstream
    assert proxy.metric("sidecar_circuit_breaker_overflow_total", cluster="backend", breaker="requests") == 8
    assert proxy.metric("sidecar_http_requests_total", listener="web",
                        route="main[0]", cluster="backend", code_class="5xx", flags="UO") == 8
    # Every slot came back.
    wait_for(lambda: proxy.metric("sidecar_circuit_breaker_active", cluster="backend", breaker="requests") == 0,
             5, what="the requests gauge back at 0")
    assert Client(proxy.port("web")).request("GET", "/after")[0] == 200


def test_max_connections_caps_new_connections(world):
    up = world.upstream()
    proxy = world.proxy(config({"backend": [up.port]}, [route()],
                               backend={"circuit_breakers": {"max_connections": 1}}))
    up.script(reply(0.5, R200))
    first = Client(proxy.port("web"))
    first.send("GET", "/one")
    wait_for(lambda: len(up.requests) == 1, 5, what="the first request at the upstream")
    # The only connection is busy and a second may not be opened.
    assert Client(proxy.port("web")).request("GET", "/two")[0] == 503
    assert first.response()[0] == 200
    # Idle again: the kept connection serves the next request.
    assert Client(proxy.port("web")).request("GET", "/three")[0] == 200
    assert up.accepted == 1
    assert proxy.metric("sidecar_circuit_breaker_overflow_total", cluster="backend", breaker="connections") == 1


# ----------------------------------------------------------------------------- outlier detection


def test_an_ejected_endpoint_gets_no_traffic_until_its_time_is_up(world):
    bad, good = world.upstream(), world.upstream()
    outlier = {"consecutive_5xx": 3, "base_ejection_time": "1s", "max_ejection_percent": 50}
    proxy = world.proxy(config({"backend": [bad.port, good.port]}, [route()],
                               backend={"outlier_detection": outlier}))
    bad.script(*[reply(R503)] * 3)
    client = Client(proxy.port("web"))
    statuses = [client.request("GET", f"/e{i}")[0] for i in range(6)]
    assert statuses == [503, 200] * 3
    assert proxy.metric("sidecar_outlier_ejections_total", cluster="backend") == 1
    assert proxy.metric("sidecar_outlier_ejected_endpoints", cluster="backend") == 1
    status, body = proxy.get("/clusters")
    assert status == 200
    seen = json.loads(body)["clusters"]["backend"]
    assert seen["outlier_detection"]["ejected"] == [f"127.0.0.1:{bad.port}"]
    assert seen["circuit_breakers"]["limits"]["requests"] == 1024
    seen_bad = len(bad.requests)
    for i in range(10):
        assert client.request("GET", f"/ejected{i}")[0] == 200
    assert len(bad.requests) == seen_bad  # nothing while ejected
    time.sleep(1.1)
    for i in range(4):
        assert client.request("GET", f"/back{i}")[0] == 200
    assert len(bad.requests) >= seen_bad + 1  # back in rotation (and healthy now)
    assert proxy.metric("sidecar_outlier_ejected_endpoints", cluster="backend") == 0


def test_every_endpoint_ejected_still_serves_in_panic_mode(world):
    a, b = world.upstream(), world.upstream()
    outlier = {"consecutive_gateway_failure": 1, "base_ejection_time": "30s", "max_ejection_percent": 100}
    proxy = world.proxy(config({"backend": [a.port, b.port]}, [route()], backend={"outlier_detection": outlier}))
    a.script(reply(R503))
    b.script(reply(R503))
    client = Client(proxy.port("web"))
    assert [client.request("GET", f"/p{i}")[0] for i in range(2)] == [503, 503]
    assert proxy.metric("sidecar_outlier_panic", cluster="backend") == 1
    # Both ejected for 30 s, yet requests still go out rather than failing outright.
    assert [client.request("GET", f"/q{i}")[0] for i in range(4)] == [200] * 4
    assert len(a.requests) + len(b.requests) == 6


# ----------------------------------------------------------------------------- load balancing


@pytest.mark.parametrize("lb", ["random", "least_request"])
def test_lb_policies_spread_by_weight(world, lb):
    a, b = world.upstream(), world.upstream()
    cfg = config({"backend": [a.port, b.port]}, [route()], backend={"lb": lb})
    cfg["clusters"]["backend"]["endpoints"] = [{"address": f"127.0.0.1:{a.port}", "weight": 3},
                                               {"address": f"127.0.0.1:{b.port}", "weight": 1}]
    proxy = world.proxy(cfg)
    client = Client(proxy.port("web"))
    for i in range(200):
        assert client.request("GET", f"/w{i}")[0] == 200
    share = len(a.requests) / 200
    # 3:1 by weight: 150 expected; the bounds are > 5 standard deviations wide.
    assert 0.6 <= share <= 0.9, share


def test_least_request_prefers_the_endpoint_with_fewer_requests_in_flight(world):
    slow, fast = world.upstream(), world.upstream()
    proxy = world.proxy(config({"backend": [slow.port, fast.port]}, [route()], backend={"lb": "least_request"}))
    slow.script(*[reply(1.5, R200)] * 3)
    stuck = []
    # Park requests on the slow endpoint until it has one in flight.
    while not slow.requests:
        c = Client(proxy.port("web"))
        c.send("GET", "/park")
        stuck.append(c)
        wait_for(lambda: len(slow.requests) + len(fast.requests) >= len(stuck), 5, what="the parked request")
    fast_before = len(fast.requests)
    client = Client(proxy.port("web"))
    for i in range(20):
        assert client.request("GET", f"/lr{i}")[0] == 200
    # With the slow endpoint busy, power of two choices picks the idle one every time.
    assert len(fast.requests) - fast_before == 20
    for c in stuck:
        assert c.response()[0] == 200


def test_a_reload_keeps_ejections_and_breaker_gauges(world):
    bad, good = world.upstream(), world.upstream()
    outlier = {"consecutive_5xx": 1, "base_ejection_time": "30s", "max_ejection_percent": 50}
    cfg = config({"backend": [bad.port, good.port]}, [route()], backend={"outlier_detection": outlier})
    proxy = world.proxy(cfg)
    bad.script(reply(R503))
    client = Client(proxy.port("web"))
    assert [client.request("GET", f"/x{i}")[0] for i in range(2)] == [503, 200]
    cfg["route_tables"]["main"][0]["response_headers"] = {"add": {"x-reloaded": "1"}}
    status, body = proxy.post_config(cfg)
    assert status == 200, body
    seen_bad = len(bad.requests)
    client = Client(proxy.port("web"))  # a connection keeps the snapshot it was accepted under
    for i in range(6):
        status, fields, _ = client.request("GET", f"/y{i}")
        assert status == 200
    assert fields.get("x-reloaded") == "1"  # the new snapshot serves ...
    assert len(bad.requests) == seen_bad  # ... and the endpoint stays ejected

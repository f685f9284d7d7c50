"""Route rate limits through the real proxy: a token bucket admits rate x time + burst, answers 429
with Retry-After and RateLimit-* fields, keys by header or client, counts in shadow mode, and keeps
its buckets across a reload that leaves the limit unchanged."""
from __future__ import annotations

import socket
import time

import pytest

from ..support import Proxy, free_port

pytestmark = pytest.mark.e2e


def config(codec: str, limited: dict | None = None) -> dict:
    direct = {"status": 200, "body": "ok"}
    return {
        "version": 1, "node": {"id": "rl"},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"web": {"address": "127.0.0.1", "port": free_port(), "protocol": "http", "routes": "main",
                              "http": {"codec": codec}}},
        "clusters": {},
        "route_tables": {"main": [
            {"name": "limited", "match": {"path": "/limited"}, "direct_response": direct,
             "rate_limit": limited or {"requests_per_second": 10, "burst": 5}},
            {"name": "by-user", "match": {"path": "/by-user"}, "direct_response": direct,
             "rate_limit": {"requests_per_second": 0.1, "burst": 2, "key": "header:X-User"}},
            {"name": "shadow", "match": {"path": "/shadow"}, "direct_response": direct,
             "rate_limit": {"requests_per_second": 0.1, "burst": 1, "shadow": True}},
        ]},
    }


@pytest.fixture(params=["h11", "httptools"])
def codec(request):
    return request.param


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def get(self, path: str, headers: str = "") -> tuple[int, dict]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "the proxy closed the connection"
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        self.buf = self.buf[length:]
        return int(lines[0].split()[1]), fields

    def close(self) -> None:
        self.sock.close()


def test_admits_rate_times_elapsed_plus_burst_and_answers_429_with_headers(tmp_path, codec):
    proxy = Proxy(config(codec), tmp_path).wait_ready()
    client = Client(proxy.port("web"))
    try:
        began = time.monotonic()
        allowed = refused = 0
        refusal = None
        for _ in range(3000):  # bounded; about a second of requests on one keep-alive connection
            status, fields = client.get("/limited")
            if status == 200:
                allowed += 1
            else:
                assert status == 429
                refused += 1
                refusal = fields
            if time.monotonic() - began > 1.0:
                break
        elapsed = time.monotonic() - began
        expected = 5 + 10 * elapsed
        assert expected - 1.5 <= allowed <= expected + 1, (allowed, elapsed)
        assert refused > 0
        assert refusal["retry-after"] == "1"
        assert refusal["ratelimit-limit"] == "5" and refusal["ratelimit-remaining"] == "0"
        assert int(refusal["ratelimit-reset"]) >= 1
        assert proxy.metric("sidecar_http_rate_limit_decisions_total", listener="web", route="limited",
                            decision="limited") == refused
        assert proxy.metric("sidecar_http_requests_total", listener="web",
                            route="limited", cluster="none", code_class="4xx", flags="RL") == refused
    finally:
        client.close()
        assert proxy.stop() == 0


def test_keyed_buckets_and_shadow_mode(tmp_path, codec):
    proxy = Proxy(config(codec), tmp_path).wait_ready()
    client = Client(proxy.port("web"))
    try:
        statuses = [client.get("/by-user", "X-User: a\r\n")[0] for _ in range(3)]
        assert statuses == [200, 200, 429], "user a: a burst of 2"
        assert [client.get("/by-user", "X-User: b\r\n")[0] for _ in range(2)] == [200, 200], "user b has its own"
        # Requests without the field share one bucket.
        assert [client.get("/by-user")[0] for _ in range(3)] == [200, 200, 429]
        # Shadow: everything passes, what would have been refused is counted.
        assert [client.get("/shadow")[0] for _ in range(4)] == [200] * 4
        assert proxy.metric("sidecar_http_rate_limit_decisions_total", listener="web", route="shadow",
                            decision="would_limit") == 3
    finally:
        client.close()
        assert proxy.stop() == 0


def test_a_reload_keeps_the_buckets_of_an_unchanged_limit(tmp_path, codec):
    cfg = config(codec, {"requests_per_second": 0.1, "burst": 2})
    proxy = Proxy(cfg, tmp_path).wait_ready()
    try:
        client = Client(proxy.port("web"))
        assert [client.get("/limited")[0] for _ in range(3)] == [200, 200, 429]
        client.close()
        cfg["route_tables"]["main"].append({"match": {"path": "/other"}, "direct_response": {"status": 204}})
        assert proxy.post_config(cfg)[0] == 200
        client = Client(proxy.port("web"))
        assert client.get("/limited")[0] == 429, "an unchanged limit keeps its (empty) bucket"
        client.close()
        cfg["route_tables"]["main"][0]["rate_limit"] = {"requests_per_second": 0.1, "burst": 3}
        assert proxy.post_config(cfg)[0] == 200
        client = Client(proxy.port("web"))
        assert [client.get("/limited")[0] for _ in range(4)] == [200, 200, 200, 429], "a new limit starts full"
        client.close()
    finally:
        assert proxy.stop() == 0

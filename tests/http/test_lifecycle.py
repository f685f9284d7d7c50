"""Draining HTTP connections: idle keep-alive connections close at once, busy ones after their
response (which says ``connection: close``), and the proxy exits without waiting out the drain time."""
from __future__ import annotations

import signal
import socket
import time

import pytest

from ..support import Proxy, ThreadedServer, free_port, recv_all

pytestmark = pytest.mark.e2e

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def slow_origin(delay: float):
    def handler(conn: socket.socket) -> None:
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                _, buf = buf.split(b"\r\n\r\n", 1)
                time.sleep(delay)
                conn.sendall(RESPONSE)
    return handler


def config(origin_port: int, codec: str) -> dict:
    return {
        "version": 1, "node": {"id": "drain"},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"web": {"address": "127.0.0.1", "port": free_port(), "protocol": "http", "routes": "main",
                              "http": {"codec": codec}}},
        "clusters": {"origin": {"endpoints": [f"127.0.0.1:{origin_port}"]}},
        "route_tables": {"main": [{"match": {}, "cluster": "origin"}]},
    }


@pytest.fixture(params=["h11", "httptools"])
def codec(request):
    return request.param


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"hello" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_sigterm_closes_idle_keepalive_connections_and_finishes_busy_ones(tmp_path, codec):
    origin = ThreadedServer(slow_origin(1.0))
    proxy = Proxy(config(origin.port, codec), tmp_path, drain_time_s=20).wait_ready()
    try:
        idle = socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5)
        busy = socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5)
        idle.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(idle).startswith(b"HTTP/1.1 200"), "a keep-alive exchange before the drain"
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)  # the request is at the origin, its answer a second away
        began = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        # The idle connection is closed by the proxy (FIN) without an answer to anything.
        assert recv_all(idle) == b""
        # The busy one gets its whole response, told that the connection ends, then the FIN.
        answer = recv_all(busy)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello", answer
        assert b"\r\nconnection: close" in head.lower(), head
        assert proxy.proc.wait(10) == 0
        # Far from the 20 s drain time: nothing was left to wait for.
        assert time.monotonic() - began < 6
        idle.close()
        busy.close()
    finally:
        proxy.kill()
        origin.close()
    assert "Traceback" not in proxy.log()


def test_reload_keeps_pooled_connections_and_in_flight_requests(tmp_path, codec):
    origin = ThreadedServer(slow_origin(0.0))
    cfg = config(origin.port, codec)
    proxy = Proxy(cfg, tmp_path).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5) as c:
            for i in range(3):
                c.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                assert read_response(c).startswith(b"HTTP/1.1 200")
            cfg["route_tables"]["main"].insert(0, {"match": {"path": "/new"}, "direct_response": {"status": 204}})
            status, body = proxy.post_config(cfg)
            assert status == 200, body
            # The connection accepted under the old snapshot keeps its routes...
            c.sendall(b"GET /new HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(c).startswith(b"HTTP/1.1 200")
        # ...a new one gets the new ones.
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5) as c:
            c.sendall(b"GET /new HTTP/1.1\r\nHost: a\r\n\r\n")
            assert c.recv(1000).startswith(b"HTTP/1.1 204")
        assert origin.accepted == 1, "the reload kept the pooled upstream connection"
    finally:
        origin.close()
        assert proxy.stop() == 0


def test_a_keepalive_connection_stays_usable_after_each_kind_of_local_answer(tmp_path, codec):
    """503 (nothing listening), 504 (silence), 404 (no route), a direct response: after each, the
    same client connection carries the next request to a working origin."""
    origin = ThreadedServer(slow_origin(0.0))
    silent = ThreadedServer(lambda conn: time.sleep(3))
    cfg = config(origin.port, codec)
    cfg["clusters"]["dead"] = {"endpoints": [f"127.0.0.1:{free_port()}"], "connect_timeout": "1s"}
    cfg["clusters"]["silent"] = {"endpoints": [f"127.0.0.1:{silent.port}"]}
    cfg["route_tables"]["main"] = [
        {"match": {"path": "/dead"}, "cluster": "dead"},
        {"match": {"path": "/silent"}, "cluster": "silent", "timeout": "500ms"},
        {"match": {"path": "/direct"}, "direct_response": {"status": 202, "body": "here"}},
        {"match": {"path_prefix": "/ok"}, "cluster": "origin"},
    ]
    proxy = Proxy(cfg, tmp_path).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5) as c:
            for path, status in ((b"/dead", b"503"), (b"/silent", b"504"), (b"/nowhere", b"404"),
                                 (b"/direct", b"202")):
                c.sendall(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
                answer = c.recv(65536)
                assert answer.startswith(b"HTTP/1.1 " + status), (path, answer)
                assert b"connection: close" not in answer.lower(), (path, answer)
                c.sendall(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
                assert read_response(c).startswith(b"HTTP/1.1 200"), f"after {path!r}"
    finally:
        origin.close()
        silent.close()
        assert proxy.stop() == 0


def test_a_refused_client_that_never_closes_is_let_go_after_the_linger(tmp_path, codec):
    """After a 400 the proxy half-closes and keeps reading for LINGER (2 s) so the client can read
    the answer; a client that neither closes nor stops sending is then closed on, not kept forever."""
    origin = ThreadedServer(slow_origin(0.0))
    proxy = Proxy(config(origin.port, codec), tmp_path).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port("web")), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
            answer = recv_all(c)  # the 400, then our side's FIN
            assert answer.startswith(b"HTTP/1.1 400"), answer
            began = time.monotonic()
            c.sendall(b"more bytes the proxy reads and drops")
            while proxy.metric("sidecar_tcp_connections_active", listener="web") > 0:
                assert time.monotonic() - began < 5, "the lingering connection was not closed"
                time.sleep(0.05)
            assert 1.5 < time.monotonic() - began, "closed before the linger (a reset could eat the answer)"
    finally:
        origin.close()
        assert proxy.stop() == 0

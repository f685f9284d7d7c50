"""The L4 relay through the real proxy process, on loopback."""
from __future__ import annotations

import hashlib
import signal
import socket
import struct
import threading
import time

import pytest

from ..support import (Proxy, ThreadedServer, echo_handler, free_port, pattern, recv_all, relay_config,
                       wait_for)

pytestmark = pytest.mark.e2e

MIB = 1 << 20


@pytest.fixture
def proxies(tmp_path):
    started: list[Proxy] = []

    def start(config: dict, **kwargs) -> Proxy:
        proxy = Proxy(config, tmp_path, **kwargs).wait_ready()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        code = proxy.stop()
        assert code == 0, proxy.log()
        assert "Traceback" not in proxy.log(), proxy.log()


@pytest.fixture
def servers():
    made: list[ThreadedServer] = []

    def start(handler, **kwargs) -> ThreadedServer:
        server = ThreadedServer(handler, **kwargs)
        made.append(server)
        return server

    yield start
    for server in made:
        server.close()


def connect(proxy: Proxy, listener: str = "relay", timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port(listener)), timeout=timeout)


def expect_reset(proxy: Proxy, timeout: float = 5) -> None:
    """Connect, send, read: the proxy's reset may land at any of the three.

    On loopback a reset sent right after the accept can arrive before
    connect() has returned. A clean close (recv() == b"") fails this.
    """
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        with connect(proxy, timeout=timeout) as client:
            client.sendall(b"hello")
            client.recv(1)


def send_then_fin(sock: socket.socket, data: bytes) -> threading.Thread:
    def run():
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_ten_mib_each_way_arrive_intact(proxies, servers):
    up_data, down_data = pattern(10 * MIB, 1), pattern(10 * MIB, 2)

    def handler(conn):
        sender = send_then_fin(conn, down_data)
        digest = hashlib.sha256(recv_all(conn)).hexdigest()
        sender.join(30)
        return digest

    server = servers(handler)
    proxy = proxies(relay_config(server.port))
    with connect(proxy) as client:
        sender = send_then_fin(client, up_data)
        received = recv_all(client)
        sender.join(30)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(down_data).hexdigest()
    wait_for(lambda: server.results, 10, what="server digest")
    assert server.results == [hashlib.sha256(up_data).hexdigest()]
    wait_for(lambda: proxy.metric("sidecar_tcp_connections_closed_total", listener="relay", reason="normal") == 1, 5,
             what="connection accounted")
    assert proxy.metric("sidecar_tcp_received_bytes_total", listener="relay") == len(up_data)
    assert proxy.metric("sidecar_tcp_sent_bytes_total", listener="relay") == len(down_data)


def test_client_fin_reaches_server_and_the_reply_still_flows(proxies, servers):
    def handler(conn):
        request = recv_all(conn)  # returns only once the client's FIN came through
        time.sleep(0.2)
        conn.sendall(b"reply to " + request)
        return request

    server = servers(handler)
    proxy = proxies(relay_config(server.port))
    with connect(proxy) as client:
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b"reply to question"
    assert server.results == [b"question"]


def test_server_fin_reaches_client_and_the_client_can_still_send(proxies, servers):
    def handler(conn):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)

    server = servers(handler)
    proxy = proxies(relay_config(server.port))
    with connect(proxy) as client:
        assert recv_all(client) == b"banner"  # EOF seen: the server's FIN came through
        time.sleep(0.2)
        client.sendall(b"late upload after the server's FIN")
        client.shutdown(socket.SHUT_WR)
        wait_for(lambda: server.results, 5, what="server to read until EOF")
    assert server.results == [b"late upload after the server's FIN"]


def test_upstream_reset_reaches_the_client_as_a_reset(proxies, servers):
    def handler(conn):
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # close() with a zero linger time sends RST instead of FIN.

    server = servers(handler)
    proxy = proxies(relay_config(server.port))
    with connect(proxy) as client:
        client.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            client.recv(10)
    assert proxy.wait_for_metric("sidecar_tcp_connections_closed_total", 1, listener="relay", reason="reset") == 1


def test_slow_reader_does_not_make_the_proxy_buffer_without_bound(proxies, servers):
    limit = 64 << 10
    total = 64 * MIB
    data = pattern(total, 3)
    sent = []

    def handler(conn):
        conn.settimeout(3)  # stop once the whole path is full and stays full
        offset = 0
        try:
            while offset < total:
                offset += conn.send(data[offset:offset + 256 * 1024])
        except socket.timeout:
            pass
        sent.append(offset)
        conn.shutdown(socket.SHUT_WR)

    server = servers(handler)
    proxy = proxies(relay_config(server.port, buffer_limit=limit))
    with connect(proxy, timeout=30) as client:
        peak = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the client reads nothing meanwhile
            peak = max(peak, proxy.metric("sidecar_tcp_buffered_bytes", listener="relay"))
            time.sleep(0.05)
        assert proxy.connections()[0]["buffered_bytes"] <= limit + 256 * 1024
        wait_for(lambda: sent, 10, what="server to stall")
        received = recv_all(client)
    # High watermark plus at most one read chunk (256 KiB) in flight.
    assert 0 < peak <= limit + 256 * 1024, peak
    assert sent[0] < total, "the sender never stalled, so back-pressure did not reach it"
    assert received == data[:sent[0]]


def test_upstream_refusing_resets_the_client_promptly(proxies):
    dead_port = free_port()
    proxy = proxies(relay_config(dead_port))
    began = time.monotonic()
    expect_reset(proxy)
    assert time.monotonic() - began < 2
    assert proxy.metric("sidecar_upstream_connect_failures_total", cluster="backend", reason="refused") == 1
    assert proxy.wait_for_metric("sidecar_tcp_connections_closed_total", 1, listener="relay",
                                 reason="connect_failed") == 1
    assert "upstream connect failed" in proxy.log()


def test_upstream_connect_timeout(proxies):
    # A listener that never accepts, with its accept queue full: the kernel
    # drops further SYNs, so a connect to it hangs until our timeout.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(blackhole.getsockname())
            fillers.append(filler)
        time.sleep(0.1)
        config = relay_config(blackhole.getsockname()[1])
        config["clusters"]["backend"]["connect_timeout"] = "300ms"
        proxy = proxies(config)
        began = time.monotonic()
        expect_reset(proxy)
        elapsed = time.monotonic() - began
        assert 0.25 < elapsed < 2.5, elapsed
        assert proxy.metric("sidecar_upstream_connect_failures_total", cluster="backend", reason="timeout") == 1
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


def test_invalid_reload_is_rejected_whole_and_traffic_continues(proxies, servers):
    server = servers(echo_handler)
    proxy = proxies(relay_config(server.port))
    with connect(proxy) as established:
        established.sendall(b"before")
        assert established.recv(100) == b"before"

        bad = dict(proxy.config, clusters={"backend": {"endpoints": ["127.0.0.1:0"]}})
        status, body = proxy.post_config(bad)
        assert status == 400 and body["applied"] is False
        assert {"path": "clusters.backend.endpoints[0]", "error": "port must be 1..65535, got '0'"} in body["errors"]
        status, body = proxy.post_config("listeners: [unclosed")
        assert status == 400 and "invalid YAML" in body["errors"][0]["error"]

        # SIGHUP re-reads the file; a broken file is rejected the same way.
        proxy.path.write_text("version: 1\nnode: {id: x}\nlisteners: {}\n")
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proxy.metric("sidecar_config_reloads_total", source="sighup", result="rejected") == 1,
                 5, what="SIGHUP rejection counted")

        established.sendall(b"after")
        assert established.recv(100) == b"after"
        with connect(proxy) as fresh:
            fresh.sendall(b"new")
            assert fresh.recv(100) == b"new"
    assert proxy.metric("sidecar_config_reloads_total", source="admin", result="rejected") == 2
    assert proxy.metric("sidecar_config_version") == 1
    status, dump = proxy.get("/config_dump")
    assert b'"last_rejected"' in dump and b"sighup" in dump


def test_connection_keeps_its_snapshot_and_moved_listener_keeps_established(proxies, servers):
    first, second = servers(echo_handler), servers(lambda c: c.sendall(b"second backend") or recv_all(c))
    config = relay_config(first.port)
    config["listeners"]["steady"] = {"address": "127.0.0.1", "port": free_port(), "routes": "main"}
    proxy = proxies(config)
    with connect(proxy) as old_conn, connect(proxy, "steady") as steady_conn:
        old_conn.sendall(b"ping")
        assert old_conn.recv(10) == b"ping"
        moved = dict(config, listeners=dict(config["listeners"],
                                            relay=dict(config["listeners"]["relay"], port=free_port())),
                     clusters={"backend": {"endpoints": [f"127.0.0.1:{second.port}"]}})
        status, body = proxy.post_config(moved)
        assert status == 200 and body["version"] == 2, body
        proxy.config = moved

        # Accepted under snapshot 1: still relayed to the first backend.
        old_conn.sendall(b"still here")
        assert old_conn.recv(20) == b"still here"
        steady_conn.sendall(b"steady")
        assert steady_conn.recv(10) == b"steady"
        by_port = {c["snapshot_version"] for c in proxy.connections()}
        assert by_port == {1}

        with connect(proxy) as new_conn:  # the moved listener, snapshot 2, second backend
            assert new_conn.recv(100) == b"second backend"
        with connect(proxy, "steady") as new_steady:  # unchanged socket, new snapshot's cluster
            assert new_steady.recv(100) == b"second backend"
        old_port = config["listeners"]["relay"]["port"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=2)


def test_flipping_transparent_keeps_the_listening_socket(proxies, servers):
    # transparent changes how the destination is read, not the socket: a
    # reload must not try to rebind the same port (which would fail).
    server = servers(echo_handler)
    proxy = proxies(relay_config(server.port))
    with connect(proxy) as established:
        flipped = dict(proxy.config, listeners={"relay": dict(proxy.config["listeners"]["relay"], transparent=True)})
        status, body = proxy.post_config(flipped)
        assert status == 200, body
        established.sendall(b"same socket")
        assert established.recv(20) == b"same socket"
    with connect(proxy) as fresh:
        fresh.sendall(b"x")
        assert fresh.recv(1) == b"x"


def test_bind_failure_rejects_the_update_and_keeps_the_old_listeners(proxies, servers):
    server = servers(echo_handler)
    proxy = proxies(relay_config(server.port))
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    try:
        config = dict(proxy.config, listeners=dict(proxy.config["listeners"], extra={
            "address": "127.0.0.1", "port": squatter.getsockname()[1], "routes": "main"}))
        status, body = proxy.post_config(config)
        assert status == 400
        assert body["errors"][0]["path"] == "listeners.extra" and "cannot bind" in body["errors"][0]["error"]
    finally:
        squatter.close()
    with connect(proxy) as client:
        client.sendall(b"ok")
        assert client.recv(10) == b"ok"
    assert proxy.metric("sidecar_config_version") == 1


def test_sigterm_lets_an_in_flight_transfer_finish(servers, tmp_path):
    chunks = [pattern(64 << 10, i) for i in range(20)]

    def handler(conn):
        conn.recv(10)
        for chunk in chunks:  # about 1 s of transfer
            conn.sendall(chunk)
            time.sleep(0.05)

    server = servers(handler)
    proxy = Proxy(relay_config(server.port), tmp_path, drain_time_s=10).wait_ready()
    try:
        with connect(proxy) as client:
            client.sendall(b"go")
            first = client.recv(1000)
            proxy.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _ready_status(proxy) == 503, 3, what="readiness to fail")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", proxy.port()), timeout=2)
            rest = recv_all(client)
        assert first + rest == b"".join(chunks)
        assert proxy.proc.wait(10) == 0
        assert "drained" in proxy.log()
    finally:
        proxy.kill()


def test_drain_deadline_resets_what_is_left_and_exits_zero(servers, tmp_path):
    server = servers(echo_handler)
    proxy = Proxy(relay_config(server.port), tmp_path, drain_time_s=0.5).wait_ready()
    try:
        with connect(proxy) as idle_client:
            idle_client.sendall(b"x")
            assert idle_client.recv(1) == b"x"
            began = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            assert proxy.proc.wait(10) == 0
            assert 0.4 < time.monotonic() - began < 5
            with pytest.raises(ConnectionResetError):
                idle_client.recv(1)
        assert "drain time over" in proxy.log()
    finally:
        proxy.kill()


def test_idle_connection_is_closed_after_the_idle_timeout(proxies, servers):
    server = servers(echo_handler)
    proxy = proxies(relay_config(server.port, idle_timeout="400ms"))
    with connect(proxy) as client:
        client.sendall(b"a")
        assert client.recv(1) == b"a"
        began = time.monotonic()
        assert client.recv(1) == b""  # closed by the proxy, cleanly
        elapsed = time.monotonic() - began
    assert 0.35 < elapsed < 1.5, elapsed
    assert proxy.wait_for_metric("sidecar_tcp_connections_closed_total", 1, listener="relay",
                                 reason="idle_timeout") == 1
    assert proxy.metric("sidecar_tcp_connections_active", listener="relay") == 0


def test_busy_connection_is_not_idle(proxies, servers):
    server = servers(echo_handler)
    proxy = proxies(relay_config(server.port, idle_timeout="300ms"))
    with connect(proxy) as client:
        for _ in range(8):  # 0.8 s of traffic, well past one idle timeout
            client.sendall(b"k")
            assert client.recv(1) == b"k"
            time.sleep(0.1)


def test_connections_beyond_the_limit_are_refused(proxies, servers):
    server = servers(echo_handler)
    proxy = proxies(relay_config(server.port, max_connections=2))
    with connect(proxy) as a, connect(proxy) as b:
        for sock in (a, b):
            sock.sendall(b"1")
            assert sock.recv(1) == b"1"
        expect_reset(proxy)
    assert proxy.metric("sidecar_tcp_connections_refused_total", listener="relay", reason="overflow") == 1
    assert proxy.wait_for_metric("sidecar_tcp_connections_closed_total", 1, listener="relay", reason="refused") == 1


def _ready_status(proxy: Proxy) -> int:
    try:
        return proxy.get("/ready")[0]
    except OSError:
        return 0


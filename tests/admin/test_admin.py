"""The admin endpoint of a real proxy process, spoken to over real sockets."""
from __future__ import annotations

import json
import socket
import time

import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from ..support import Proxy, ThreadedServer, echo_handler, free_port, relay_config, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def backend():
    server = ThreadedServer(echo_handler)
    yield server
    server.close()


@pytest.fixture
def proxy(tmp_path, backend):
    p = Proxy(relay_config(backend.port), tmp_path).wait_ready()
    yield p
    assert p.stop() == 0, p.log()
    assert "Traceback" not in p.log(), p.log()


def raw_admin(proxy: Proxy, data: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(proxy.admin, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_ready_live_and_unknown_paths(proxy):
    assert proxy.get("/ready") == (200, b"ready\n")
    assert proxy.get("/live") == (200, b"live\n")
    status, body = proxy.get("/nope")
    assert status == 404 and b"/config_dump" in body


def test_mutations_are_post_only_and_reads_get_only(proxy):
    for path in ("/config", "/drain", "/quitquitquit"):
        status, _, headers = proxy.request("GET", path)
        assert status == 405 and headers["Allow"] == "POST"
    status, _, headers = proxy.request("POST", "/ready")
    assert status == 405 and headers["Allow"] == "GET"
    assert proxy.get("/ready")[0] == 200  # none of that changed anything


def test_metrics_parse_as_prometheus_text_and_openmetrics(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as client:
        client.sendall(b"hi")
        assert client.recv(2) == b"hi"
    wait_for(lambda: proxy.metric("sidecar_tcp_connections_closed_total", listener="relay", reason="normal") == 1, 5,
             what="close counted")
    metrics = proxy.metrics()
    assert metrics[("sidecar_tcp_connections_opened_total", (("listener", "relay"),))] == 1
    assert metrics[("sidecar_tcp_received_bytes_total", (("listener", "relay"),))] == 2
    assert metrics[("sidecar_upstream_connect_duration_seconds_count", (("cluster", "backend"),))] == 1
    assert metrics[("sidecar_config_version", ())] == 1
    assert metrics[("sidecar_ready", ())] == 1
    assert ("process_resident_memory_bytes", ()) in metrics

    status, body, headers = proxy.request("GET", "/metrics",
                                          headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    names = {f.name for f in parse_openmetrics(body.decode())}
    assert {"sidecar_tcp_connections_opened", "sidecar_upstream_connect_duration_seconds"} <= names


def test_server_info_says_which_data_path_runs(proxy):
    from sidecar_proxy import __version__, compiled

    status, body = proxy.get("/server_info")
    info = json.loads(body)
    assert status == 200 and info["version"] == __version__ and info["uptime_s"] >= 0
    assert set(info["modules"]) == set(compiled.MODULES)
    # The proxy decides as this process did: same tree, same environment.
    assert info["data_path"] == compiled.status()["data_path"], info
    assert info["modules"] == compiled.status()["modules"]
    assert "h11" in info["http1_codecs"]
    assert proxy.metrics()[("sidecar_build_info", (("data_path", info["data_path"]), ("version", __version__)))] == 1


def test_config_dump_shows_the_effective_config_and_can_be_posted_back(proxy):
    status, body = proxy.get("/config_dump")
    dump = json.loads(body)
    live = dump["live"]
    assert status == 200 and live["version"] == 1 and live["source"] == "file"
    assert live["config"]["listeners"]["relay"]["idle_timeout"] == "1h"
    assert dump["listeners_bound"]["relay"] == f"127.0.0.1:{proxy.port()}"
    status, result = proxy.post_config(live["config"])
    assert status == 200 and result["version"] == 2
    assert result["digest"] != live["digest"]  # defaults now spelled out, same meaning
    assert json.loads(proxy.get("/config_dump")[1])["live"]["source"] == "admin"


def test_post_config_accepts_yaml_too(proxy):
    status, result = proxy.post_config(yaml.safe_dump(proxy.config))
    assert status == 200 and result["applied"] is True


def test_connections_lists_what_is_open(proxy, backend):
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as client:
        client.sendall(b"abc")
        assert client.recv(3) == b"abc"
        (conn,) = proxy.connections()
        assert conn["listener"] == "relay" and conn["state"] == "established"
        assert conn["upstream"] == f"127.0.0.1:{backend.port}"
        assert conn["downstream"] == f"127.0.0.1:{client.getsockname()[1]}"
        assert conn["rx_bytes"] == 3 and conn["tx_bytes"] == 3
        assert conn["snapshot_version"] == 1
    status, body = proxy.get("/connections?limit=x")
    assert status == 400


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"400"),
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (20 << 10) + b"\r\n\r\n", b"431"),
    (b"POST /config HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"413"),
    (b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     b"400"),
], ids=["garbage", "bad-header-line", "header-too-big", "body-too-big", "cl-and-te"])
def test_malformed_admin_requests_get_a_status_not_a_hang(proxy, request_bytes, status):
    reply = raw_admin(proxy, request_bytes)
    assert reply.split(b" ", 2)[1] == status, reply[:200]
    assert proxy.get("/ready")[0] == 200  # the server is fine afterwards


def test_silent_admin_client_is_cut_off_and_others_are_served(proxy):
    with socket.create_connection(proxy.admin, timeout=15) as silent:
        silent.sendall(b"GET /ready HTTP/1.1\r\n")  # never finishes the head
        assert proxy.get("/ready")[0] == 200
        began = time.monotonic()
        reply = silent.recv(1000)
        assert time.monotonic() - began < 12
        assert reply == b"" or b"408" in reply.split(b"\r\n")[0]


def test_drain_fails_readiness_and_stops_accepting(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as established:
        established.sendall(b"1")
        assert established.recv(1) == b"1"
        status, body, _ = proxy.request("POST", "/drain")
        assert status == 200 and json.loads(body)["active_connections"] == 1
        assert proxy.get("/ready") == (503, b"draining\n")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port()), timeout=2)
        established.sendall(b"2")
        assert established.recv(1) == b"2"  # in flight keeps working
        status, body = proxy.post_config(proxy.config)
        assert status == 503
    assert proxy.metric("sidecar_draining") == 1


def test_quitquitquit_drains_then_exits_zero(tmp_path, backend):
    proxy = Proxy(relay_config(backend.port), tmp_path).wait_ready()
    try:
        status, _, _ = proxy.request("POST", "/quitquitquit")
        assert status == 200
        assert proxy.proc.wait(10) == 0
    finally:
        proxy.kill()


def _take_admin_port(config: dict, port: int) -> None:
    config["admin"]["port"] = port


def _take_listener_port(config: dict, port: int) -> None:
    config["listeners"]["relay"]["port"] = port


@pytest.mark.parametrize("take,message", [
    (_take_admin_port, "cannot bind the admin endpoint"),
    (_take_listener_port, "listeners.relay: cannot bind"),
], ids=["admin", "listener"])
def test_a_port_taken_at_startup_is_a_clear_error(tmp_path, backend, take, message):
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    config = relay_config(backend.port)
    take(config, squatter.getsockname()[1])
    proxy = Proxy(config, tmp_path)
    try:
        assert proxy.proc.wait(15) == 1
        assert message in proxy.log()
        assert "Traceback" not in proxy.log()
    finally:
        proxy.kill()
        squatter.close()


def test_run_with_an_invalid_config_exits_one_with_the_errors(tmp_path):
    config = relay_config(free_port())
    config["listeners"]["relay"]["port"] = 0
    proxy = Proxy(config, tmp_path)
    try:
        assert proxy.proc.wait(15) == 1
        assert "listeners.relay.port: port must be 1..65535" in proxy.log()
    finally:
        proxy.kill()

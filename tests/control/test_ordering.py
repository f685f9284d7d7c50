"""An update that arrives before what it refers to: NACKed, kept, applied with a late ACK."""
from __future__ import annotations

import json
import socket

import pytest
import yaml

from ..support import Proxy, ThreadedServer, free_port, wait_for
from .test_server import ControlServer

pytestmark = pytest.mark.e2e


def banner(name: bytes):
    def handler(conn: socket.socket) -> None:
        conn.sendall(name)
    return handler


def first_bytes(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return sock.recv(16)


def test_route_table_naming_a_cluster_not_yet_sent_is_applied_once_the_cluster_arrives(tmp_path):
    a, b = ThreadedServer(banner(b"A")), ThreadedServer(banner(b"B"))
    files = tmp_path / "resources"
    files.mkdir()
    relay_port = free_port()

    def write(kind: str, resources: list) -> None:
        (files / f"{kind}.yaml").write_text(yaml.safe_dump(resources))

    write("listeners", [{"name": "relay", "address": "127.0.0.1", "port": relay_port, "routes": "main"}])
    write("routes", [{"name": "main", "routes": [{"match": {}, "cluster": "first"}]}])
    write("clusters", [{"name": "first"}])
    write("endpoints", [{"cluster_name": "first", "endpoints": [f"127.0.0.1:{a.port}"]}])
    server = ControlServer(files, tmp_path).start()
    bootstrap = {"version": 1, "node": {"id": "node-1"}, "admin": {"address": "127.0.0.1", "port": free_port()},
                 "control": {"server": f"http://127.0.0.1:{server.port}", "backoff_max": "500ms"}}
    proxy = Proxy(bootstrap, tmp_path / "proxy").wait_ready()
    try:
        assert first_bytes(relay_port) == b"A"

        def control_status() -> dict:
            return json.loads(proxy.get("/config_dump")[1])["control"]["types"]

        # The route table comes first and names a cluster the proxy does not have.
        write("routes", [{"name": "main", "routes": [{"match": {}, "cluster": "second"}]}])
        nack = wait_for(lambda: control_status()["routes"]["last_nack"], 5, what="routes NACKed")
        assert "no cluster named 'second'" in nack["error"]
        assert first_bytes(relay_port) == b"A"  # still on the last good config
        assert server.node_type("routes")["nacked"]["version"] == nack["version"]

        # The cluster arrives: the kept route table now fits and is applied.
        write("clusters", [{"name": "first"}, {"name": "second", "endpoints": [f"127.0.0.1:{b.port}"]}])
        wait_for(lambda: control_status()["routes"]["version"] == nack["version"], 5, what="routes applied")
        assert control_status()["routes"]["pending_version"] is None
        assert first_bytes(relay_port) == b"B"
        # ...and the server hears a (late) ACK for the version it was NACKed.
        wait_for(lambda: server.node_type("routes")["acked"] == nack["version"], 5, what="late ACK")
        assert proxy.metric("sidecar_control_updates_total", type="routes", result="nack") == 1
    finally:
        assert proxy.stop() == 0, proxy.log()
        assert "Traceback" not in proxy.log(), proxy.log()
        server.stop()
        a.close()
        b.close()

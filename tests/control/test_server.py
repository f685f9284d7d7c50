"""The control server as a real process, spoken to over loopback.

The server runs with ``--max-wait-s 1 --poll-interval-s 0.05``: a held poll
is answered 304 after about a second, and a file change reaches a held poll
well within one.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from sidecar_proxy.control import protocol
from sidecar_proxy.control import server as server_module
from sidecar_proxy.control.server import NONCE_HISTORY, Nodes

from ..support import REPO_ROOT, ControlPlane, free_port, wait_for

pytestmark = pytest.mark.e2e

MAX_WAIT_S = 1.0

LISTENERS = [{"name": "local", "address": "127.0.0.1", "port": 15080, "protocol": "tcp", "routes": "to-app"}]
ROUTES = [{"name": "to-app", "routes": [{"match": {}, "cluster": "app"}]}]
CLUSTERS = [{"name": "app", "connect_timeout": "1s"}]
ENDPOINTS = [{"cluster_name": "app", "endpoints": ["127.0.0.1:8080"]}]


def version_of(resources: list) -> str:
    return hashlib.sha256(json.dumps(resources, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


class ControlServer(ControlPlane):
    """The shared harness plus raw protocol exchanges for these tests."""

    def discover(self, kind: str, version: str = "", nonce: str = "", error: str | None = None,
                 node: str = "node-1") -> tuple[int, protocol.DiscoveryResponse | None]:
        req = protocol.DiscoveryRequest(kind, node, version, nonce, error)
        status, body = self.request("POST", protocol.DISCOVERY_PATH.format(kind),
                                    json.dumps(req.to_json()).encode(), timeout=MAX_WAIT_S + 5)
        if status == 304:
            assert body == b""
            return status, None
        assert status == 200, (status, body)
        return status, protocol.DiscoveryResponse.from_json(kind, json.loads(body))

    def node_type(self, kind: str, node: str = "node-1") -> dict:
        return super().node_type(kind, node)

    def wait_polling(self, kind: str, node: str = "node-1") -> None:
        def polling():
            return self.node_type(kind, node).get("polling")
        wait_for(polling, 3, 0.02, f"a held {kind} poll")


def write(directory: Path, kind: str, resources) -> None:
    text = resources if isinstance(resources, str) else yaml.safe_dump(resources)
    (directory / f"{kind}.yaml").write_text(text)


@pytest.fixture
def files(tmp_path) -> Path:
    directory = tmp_path / "resources"
    directory.mkdir()
    write(directory, "listeners", LISTENERS)
    write(directory, "routes", ROUTES)
    write(directory, "clusters", CLUSTERS)
    (directory / "endpoints.yaml").write_text(json.dumps(ENDPOINTS))  # JSON is YAML too
    return directory


@pytest.fixture
def server(files, tmp_path):
    s = ControlServer(files, tmp_path, max_wait=MAX_WAIT_S).start()
    yield s
    assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log(), s.log()


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def test_first_request_gets_every_type_with_its_version(server):
    expected = {"listeners": LISTENERS, "routes": ROUTES, "clusters": CLUSTERS, "endpoints": ENDPOINTS}
    for kind, resources in expected.items():
        status, resp = server.discover(kind)
        assert status == 200
        assert resp.version_info == version_of(resources)
        assert resp.resources == resources
        assert resp.nonce
    types = server.status()["types"]
    assert {k: (v["version"], v["resources"], v["error"]) for k, v in types.items()} == {
        k: (version_of(r), 1, None) for k, r in expected.items()}


def test_missing_file_is_an_empty_list(files, tmp_path):
    (files / "endpoints.yaml").unlink()
    s = ControlServer(files, tmp_path, max_wait=MAX_WAIT_S).start()
    try:
        status, resp = s.discover("endpoints")
        assert (status, resp.resources, resp.version_info) == (200, [], version_of([]))
    finally:
        assert s.stop() == 0


def test_current_version_is_held_then_304_and_the_ack_is_recorded(server):
    _, first = server.discover("clusters")
    started = time.monotonic()
    status, _ = server.discover("clusters", first.version_info, first.nonce)
    elapsed = time.monotonic() - started
    assert status == 304
    assert MAX_WAIT_S - 0.1 <= elapsed < MAX_WAIT_S + 1.5
    record = server.node_type("clusters")
    assert record == {**record, "sent": first.version_info, "acked": first.version_info, "nacked": None,
                      "polling": False}


def test_a_file_change_wakes_a_held_poll_with_the_new_version(server, files, pool):
    _, first = server.discover("endpoints")
    held = pool.submit(server.discover, "endpoints", first.version_info, first.nonce)
    server.wait_polling("endpoints")
    changed = [{"cluster_name": "app", "endpoints": ["127.0.0.1:8080", "127.0.0.1:8081"]}]
    write(files, "endpoints", changed)
    started = time.monotonic()
    status, resp = held.result(timeout=MAX_WAIT_S + 5)
    assert time.monotonic() - started < 1.0
    assert status == 200
    assert resp.version_info == version_of(changed) != first.version_info
    assert resp.resources == changed
    assert server.node_type("endpoints")["sent"] == resp.version_info


def test_an_unchanged_rewrite_pushes_nothing(server, files, pool):
    _, first = server.discover("listeners")
    held = pool.submit(server.discover, "listeners", first.version_info, first.nonce)
    server.wait_polling("listeners")
    # The same content, written differently: other key order, flow style, a comment.
    (files / "listeners.yaml").write_text(
        "# same listeners\n- {routes: to-app, protocol: tcp, port: 15080, address: 127.0.0.1, name: local}\n")
    assert held.result(timeout=MAX_WAIT_S + 5) == (304, None)
    assert server.status()["types"]["listeners"]["version"] == first.version_info
    assert "content unchanged" in server.log()


def test_a_nack_is_recorded_and_the_rejected_version_is_not_resent(server, files, pool):
    _, first = server.discover("routes")
    # A NACK: the client runs nothing yet (version_info ""), rejects first's version.
    started = time.monotonic()
    status, _ = server.discover("routes", "", first.nonce, error="route_tables.to-app[0].cluster: no cluster")
    assert status == 304 and time.monotonic() - started >= MAX_WAIT_S - 0.1  # held, not re-sent
    nacked = server.node_type("routes")["nacked"]
    assert nacked["version"] == first.version_info
    assert nacked["error"] == "route_tables.to-app[0].cluster: no cluster"
    assert nacked["at"] > 0
    # Still NACKing: answered only once the files change.
    held = pool.submit(server.discover, "routes", "", first.nonce, "still bad")
    server.wait_polling("routes")
    fixed = [{"name": "to-app", "routes": [{"match": {}, "cluster": "app2"}]}]
    write(files, "routes", fixed)
    status, resp = held.result(timeout=MAX_WAIT_S + 5)
    assert status == 200 and resp.version_info == version_of(fixed) and resp.resources == fixed
    assert server.node_type("routes")["nacked"]["error"] == "still bad"
    assert "NACK" in server.log()


def test_bad_requests(server):
    path = protocol.DISCOVERY_PATH.format("clusters")
    status, body = server.request("POST", path, b"{not json")
    assert status == 400 and b"invalid JSON" in body
    status, body = server.request("POST", path, b"[]")
    assert status == 400 and b"JSON object" in body
    status, body = server.request("POST", path, b'{"node": {}}')
    assert status == 400 and b"node.id is required" in body
    status, body = server.request("POST", path, json.dumps(
        {"node": {"id": "n"}, "type_url": protocol.TYPE_URLS["routes"]}).encode())
    assert status == 400 and b"does not match the path" in body
    status, body = server.request("POST", path, json.dumps({"node": {"id": "n" * 300}}).encode())
    assert status == 400 and b"longer than" in body
    assert server.request("POST", "/v3/discovery:secrets", b'{"node": {"id": "n"}}')[0] == 404
    assert server.request("GET", path)[0] == 405
    assert server.status()["nodes"] == {}


@pytest.mark.parametrize("broken, error", [
    ("- name: app\n  connect_timeout: [1s\n", "invalid YAML"),
    ("name: app\n", "must be a list"),
    ("- app\n", "[0] must be an object"),
])
def test_a_broken_file_keeps_the_old_version(server, files, broken, error):
    _, first = server.discover("clusters")
    (files / "clusters.yaml").write_text(broken)
    wait_for(lambda: server.status()["types"]["clusters"]["error"], 3, 0.02, "the file error on /status")
    clusters = server.status()["types"]["clusters"]
    assert error in clusters["error"] and clusters["version"] == first.version_info
    _, again = server.discover("clusters")
    assert (again.version_info, again.resources) == (first.version_info, CLUSTERS)
    fixed = [{"name": "app", "connect_timeout": "2s"}]
    write(files, "clusters", fixed)
    wait_for(lambda: server.status()["types"]["clusters"]["version"] == version_of(fixed), 3, 0.02, "the fix")
    assert server.status()["types"]["clusters"]["error"] is None


def test_sigterm_answers_held_polls_and_exits_promptly(files, tmp_path, pool):
    s = ControlServer(files, tmp_path, max_wait=MAX_WAIT_S).start()
    _, first = s.discover("clusters")
    held = pool.submit(s.discover, "clusters", first.version_info, first.nonce)
    s.wait_polling("clusters")
    started = time.monotonic()
    assert s.stop(timeout=2) == 0, s.log()
    assert time.monotonic() - started < 2
    try:
        status, _ = held.result(timeout=2)
        assert status == 304
    except (ConnectionError, http.client.HTTPException):
        pass  # closed instead of answered is allowed too
    assert "Traceback" not in s.log()


def test_bad_dir_or_bad_file_at_start_exits_1(tmp_path, files):
    missing = subprocess.run([sys.executable, "-m", "sidecar_proxy", "control-server", "--dir",
                              str(tmp_path / "nope"), "--port", str(free_port())],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    assert missing.returncode == 1 and "not a directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    (files / "routes.yaml").write_text("- [\n")
    broken = subprocess.run([sys.executable, "-m", "sidecar_proxy", "control-server", "--dir", str(files),
                             "--port", str(free_port())], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    assert broken.returncode == 1 and "routes.yaml" in broken.stderr and "invalid YAML" in broken.stderr
    assert "Traceback" not in broken.stderr


# --- the bookkeeping alone ------------------------------------------------------------------------


def test_nonce_history_and_node_memory_are_bounded():
    nodes = Nodes(ttl=600, max_nodes=3)
    record, seen = nodes.observe(protocol.DiscoveryRequest("clusters", "a"), now=0)
    assert seen == ""
    for i in range(NONCE_HISTORY + 10):
        nodes.sent(record, f"nonce-{i}", f"v{i}")
    assert len(record.sent) == NONCE_HISTORY and record.last_sent == f"v{NONCE_HISTORY + 9}"
    # A NACK names the rejected version through its nonce, even when version_info says otherwise.
    _, seen = nodes.observe(protocol.DiscoveryRequest("clusters", "a", "v0", "nonce-20", "bad"), now=1)
    assert seen == "v20" and record.nacked == {"version": "v20", "error": "bad", "at": 1}
    # An unknown nonce: fall back to what the client runs.
    _, seen = nodes.observe(protocol.DiscoveryRequest("clusters", "a", "v0", "nonce-0", "bad"), now=1)
    assert seen == "v0" and record.nacked["version"] is None
    for name in "bcd":
        nodes.observe(protocol.DiscoveryRequest("clusters", name), now=2)
    assert list(nodes.nodes) == ["b", "c", "d"]  # the least recently seen went first
    nodes.observe(protocol.DiscoveryRequest("clusters", "b"), now=700)
    assert nodes.sweep(now=700) == 2 and list(nodes.nodes) == ["b"]


def test_a_same_size_rewrite_within_one_timestamp_tick_is_still_seen(tmp_path):
    # Coarse file timestamps: the rewrite keeps mtime, size and inode. Within
    # RECHECK_WINDOW_S of the mtime the content is compared anyway.
    path = tmp_path / "endpoints.yaml"
    path.write_text('- {cluster_name: app, endpoints: ["127.0.0.1:8080"]}\n')
    stat = path.stat()
    now = [stat.st_mtime_ns / 1e9]
    source = server_module.FileSource("endpoints", path, clock=lambda: now[0])
    assert source.poll() is True
    first = source.version
    with open(path, "r+") as f:  # same inode, same size
        f.write('- {cluster_name: app, endpoints: ["127.0.0.1:8081"]}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now[0] += 0.5
    assert source.poll() is True and source.version != first
    now[0] += server_module.RECHECK_WINDOW_S  # long after the last write: stat alone decides
    assert source.poll() is False

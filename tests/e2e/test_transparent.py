"""Transparent interception, end to end, in real network namespaces.

An app in the pod namespace connects to a server in the remote namespace.
A hand-written NAT rule in the pod (as a sidecar injector would install)
redirects the app's connections to port 8080 into the proxy's transparent
listener; the proxy recovers the original destination with SO_ORIGINAL_DST and
connects there itself. The proxy runs as group 1337, which the rule exempts,
so its own upstream connection is not redirected back into itself.
"""

from __future__ import annotations

import contextlib

import pytest

from ..support import round_trip_upper
from .netns import POD_V4, POD_V6, REMOTE_V4, REMOTE_V6, connect_from, run_in

pytestmark = pytest.mark.e2e

PROXY_GID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
APP_PORT = 8080  # redirected to the proxy by the rule
UNMATCHED_PORT = 9090  # not matched by the rule: must go direct

TRANSPARENT_CONFIG = {
    "version": 1,
    "node": {"id": "pod-under-test"},
    "admin": {"address": "127.0.0.1", "port": ADMIN_PORT},
    "listeners": {
        "outbound": {"address": "0.0.0.0", "port": OUTBOUND_PORT, "transparent": True,
                     "protocol": "tcp", "routes": "out"},
        "outbound6": {"address": "::", "port": OUTBOUND_PORT, "transparent": True,
                      "protocol": "tcp", "routes": "out"},
    },
    "clusters": {"original-destination": {"original_destination": True}},
    "route_tables": {"out": [{"match": {}, "cluster": "original-destination"}]},
}

# (remote address, pod address, proxy listener that receives the redirected connection)
FAMILIES = [
    pytest.param(REMOTE_V4, POD_V4, "outbound", id="ipv4"),
    pytest.param(REMOTE_V6, POD_V6, "outbound6", id="ipv6"),
]

REFUSED_TIMEOUT_S = 5.0


def endpoint(host: str, port: int) -> str:
    """An address the way the admin API writes it: ``h:p``, ``[h6]:p``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def redirect_app_port(pod: str) -> None:
    """Send the pod's outgoing TCP to the remote's APP_PORT into the proxy, both families."""
    for tool, remote in (("iptables", REMOTE_V4), ("ip6tables", REMOTE_V6)):
        run_in(pod, [tool, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", remote,
                     "--dport", str(APP_PORT),
                     "-m", "owner", "!", "--gid-owner", str(PROXY_GID),
                     "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT)])


def probe_answer(namespace: str, host: str, port: int) -> bytes:
    """Connect, send a probe and return what comes back before the connection ends.

    A reset counts as nothing back; it can even arrive before connect() returns.
    Raises TimeoutError if the connection neither answers nor closes in time.
    """
    try:
        with contextlib.closing(connect_from(namespace, host, port, timeout=REFUSED_TIMEOUT_S)) as sock:
            sock.sendall(b"ping")
            return sock.recv(64)
    except (ConnectionResetError, BrokenPipeError):
        return b""


@pytest.fixture
def proxy(netns_pair, start_proxy):
    """The proxy running transparently in the pod, behind the redirect rule."""
    redirect_app_port(netns_pair.pod)
    return start_proxy(TRANSPARENT_CONFIG, gid=PROXY_GID)


@pytest.mark.parametrize("remote, pod, listener", FAMILIES)
def test_redirected_connection_reaches_original_destination(
    netns_pair, proxy, start_upper_server, remote, pod, listener
):
    server = start_upper_server(netns_pair.remote, remote, APP_PORT)
    with contextlib.closing(connect_from(netns_pair.pod, remote, APP_PORT)) as app:
        round_trip_upper(app, b"hello through the sidecar")
        app_host, app_port = app.getsockname()[:2]

        connections = proxy.connections()
        relayed = [c for c in connections if c["original_destination"] == endpoint(remote, APP_PORT)]
        assert len(relayed) == 1, f"expected one relayed connection, /connections has {connections}"
        entry = relayed[0]
        assert entry["listener"] == listener
        assert entry["downstream"] == endpoint(app_host, app_port)
        assert entry["upstream"] == endpoint(remote, APP_PORT)
        assert entry["cluster"] == "original-destination"
        assert entry["state"] == "established"
        # Each direction has carried the payload once.
        assert entry["rx_bytes"] >= len(b"hello through the sidecar")
        assert entry["tx_bytes"] >= len(b"hello through the sidecar")

    peers = server.wait_for_peers(1)
    assert len(peers) == 1, f"server saw {peers}"
    peer_host, peer_port = peers[0]
    assert peer_host == pod, "upstream connection should come from the pod's address"
    # A different source port than the app's: the proxy's own connection, not the app's.
    assert peer_port != app_port


@pytest.mark.parametrize(
    "target, listener",
    [
        pytest.param(POD_V4, "outbound", id="pod-ipv4"),
        pytest.param("127.0.0.1", "outbound", id="loopback-ipv4"),
        pytest.param(POD_V6, "outbound6", id="pod-ipv6"),
        pytest.param("::1", "outbound6", id="loopback-ipv6"),
    ],
)
def test_connection_to_own_listener_is_refused_as_redirect_loop(
    netns_pair, proxy, target, listener
):
    # Not matched by the rule, so the original destination is the listener itself:
    # relaying it would make the proxy connect to itself, again and again.
    try:
        answer = probe_answer(netns_pair.pod, target, OUTBOUND_PORT)
    except TimeoutError:
        pytest.fail(f"connection to the proxy's own listener still open after {REFUSED_TIMEOUT_S}s")
    assert answer == b"", f"a looping connection got bytes back: {answer!r}"

    labels = {"listener": listener, "reason": "redirect_loop"}
    refused = proxy.wait_for_metric("sidecar_tcp_connections_refused_total", 1, **labels)
    assert refused == 1, f"sidecar_tcp_connections_refused_total{labels} is {refused}"
    assert proxy.connections() == []


@pytest.mark.parametrize("remote", [pytest.param(REMOTE_V4, id="ipv4"), pytest.param(REMOTE_V6, id="ipv6")])
def test_unmatched_port_goes_direct(netns_pair, proxy, start_upper_server, remote):
    server = start_upper_server(netns_pair.remote, remote, UNMATCHED_PORT)
    with contextlib.closing(connect_from(netns_pair.pod, remote, UNMATCHED_PORT)) as app:
        round_trip_upper(app, b"straight to the server")
        app_address = app.getsockname()[:2]
        assert proxy.connections() == []

    # The server's peer is the app's own socket: nothing sat in between.
    assert server.wait_for_peers(1) == [app_address]

"""Two pods whose sidecars talk mTLS to each other while both apps speak plaintext (issue 7).

Pod A and pod B are the two ends of ``netns_pair`` (A = ``pod``, B =
``remote``), joined by a veth pair::

    pod A 10.222.0.1                                         pod B 10.222.0.2
    curl / raw socket --plaintext--> A sidecar :15001 ==mTLS==> B sidecar :15006 --plaintext--> HTTP app :8080
                        (nat REDIRECT)         (outbound)   (nat REDIRECT)     (inbound)          TCP app  :9000

Each pod is set up as a real one is: ``python3 -m sidecar_proxy init-iptables
--verify`` run inside its namespace (redirect mode), then the real proxy as
group 1337 (the group the rules exempt) with the pod's transparent listeners,
``outbound`` on 15001 and ``inbound`` on 15006, both ``protocol: auto``. Both
pods have the same config apart from their certificate and the identity they
expect of the other: the outbound catch-all route goes to an
``original_destination`` cluster with ``tls: {mode: mutual, peer_identity}``,
and the inbound listener is ``tls: {mode: strict}`` with its catch-all route
to an ``original_destination`` cluster (the app, at the address and port the
client dialled). Certificates come from ``sidecar_proxy.tls.certs``: one CA,
``spiffe://cluster.local/ns/a/sa/client`` for A and
``spiffe://cluster.local/ns/b/sa/server`` for B.

What is checked:

* curl in A gets B's HTTP app's answer, and a raw TCP socket in A gets an
  upper-casing round trip from B's TCP app; every byte either app received is
  plaintext (one canonical HTTP request; exactly the TCP bytes sent), and it
  came from B's own address (B's sidecar), never from A.
* On the wire: a packet socket on B's end of the veth records every TCP
  segment between the pods. Each connection starts with a TLS handshake
  record and none of the marker strings the apps exchanged ever appears;
  B counts the handshakes as terminated (``result="ok"``) and lists the
  connection with A's SPIFFE ID, A counts them as originated.
* The negative: a process in A running as the sidecar's group (so A's rules
  let it bypass A's sidecar) dials B's app ports in plaintext. B's strict
  inbound refuses it (reset, nothing back, ``result="plaintext"``), neither app
  sees a connection, A's sidecar never saw it, and the same packet socket does
  see its marker on the wire (the control that proves the tap would have
  caught plaintext in the first test).
"""
from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from sidecar_proxy.tls import certs

from ..support import Proxy, pattern, recv_exactly, require_tools
from . import netns
from .netns import POD_V4 as A_V4, POD_V6 as A_V6, REMOTE_V4 as B_V4, REMOTE_V6 as B_V6, connect_from, run_in
from .test_http_transparent import curl_in
from .test_interception import assert_verified, init_ok

pytestmark = pytest.mark.e2e

PROXY_GID = 1337
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HTTP_PORT = 8080
TCP_PORT = 9000  # not one of the default opaque_ports: sniffed like any other

TRUST_DOMAIN = "cluster.local"
A_ID = f"spiffe://{TRUST_DOMAIN}/ns/a/sa/client"
B_ID = f"spiffe://{TRUST_DOMAIN}/ns/b/sa/server"

# Strings the apps exchange: they must never be seen between the pods except
# in the rogue's deliberately plaintext connection.
HTTP_MARKER = "plaintext-http-marker-7f3a"
TCP_MARKER = b"plaintext-tcp-marker-c91e"
ROGUE_MARKER = b"rogue-plaintext-marker-55d0"

TLS_HANDSHAKE_RECORD = b"\x16\x03"  # content type handshake, major version 3
WAIT_S = 5.0

REQUIRED_TOOLS = ("iptables", "ip6tables", "iptables-save", "ip6tables-save", "setpriv", "curl")


# --- the pods ----------------------------------------------------------------------------------


def write_identity(directory: Path, ca: certs.Issued, spiffe_id: str) -> dict:
    """The workload's certificate files, and the top-level ``tls`` section pointing at them."""
    certs.write_workload(directory, certs.issue_workload(ca, spiffe_id), [ca.trust_anchor])
    return {"cert_chain": str(directory / certs.CERT_FILE), "private_key": str(directory / certs.KEY_FILE),
            "trust_bundle": str(directory / certs.BUNDLE_FILE)}


def pod_config(name: str, tls: dict, peer_id: str) -> dict:
    """A pod's sidecar: mTLS out to ``peer_id`` wherever the app dials, strict mTLS in, to the app."""
    def listener(port: int, routes: str, **extra) -> dict:
        return {"address": "0.0.0.0", "port": port, "transparent": True, "protocol": "auto",
                "routes": routes, **extra}

    return {
        "version": 1,
        "node": {"id": f"pod-{name}"},
        "admin": {"address": "127.0.0.1", "port": ADMIN_PORT},
        "tls": tls,
        "listeners": {
            "outbound": listener(OUTBOUND_PORT, "outbound"),
            "inbound": listener(INBOUND_PORT, "inbound", tls={"mode": "strict"}),
        },
        "clusters": {
            "mesh": {"original_destination": True, "connect_timeout": "2s",
                     "tls": {"mode": "mutual", "peer_identity": [peer_id]}},
            "local-app": {"original_destination": True, "connect_timeout": "2s"},
        },
        "route_tables": {
            "outbound": [{"match": {}, "cluster": "mesh"}],
            "inbound": [{"match": {}, "cluster": "local-app"}],
        },
    }


# --- the apps in B -----------------------------------------------------------------------------


@dataclass
class AppConnection:
    peer: tuple[str, int]
    data: bytearray = field(default_factory=bytearray)  # every byte the app received, in order
    requests: list[dict] = field(default_factory=list)  # HTTP: what h11 parsed
    ended: threading.Event = field(default_factory=threading.Event)


class AppServer:
    """B's application: plaintext HTTP/1.1 (h11) or a TCP upper-caser; records every byte it receives.

    (conftest's UpperServer records only its peers; the checks here need the bytes.)
    """

    def __init__(self, namespace: str, host: str, port: int, kind: str) -> None:
        assert kind in ("http", "upper")
        self.kind = kind
        with netns.entered(namespace):
            self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.2)  # the accept loop notices stop()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._connections: list[AppConnection] = []
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    @property
    def connections(self) -> list[AppConnection]:
        with self._lock:
            return list(self._connections)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            sock.settimeout(10)
            conn = AppConnection(peer=peer[:2])
            thread = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            with self._lock:
                self._connections.append(conn)
                self._socks.append(sock)
                self._threads.append(thread)
            thread.start()

    def _recv(self, sock: socket.socket, conn: AppConnection) -> bytes:
        data = sock.recv(65536)
        with self._lock:
            conn.data += data
        return data

    def _serve(self, sock: socket.socket, conn: AppConnection) -> None:
        try:
            if self.kind == "upper":
                while data := self._recv(sock, conn):
                    sock.sendall(data.upper())
            else:
                self._http(sock, conn)
        except (OSError, h11.ProtocolError):
            pass
        finally:
            conn.ended.set()
            sock.close()

    def _http(self, sock: socket.socket, conn: AppConnection) -> None:
        h = h11.Connection(h11.SERVER)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(self._recv(sock, conn))
            elif isinstance(event, h11.ConnectionClosed):
                return
            elif isinstance(event, h11.Request):
                request = {"method": event.method.decode(), "target": event.target.decode(),
                           "headers": {k.decode(): v.decode() for k, v in event.headers}}
            elif isinstance(event, h11.EndOfMessage):
                with self._lock:
                    conn.requests.append(request)
                body = f"b's app saw {request['method']} {request['target']}\n".encode()
                sock.sendall(h.send(h11.Response(status_code=200, headers=[
                    ("content-type", "text/plain"), ("content-length", str(len(body)))])))
                sock.sendall(h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
                if h.our_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        for thread in threads:
            thread.join(timeout=2)


# --- the wire between the pods -----------------------------------------------------------------

_ETH_P_ALL = 0x0003
_ETH_P_IP = 0x0800
_SOL_PACKET = 263
_SO_RCVBUFFORCE = 33  # not in Python's socket module
_PACKET_STATISTICS = 6
_TAP_MAX_BYTES = 32 << 20


class WireTap:
    """Every IPv4 TCP segment on one end of the veth pair, reassembled per direction of each connection.

    A packet socket (AF_PACKET) bound to ``eth0`` inside B's namespace sees
    each frame as it crosses between the pods, before any iptables rule or
    the proxy touches it. Segments are appended in capture order (a veth pair
    neither reorders nor loses them); the kernel's drop counter is checked so
    that a marker can't go unseen because a frame was dropped.
    """

    def __init__(self, namespace: str, interface: str = netns.VETH) -> None:
        with netns.entered(namespace):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            self._sock.bind((interface, 0))  # the name is looked up in B's namespace
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 8 << 20)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, int, str, int], bytearray] = {}
        self._total = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    frame = self._sock.recv(1 << 18)  # a GSO super-frame can be up to 64 KiB
                except TimeoutError:
                    if self._stop.is_set():
                        return  # nothing left queued
                    continue
                self._record(frame)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _record(self, frame: bytes) -> None:
        if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != _ETH_P_IP:
            return
        ip = frame[14:]
        ihl, proto = (ip[0] & 0x0F) * 4, ip[9]
        total_length = struct.unpack_from("!H", ip, 2)[0]
        if proto != socket.IPPROTO_TCP:
            return
        tcp = ip[ihl:total_length]
        if len(tcp) < 20:
            return
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload:
            return
        key = (socket.inet_ntoa(ip[12:16]), struct.unpack_from("!H", tcp, 0)[0],
               socket.inet_ntoa(ip[16:20]), struct.unpack_from("!H", tcp, 2)[0])
        with self._lock:
            if self._total + len(payload) > _TAP_MAX_BYTES:
                raise AssertionError(f"the tap saw over {_TAP_MAX_BYTES} bytes: more traffic than this test makes")
            self._streams.setdefault(key, bytearray()).extend(payload)
            self._total += len(payload)

    def streams(self) -> dict[tuple[str, int, str, int], bytes]:
        """{(src, sport, dst, dport): the TCP payload sent that way}; waits until the queue is drained."""
        self.stop()
        with self._lock:
            return {key: bytes(data) for key, data in self._streams.items()}

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5)
            assert not self._thread.is_alive(), "the wire tap did not stop"
            _packets, drops = struct.unpack("II", self._sock.getsockopt(_SOL_PACKET, _PACKET_STATISTICS, 8))
            self._sock.close()
            assert self.error is None, f"the wire tap failed: {self.error!r}"
            assert drops == 0, f"the wire tap dropped {drops} frames: its record is incomplete"


# --- the rogue ---------------------------------------------------------------------------------

# Runs inside A as the sidecar's group: A's rules let it go straight out, as
# they do the sidecar's own connections. Prints what happened as JSON.
ROGUE_SCRIPT = r"""
import json, os, socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
sock = socket.create_connection((host, port), timeout=5)
local = sock.getsockname()[:2]
received, outcome = b"", None
try:
    sock.sendall(payload)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            outcome = "closed"
            break
        received += chunk
except (ConnectionResetError, BrokenPipeError):
    outcome = "reset"
except TimeoutError:
    outcome = "timeout"
print(json.dumps({"gid": os.getegid(), "local": local, "outcome": outcome, "received": received.hex()}))
"""


def rogue_dial(namespace: str, host: str, port: int, payload: bytes) -> dict:
    out = run_in(namespace, ["setpriv", f"--regid={PROXY_GID}", "--clear-groups", sys.executable, "-c",
                             ROGUE_SCRIPT, host, str(port), payload.hex()], timeout=15)
    return json.loads(out)


# --- fixtures ----------------------------------------------------------------------------------


@dataclass
class Mesh:
    a: str  # namespace names
    b: str
    proxy_a: Proxy
    proxy_b: Proxy
    http_app: AppServer
    tcp_app: AppServer
    tap: WireTap


@pytest.fixture
def mesh(netns_pair, start_proxy, tmp_path):
    require_tools(*REQUIRED_TOOLS)
    a, b = netns_pair.pod, netns_pair.remote
    # A default route each way, as real pods have (--verify dials an address
    # that needs one); the two namespaces forward nothing.
    for namespace, gateway_v4, gateway_v6 in ((a, B_V4, B_V6), (b, A_V4, A_V6)):
        run_in(namespace, ["ip", "-4", "route", "add", "default", "via", gateway_v4])
        run_in(namespace, ["ip", "-6", "route", "add", "default", "via", gateway_v6])
        assert_verified(init_ok(namespace, "--verify"))

    ca = certs.make_ca(TRUST_DOMAIN)
    a_tls = write_identity(tmp_path / "certs-a", ca, A_ID)
    b_tls = write_identity(tmp_path / "certs-b", ca, B_ID)
    proxy_a = start_proxy(pod_config("a", a_tls, peer_id=B_ID), gid=PROXY_GID)
    proxy_b = start_proxy(pod_config("b", b_tls, peer_id=A_ID), gid=PROXY_GID, namespace=b)

    servers: list[AppServer] = []
    tap = None
    try:
        http_app = AppServer(b, B_V4, HTTP_PORT, "http")
        servers.append(http_app)
        tcp_app = AppServer(b, B_V4, TCP_PORT, "upper")
        servers.append(tcp_app)
        tap = WireTap(b)
        yield Mesh(a, b, proxy_a, proxy_b, http_app, tcp_app, tap)
    finally:
        for server in servers:
            server.stop()
        if tap is not None:
            with contextlib.suppress(AssertionError):  # the test has reported what it needed
                tap.stop()


def flows(streams: dict, port: int) -> list[tuple[tuple, bytes, bytes]]:
    """Connections from A to B's ``port``: (key, bytes A sent, bytes B sent back)."""
    out = []
    for key, sent in streams.items():
        src, sport, dst, dport = key
        if (src, dst, dport) == (A_V4, B_V4, port):
            out.append((key, sent, streams.get((dst, dport, src, sport), b"")))
    return out


# --- 1. plaintext apps, mTLS between the sidecars ------------------------------------------------


def test_plaintext_apps_talk_through_mutual_tls_between_the_sidecars(mesh, tmp_path):
    # HTTP: curl in A (root, group 0: intercepted) to B's app, as if there were no mesh.
    target = f"/{HTTP_MARKER}?q=1"
    status, fields, body = curl_in(mesh.a, f"http://{B_V4}:{HTTP_PORT}{target}", tmp_path)
    assert (status, body) == (200, f"b's app saw GET {target}\n".encode()), fields

    http_conns = mesh.http_app.connections
    assert len(http_conns) == 1, http_conns
    (http_conn,) = http_conns
    # The app's peer is B's sidecar (B's own address), never A.
    assert http_conn.peer[0] == B_V4, http_conn.peer
    # Plaintext: one request head, as a plain HTTP server expects it.
    assert bytes(http_conn.data).startswith(f"GET {target} HTTP/1.1\r\n".encode()), bytes(http_conn.data)
    assert [(r["method"], r["target"]) for r in http_conn.requests] == [("GET", target)]
    headers = http_conn.requests[0]["headers"]
    assert headers["host"] == f"{B_V4}:{HTTP_PORT}", headers
    assert A_V4 in headers.get("x-forwarded-for", ""), headers

    # TCP: a raw socket in A (also intercepted) to B's upper-caser; several
    # exchanges, the last one spanning many TLS records.
    payloads = [b"\x00\x01 opaque hello " + TCP_MARKER, b"second exchange, " + TCP_MARKER,
                pattern(256 << 10, seed=7)]
    with contextlib.closing(connect_from(mesh.a, B_V4, TCP_PORT)) as sock:
        for payload in payloads:
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload.upper()
        local = sock.getsockname()[:2]

        # While it is open: A relays it to B's address through the mesh
        # cluster; B lists it as a TLS connection from A's sidecar, with A's ID.
        a_entries = [c for c in mesh.proxy_a.connections() if c["downstream"] == f"{local[0]}:{local[1]}"]
        assert len(a_entries) == 1, mesh.proxy_a.connections()
        assert a_entries[0]["listener"] == "outbound", a_entries
        assert a_entries[0]["original_destination"] == f"{B_V4}:{TCP_PORT}", a_entries
        assert a_entries[0]["cluster"] == "mesh", a_entries
        b_entries = [c for c in mesh.proxy_b.connections()
                     if c["original_destination"] == f"{B_V4}:{TCP_PORT}"]
        assert len(b_entries) == 1, mesh.proxy_b.connections()
        b_entry = b_entries[0]
        assert b_entry["listener"] == "inbound", b_entry
        assert b_entry["peer_identity"] == A_ID, b_entry
        assert b_entry["tls"] in ("TLSv1.3", "TLSv1.2"), b_entry
        assert b_entry["downstream"].startswith(f"{A_V4}:"), b_entry
        assert b_entry["cluster"] == "local-app", b_entry
        assert b_entry["upstream"] == f"{B_V4}:{TCP_PORT}", b_entry
    tcp_conns = mesh.tcp_app.connections
    assert len(tcp_conns) == 1, tcp_conns
    (tcp_conn,) = tcp_conns
    assert tcp_conn.ended.wait(WAIT_S), "the close did not reach B's TCP app"
    assert tcp_conn.peer[0] == B_V4, tcp_conn.peer
    assert bytes(tcp_conn.data) == b"".join(payloads), "B's TCP app did not receive exactly the bytes A's app sent"

    # The handshakes, counted on both sides: one pooled HTTP connection, one TCP connection.
    assert mesh.proxy_b.metric("sidecar_tls_terminations_total", listener="inbound", result="ok") == 2
    assert mesh.proxy_a.metric("sidecar_tls_originations_total", cluster="mesh", result="ok") == 2
    assert mesh.proxy_b.metric("sidecar_tls_terminations_total", listener="inbound", result="plaintext") == 0

    # On the wire: TLS from the first byte, and no marker anywhere, either way.
    streams = mesh.tap.streams()
    for port in (HTTP_PORT, TCP_PORT):
        port_flows = flows(streams, port)
        assert len(port_flows) == 1, f"expected one connection A -> B:{port} on the wire: {list(streams)}"
        key, sent, answered = port_flows[0]
        assert sent.startswith(TLS_HANDSHAKE_RECORD), f"{key}: A's side did not start with a TLS record: {sent[:64]!r}"
        assert answered.startswith(TLS_HANDSHAKE_RECORD), f"{key}: B's side did not answer TLS: {answered[:64]!r}"
    for key, data in streams.items():
        for marker in (HTTP_MARKER.encode(), TCP_MARKER, payloads[2][:64]):
            assert marker not in data, f"{key}: plaintext between the pods: {marker!r}"


# --- 2. a plaintext peer that bypasses its sidecar is refused ------------------------------------


def test_strict_inbound_refuses_plaintext_that_bypassed_the_client_sidecar(mesh):
    requests = {
        HTTP_PORT: b"GET /" + ROGUE_MARKER + b" HTTP/1.1\r\nHost: b\r\n\r\n",
        TCP_PORT: b"\x00\x01 " + ROGUE_MARKER,
    }
    for count, (port, payload) in enumerate(requests.items(), 1):
        result = rogue_dial(mesh.a, B_V4, port, payload)
        assert result["gid"] == PROXY_GID, result
        assert result["outcome"] in ("reset", "closed"), f"B:{port} did not refuse the rogue: {result}"
        assert result["received"] == "", f"B:{port} answered the rogue: {bytes.fromhex(result['received'])!r}"
        refused = mesh.proxy_b.wait_for_metric("sidecar_tls_terminations_total", count, timeout=WAIT_S,
                                               listener="inbound", result="plaintext")
        assert refused == count, f"B:{port}: the refusal was not counted as plaintext"

    # Not one byte reached either app; A's sidecar never saw the rogue.
    time.sleep(0.2)  # a connection the sidecar would wrongly relay would be accepted by now
    assert mesh.http_app.connections == [] and mesh.tcp_app.connections == []
    assert mesh.proxy_b.metric("sidecar_tls_terminations_total", listener="inbound", result="ok") == 0
    assert mesh.proxy_a.metric("sidecar_tcp_connections_opened_total", listener="outbound") == 0
    assert mesh.proxy_a.metric("sidecar_tls_originations_total", cluster="mesh", result="ok") == 0

    # The control for test 1's wire check: this plaintext was on the wire, from A straight to B's app port.
    streams = mesh.tap.streams()
    for port, payload in requests.items():
        port_flows = flows(streams, port)
        assert len(port_flows) == 1, f"expected the rogue's connection A -> B:{port} on the wire: {list(streams)}"
        key, sent, answered = port_flows[0]
        assert sent == payload, f"{key}: the tap recorded {sent!r}"
        assert answered == b"", f"{key}: B sent {answered!r}"

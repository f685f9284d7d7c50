"""Outbound origination: client_handshake on uvloop against plain ``ssl`` servers and our own terminator."""
import asyncio
import datetime as dt
import socket
import ssl
import threading
import time

import pytest
import uvloop
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from sidecar_proxy.tls import contexts
from sidecar_proxy.tls.handshake import HandshakeFailed, client_handshake
from sidecar_proxy.tls.identity import WorkloadIdentity

from . import pki
from .harness import TLSServer
from .pki import NOW, TD, Spec, key_usage, make, make_ca

H = dt.timedelta(hours=1)
SERVER_ID = f"spiffe://{TD}/ns/prod/sa/payments"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"


class SslServer:
    """A blocking ``ssl`` server thread: handshake, record the client's certificate, echo."""

    def __init__(self, ctx: ssl.SSLContext | None, greeting: bytes | None = None) -> None:
        self.ctx = ctx
        self.greeting = greeting
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.peers: list = []  # the client's DER certificate, or the handshake exception
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            if self.ctx is None:  # not TLS at all
                if self.greeting is not None:
                    conn.sendall(self.greeting)
                self.stop.wait(3)
                return
            try:
                s = self.ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.peers.append(exc)
                return
            with s:
                self.peers.append(s.getpeercert(True))
                try:
                    while data := s.recv(4096):
                        s.sendall(data)
                except (ssl.SSLError, OSError):
                    pass


class Receiver(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.data.done():
            self.data.set_result(data)

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture(scope="module")
def pkix():
    root = make_ca("root")
    bundle = pki.pem(root.cert)
    me = make(Spec(uris=(CLIENT_ID,)), root)
    identity = WorkloadIdentity.from_pem(me.chain_pem(), me.key_pem(), bundle, now=time.time())
    return {"root": root, "bundle": bundle, "identity": identity, "client_ctx": contexts.client_context(identity),
            "server": make(Spec(uris=(SERVER_ID,)), root)}


def originate(port: int, ctx: ssl.SSLContext, expected, *, timeout: float = 2.0, payload: bytes = b"ping"):
    """client_handshake on a fresh uvloop; returns (Established fields, echoed bytes) or the HandshakeFailed."""
    async def main():
        loop = asyncio.get_running_loop()
        proto = Receiver()
        try:
            est = await client_handshake(loop, "127.0.0.1", port, proto, ctx, expected=expected, timeout=timeout)
        except HandshakeFailed as exc:
            return exc
        est.transport.write(payload)
        try:
            echoed = await asyncio.wait_for(proto.data, 5)
        finally:
            est.transport.close()
        return est, echoed

    return uvloop.run(main())


@pytest.mark.parametrize("expected", [
    SERVER_ID, f"spiffe://{TD}/ns/prod/*", f"spiffe://{TD}/ns/prod/sa/pay*", "*",
    [f"spiffe://{TD}/ns/other", f"spiffe://{TD}/ns/prod/sa/payments"],
])
def test_server_identity_matches(pkix, expected):
    with SslServer(pki.server_ssl_context(pkix["bundle"], pkix["server"])) as srv:
        result = originate(srv.port, pkix["client_ctx"], expected)
        assert not isinstance(result, Exception), result
        est, echoed = result
        assert echoed == b"ping"
        assert est.peer.spiffe_id == SERVER_ID and est.peer.trust_domain == TD
        assert est.alpn == "h2" and est.version == "TLSv1.3"
        # The server saw our workload certificate.
        deadline = time.monotonic() + 5
        while not srv.peers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(srv.peers[0], bytes)
        from cryptography import x509
        from sidecar_proxy.tls.identity import spiffe_id_of
        assert spiffe_id_of(x509.load_der_x509_certificate(srv.peers[0])) == CLIENT_ID


@pytest.mark.parametrize("expected", [
    f"spiffe://{TD}/ns/prod/sa/orders", f"spiffe://{TD}/ns/dev/*", "spiffe://other.test/*",
    f"spiffe://{TD}/ns/prod/sa/payments/v2", [f"spiffe://{TD}/ns/prod/sa/pay"],
])
def test_server_identity_mismatch(pkix, expected):
    with SslServer(pki.server_ssl_context(pkix["bundle"], pkix["server"])) as srv:
        result = originate(srv.port, pkix["client_ctx"], expected)
        assert isinstance(result, HandshakeFailed) and result.reason == "identity_mismatch", result
        assert SERVER_ID in result.detail


@pytest.mark.parametrize("spec, reason", [
    (Spec(uris=(SERVER_ID,), not_before=NOW - 3 * H, not_after=NOW - H), "expired"),
    (Spec(uris=(SERVER_ID,), eku=(EKU.CLIENT_AUTH,)), "bad_purpose"),
    (Spec(uris=(SERVER_ID,), ca=True, ku=key_usage("digital_signature", "key_cert_sign")), "ca_as_leaf"),
    (Spec(uris=(), dns=("payments.mesh.test",)), "no_spiffe_id"),
    (Spec(uris=(SERVER_ID, f"spiffe://{TD}/ns/prod/sa/admin")), "multiple_uri_sans"),
    (Spec(uris=(SERVER_ID,), eku=(EKU.SERVER_AUTH,)), None),  # serverAuth alone is right for a server
])
def test_bad_server_certificates(pkix, spec, reason):
    server_cert = make(spec, pkix["root"])
    with SslServer(pki.server_ssl_context(pkix["bundle"], server_cert)) as srv:
        result = originate(srv.port, pkix["client_ctx"], "*")
        if reason is None:
            assert not isinstance(result, Exception), result
        else:
            assert isinstance(result, HandshakeFailed) and result.reason == reason, result


def test_server_of_another_mesh(pkix):
    stranger = make(Spec(uris=(SERVER_ID,)), make_ca("root"))  # same names, another key
    with SslServer(pki.server_ssl_context(pki.pem(stranger.cert), stranger)) as srv:
        result = originate(srv.port, pkix["client_ctx"], "*")
        assert isinstance(result, HandshakeFailed) and result.reason == "unknown_ca"


def test_server_refuses_our_certificate(pkix):
    other = make_ca("other root")
    server_cert = make(Spec(uris=(SERVER_ID,)), pkix["root"])
    # The server trusts another CA only: it refuses us with an alert.
    server_ctx = pki.server_ssl_context(pki.pem(other.cert), server_cert)
    server_ctx.load_verify_locations(cadata=pki.pem(other.cert).decode())
    ctx12 = contexts.client_context(pkix["identity"])
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with SslServer(server_ctx) as srv:
        result = originate(srv.port, ctx12, "*")
        assert isinstance(result, HandshakeFailed) and result.reason == "peer_rejected", result


def test_connect_failure_is_not_a_tls_failure(pkix):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ConnectionRefusedError):
            originate(port, pkix["client_ctx"], "*")


def test_silent_server_times_out(pkix):
    with SslServer(None) as srv:
        began = time.monotonic()
        result = originate(srv.port, pkix["client_ctx"], "*", timeout=0.3)
        assert isinstance(result, HandshakeFailed) and result.reason == "handshake_timeout"
        assert time.monotonic() - began < 2


def test_plaintext_server(pkix):
    with SslServer(None, greeting=b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n") as srv:
        result = originate(srv.port, pkix["client_ctx"], "*")
        assert isinstance(result, HandshakeFailed) and result.reason == "protocol_error", result


def test_server_that_speaks_first(pkix):
    """A plaintext server greeting at once (SMTP-like): its bytes can arrive before start_tls.

    uvloop starts reading after connection_made even when it paused there, so
    the greeting used to be dropped and the handshake waited for its timeout.
    An in-loop server writes in its own connection_made, which lands in that
    window every time.
    """
    class Greeter(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"220 mail.example ESMTP\r\n")

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Greeter, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        reasons = []
        try:
            for _ in range(10):
                t0 = loop.time()
                with pytest.raises(HandshakeFailed) as info:
                    await client_handshake(loop, "127.0.0.1", port, asyncio.Protocol(), pkix["client_ctx"],
                                           expected="*", timeout=2.0)
                reasons.append((info.value.reason, loop.time() - t0 < 1.0))
        finally:
            srv.close()
        return reasons

    assert uvloop.run(main()) == [("protocol_error", True)] * 10


def test_both_ends_ours(pkix):
    """client_handshake to server_handshake: mTLS both ways, each side sees the other's SPIFFE ID."""
    server_identity = WorkloadIdentity.from_pem(pkix["server"].chain_pem(), pkix["server"].key_pem(),
                                                pkix["bundle"], now=time.time())
    server_ctx = contexts.server_context(server_identity)
    with TLSServer(lambda: server_ctx) as srv:
        result = originate(srv.port, pkix["client_ctx"], f"spiffe://{TD}/ns/prod/*", payload=b"who")
        assert not isinstance(result, Exception), result
        est, echoed = result
        assert est.peer.spiffe_id == SERVER_ID and est.alpn == "h2"
        assert echoed.split(b" ")[0] == CLIENT_ID.encode()  # the server's view of us
        outcome = srv.next_outcome()
        assert outcome.reason is None and outcome.spiffe_id == CLIENT_ID and outcome.alpn == "h2"

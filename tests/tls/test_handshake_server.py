"""Strict inbound mTLS: real handshakes through server_handshake on uvloop, one per certificate.

Each client is a plain ``ssl`` client in the test thread; the server is the
harness (accept, sniff the ClientHello, server_handshake with the bytes the
sniffer read). Every certificate is made here with ``cryptography``
(tests/tls/pki.py). TLS 1.3 and 1.2 both run: with 1.3 the client finishes
before the server judges its certificate, with 1.2 it does not, and the
server must give the same reason either way.
"""
import datetime as dt
import socket
import ssl
import time

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from sidecar_proxy.tls import contexts
from sidecar_proxy.tls.identity import WorkloadIdentity

from . import pki
from .harness import TLSServer, tls_client
from .pki import NOW, TD, Spec, key_usage, make, make_ca

H = dt.timedelta(hours=1)
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
VERSIONS = {"tls13": None, "tls12": ssl.TLSVersion.TLSv1_2}


@pytest.fixture(scope="module")
def pkix():
    root = make_ca("root")
    inter = make_ca("intermediate", issuer=root, path_length=0)
    expired_inter = make_ca("old intermediate", issuer=root, path_length=0,
                            not_before=NOW - 10 * H, not_after=NOW - H)
    server = make(Spec(uris=(f"spiffe://{TD}/ns/default/sa/server",)), root)
    bundle = pki.pem(root.cert)
    identity = WorkloadIdentity.from_pem(server.chain_pem(), server.key_pem(), bundle, now=time.time())
    no_chain = make(Spec(), inter)
    no_chain.chain = ()
    certs = {
        # name: (client certificate, reason or None for accepted)
        "valid": (make(Spec(), root), None),
        "expired": (make(Spec(not_before=NOW - 3 * H, not_after=NOW - H), root), "expired"),
        "not_yet_valid": (make(Spec(not_before=NOW + H, not_after=NOW + 3 * H), root), "not_yet_valid"),
        "wrong_ca": (make(Spec(), make_ca("some other mesh")), "unknown_ca"),
        "wrong_ca_same_name": (make(Spec(), make_ca("root")), "unknown_ca"),
        "self_signed_leaf": (make(Spec()), "unknown_ca"),
        "no_san": (make(Spec(uris=None), root), "no_spiffe_id"),
        "dns_san_only": (make(Spec(uris=(), dns=("client.mesh.test",)), root), "no_spiffe_id"),
        "two_uri_sans": (make(Spec(uris=(CLIENT_ID, f"spiffe://{TD}/ns/default/sa/other")), root),
                         "multiple_uri_sans"),
        "non_spiffe_uri": (make(Spec(uris=("https://client.mesh.test/",)), root), "no_spiffe_id"),
        "bad_spiffe_syntax": (make(Spec(uris=(f"spiffe://{TD}/ns//sa",)), root), "bad_spiffe_id"),
        "upper_case_trust_domain": (make(Spec(uris=("spiffe://Mesh.Test/ns/a",)), root), "bad_spiffe_id"),
        "spiffe_id_with_port": (make(Spec(uris=(f"spiffe://{TD}:443/ns/a",)), root), "bad_spiffe_id"),
        "ca_cert_as_leaf": (make(Spec(ca=True, ku=key_usage("digital_signature", "key_cert_sign")), root),
                            "ca_as_leaf"),
        "trust_anchor_as_leaf": (root, "bad_purpose"),
        "key_usage_key_agreement_only": (make(Spec(ku=key_usage("key_agreement")), root), "bad_key_usage"),
        "key_usage_key_encipherment_only": (make(Spec(ku=key_usage("key_encipherment")), root), "bad_purpose"),
        "eku_server_auth_only": (make(Spec(eku=(EKU.SERVER_AUTH,)), root), "bad_purpose"),
        "no_key_usage_no_eku": (make(Spec(ku=None, eku=None), root), None),
        "intermediate_chained": (make(Spec(), inter), None),
        "intermediate_missing": (no_chain, "unknown_ca"),
        "intermediate_expired": (make(Spec(), expired_inter), "expired"),  # the leaf itself is in date
        "rsa_2048": (make(Spec(key_kind="rsa"), root), None),
    }
    return {"root": root, "bundle": bundle, "identity": identity, "certs": certs}


@pytest.fixture(scope="module")
def server(pkix):
    ctx = contexts.server_context(pkix["identity"])
    with TLSServer(lambda: ctx) as srv:
        yield srv


def test_the_matrix_has_at_least_twelve_certificates(pkix):
    assert len(pkix["certs"]) >= 12
    assert {None, "expired", "not_yet_valid", "unknown_ca", "no_spiffe_id", "multiple_uri_sans", "bad_spiffe_id",
            "ca_as_leaf", "bad_key_usage", "bad_purpose"} <= {r for _, r in pkix["certs"].values()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", [
    "valid", "expired", "not_yet_valid", "wrong_ca", "wrong_ca_same_name", "self_signed_leaf", "no_san",
    "dns_san_only", "two_uri_sans", "non_spiffe_uri", "bad_spiffe_syntax", "upper_case_trust_domain",
    "spiffe_id_with_port", "ca_cert_as_leaf", "trust_anchor_as_leaf", "key_usage_key_agreement_only",
    "key_usage_key_encipherment_only", "eku_server_auth_only", "no_key_usage_no_eku", "intermediate_chained",
    "intermediate_missing", "intermediate_expired", "rsa_2048",
])
def test_client_certificate_matrix(pkix, server, name, version):
    cert, reason = pkix["certs"][name]
    server.drain()
    before = server.counts[reason or "accepted"]
    answer = tls_client(server.port, pki.client_ssl_context(pkix["bundle"], cert, max_version=VERSIONS[version]))
    outcome = server.next_outcome()
    assert outcome.reason == reason, (name, outcome)
    assert server.counts[reason or "accepted"] == before + 1
    if reason is None:
        assert answer == b"ping"  # the echo: application data flows after the checks
        assert outcome.spiffe_id == CLIENT_ID
        assert outcome.version == ("TLSv1.3" if version == "tls13" else "TLSv1.2")
        assert outcome.early_bytes > 0  # the sniffer's ClientHello bytes were replayed into TLS
    else:
        # Refused: not one byte of application data came back.
        assert answer == b"" or isinstance(answer, Exception), answer
    assert server.stray == []


@pytest.mark.parametrize("version", VERSIONS)
def test_client_without_a_certificate(pkix, server, version):
    server.drain()
    tls_client(server.port, pki.client_ssl_context(pkix["bundle"], None, max_version=VERSIONS[version]))
    assert server.next_outcome().reason == "no_client_cert"


def test_allow_list_on_the_connection(pkix):
    ctx = contexts.server_context(pkix["identity"])
    root = pkix["root"]
    with TLSServer(lambda: ctx, expected=[f"spiffe://{TD}/ns/prod/*"]) as srv:
        prod = make(Spec(uris=(f"spiffe://{TD}/ns/prod/sa/web",)), root)
        dev = make(Spec(uris=(f"spiffe://{TD}/ns/dev/sa/web",)), root)
        assert tls_client(srv.port, pki.client_ssl_context(pkix["bundle"], prod)) == b"ping"
        assert srv.next_outcome().spiffe_id == f"spiffe://{TD}/ns/prod/sa/web"
        answer = tls_client(srv.port, pki.client_ssl_context(pkix["bundle"], dev))
        assert answer == b"" or isinstance(answer, Exception)
        assert srv.next_outcome().reason == "identity_mismatch"


@pytest.mark.parametrize("offer, chosen", [
    (["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1"), (["h2"], "h2"), (["spdy/3"], None), (None, None)])
def test_alpn(pkix, server, offer, chosen):
    server.drain()
    ctx = pki.client_ssl_context(pkix["bundle"], pkix["certs"]["valid"][0])
    if offer is not None:
        ctx.set_alpn_protocols(offer)
    assert tls_client(server.port, ctx) == b"ping"
    assert server.next_outcome().alpn == chosen


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_old_protocol_versions_and_weak_suites_are_refused(pkix, server):
    cert = pkix["certs"]["valid"][0]
    server.drain()
    old = pki.client_ssl_context(pkix["bundle"], cert)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    tls_client(server.port, old)
    assert server.next_outcome().reason == "unsupported_version"
    # TLS 1.2 with only non-forward-secret or non-AEAD suites.
    for suites in ("AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA"):
        weak = pki.client_ssl_context(pkix["bundle"], cert, max_version=ssl.TLSVersion.TLSv1_2)
        weak.set_ciphers(suites)
        tls_client(server.port, weak)
        assert server.next_outcome().reason == "no_shared_cipher", suites


def test_no_session_resumption(pkix, server):
    cert = pkix["certs"]["valid"][0]
    for version in VERSIONS.values():
        ctx = pki.client_ssl_context(pkix["bundle"], cert, max_version=version)
        server.drain()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            session = s.session
        assert server.next_outcome().reason is None
        assert session is None or not session.has_ticket  # no TLS 1.2 or 1.3 tickets issued
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, session=session) as s:
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            assert not s.session_reused  # a full handshake, the client certificate checked again
        assert server.next_outcome().reason is None


def test_plaintext_to_the_strict_terminator(server):
    server.drain()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100) == b""
    assert server.next_outcome().reason == "plaintext"


def _client_hello(bundle: bytes, cert) -> bytes:
    """The bytes a real ssl client sends first."""
    ctx = pki.client_ssl_context(bundle, cert)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("early, pause", [(1, 0.05), (5, 0.05), (40, 0.05), (1, 0.0)])
def test_early_bytes_of_any_length_then_the_socket(pkix, early, pause, use_uvloop):
    """The terminator read only a prefix of the ClientHello; the rest arrives later on the socket.

    Also on the stdlib loop, whose start_tls works the same way (see handshake.py).
    """
    ctx = contexts.server_context(pkix["identity"])
    with TLSServer(lambda: ctx, early_limit=early, use_uvloop=use_uvloop) as srv:
        hello = _client_hello(pkix["bundle"], pkix["certs"]["valid"][0])
        assert len(hello) > early
        # A real client too, with its ClientHello split across writes.
        client_ctx = pki.client_ssl_context(pkix["bundle"], pkix["certs"]["valid"][0])
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = client_ctx.wrap_bio(incoming, outgoing)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.settimeout(5)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            first = outgoing.read()
            s.sendall(first[:early])
            time.sleep(pause)  # 0.05: the server upgrades with exactly `early` bytes; 0: the rest races in
            s.sendall(first[early:])
            _pump_handshake(obj, s, incoming, outgoing)
            obj.write(b"hi")
            s.sendall(outgoing.read())
            assert _read_app(obj, s, incoming) == b"hi"
        outcome = srv.next_outcome()
        assert outcome.reason is None
        assert outcome.early_bytes == early if pause else outcome.early_bytes >= early


def _pump_handshake(obj, sock, incoming, outgoing):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            obj.do_handshake()
            sock.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "server closed during the handshake"
            incoming.write(data)
    raise AssertionError("handshake did not finish")


def _read_app(obj, sock, incoming):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            return obj.read(100)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            assert data, "server closed"
            incoming.write(data)
    raise AssertionError("no application data")


def test_handshake_timeout_and_close_mid_handshake(pkix):
    ctx = contexts.server_context(pkix["identity"])
    hello = _client_hello(pkix["bundle"], pkix["certs"]["valid"][0])
    with TLSServer(lambda: ctx, early_limit=10, timeout=0.3) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(hello[:20])  # and then nothing
            began = time.monotonic()
            outcome = srv.next_outcome()
            assert outcome.reason == "handshake_timeout"
            assert time.monotonic() - began < 2
            s.settimeout(5)
            with pytest.raises((ConnectionResetError, AssertionError)):
                assert s.recv(10) != b""  # the server closed (or reset) it
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(hello[:20])
            time.sleep(0.05)
        assert srv.next_outcome().reason == "connection_closed"


def test_no_local_identity_refuses_the_handshake(pkix):
    with TLSServer(lambda: None) as srv:
        answer = tls_client(srv.port, pki.client_ssl_context(pkix["bundle"], pkix["certs"]["valid"][0]))
        assert isinstance(answer, Exception)
        assert srv.next_outcome().reason == "no_local_identity"


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
@pytest.mark.parametrize("client_id, accepted", [(CLIENT_ID, True), (f"spiffe://{TD}/ns/dev/sa/x", False)])
def test_data_sent_with_the_finished_message(pkix, use_uvloop, client_id, accepted):
    """The client's first application data in the same segment as its Finished.

    The stdlib loop hands such data to the protocol in the very call that
    completes the handshake, before any peer check could run: it must be
    held, then replayed in order to an accepted peer's protocol, and dropped
    (with no callback at all) for a refused one.
    """
    ctx = contexts.server_context(pkix["identity"])
    cert = make(Spec(uris=(client_id,)), pkix["root"])
    with TLSServer(lambda: ctx, use_uvloop=use_uvloop, expected=[CLIENT_ID]) as srv:
        client_ctx = pki.client_ssl_context(pkix["bundle"], cert)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = client_ctx.wrap_bio(incoming, outgoing)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.settimeout(5)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            s.sendall(outgoing.read())
            while True:  # until the client's side is done; then Finished + data leave in one send
                data = s.recv(65536)
                assert data
                incoming.write(data)
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    s.sendall(outgoing.read())
            obj.write(b"first")
            obj.write(b"second")
            s.sendall(outgoing.read())
            outcome = srv.next_outcome()
            if accepted:
                assert outcome.reason is None
                assert _read_app(obj, s, incoming) in (b"first", b"firstsecond")
            else:
                assert outcome.reason == "identity_mismatch"
                time.sleep(0.1)
        if accepted:
            deadline = time.monotonic() + 5
            while b"".join(srv.received) != b"firstsecond" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert b"".join(srv.received) == b"firstsecond"  # all of it, in order
        else:
            assert srv.received == []
        assert srv.stray == []

"""certs (the builders), identity (our files, the peer's leaf) and contexts (settings, error mapping)."""
import datetime as dt
import ssl
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from sidecar_proxy.tls import certs, contexts
from sidecar_proxy.tls.identity import IdentityError, WorkloadIdentity, check_peer, spiffe_id_of
from sidecar_proxy.tls.reasons import REASONS, TLSRejected

from . import pki
from .pki import NOW, TD, Spec, key_usage, make, make_ca

UTC = dt.timezone.utc
WID = "spiffe://example.org/ns/shop/sa/cart"


@pytest.fixture(scope="module")
def ca():
    return certs.make_ca("example.org")


def _ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


# --- certs

def test_mesh_ca(ca):
    cert = ca.cert
    assert cert.issuer == cert.subject
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org"]
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)
    assert certs.trust_domain_of(cert) == "example.org"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=365, minutes=6)


def test_rsa_ca_and_bad_arguments():
    rsa_ca = certs.make_ca("rsa.test", key_type="rsa-2048", days=2)
    assert isinstance(rsa_ca.key, rsa.RSAPrivateKey) and rsa_ca.key.key_size == 2048
    with pytest.raises(ValueError, match="unknown key type"):
        certs.make_ca("x.test", key_type="dsa")
    with pytest.raises(ValueError, match="lower case"):
        certs.make_ca("Example.org")
    with pytest.raises(ValueError, match="no path"):
        certs.make_ca("example.org/ns")


def test_workload_certificate(ca):
    now = dt.datetime.now(UTC).replace(microsecond=0)
    w = certs.issue_workload(ca, WID, now=now)
    cert = w.cert
    cert.verify_directly_issued_by(ca.cert)
    assert w.chain == () and w.trust_anchor is ca.cert  # signed by the root: nothing to send along
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    assert set(_ext(cert, x509.ExtendedKeyUsage).value) == {EKU.SERVER_AUTH, EKU.CLIENT_AUTH}
    assert spiffe_id_of(cert) == WID
    assert cert.not_valid_before_utc == now - certs.BACKDATE
    assert cert.not_valid_after_utc == now + dt.timedelta(hours=24)
    assert isinstance(w.key, ec.EllipticCurvePrivateKey)


def test_workload_lifetime_is_cut_to_the_ca(ca):
    short_ca = certs.make_ca("example.org", days=1)
    w = certs.issue_workload(short_ca, WID, ttl=dt.timedelta(days=7))
    assert w.cert.not_valid_after_utc == short_ca.cert.not_valid_after_utc
    with pytest.raises(ValueError, match="not in the CA's trust domain"):
        certs.issue_workload(ca, "spiffe://other.org/ns/a")
    with pytest.raises(ValueError, match="empty segment"):
        certs.issue_workload(ca, "spiffe://example.org/a//b")
    with pytest.raises(ValueError, match="no certificate"):
        certs.issue_workload(ca, WID, now=dt.datetime.now(UTC) + dt.timedelta(days=400))


def test_intermediate_chain(ca):
    inter = certs.make_intermediate(ca)
    assert _ext(inter.cert, x509.BasicConstraints).value.path_length == 0
    assert inter.chain == () and inter.root is ca.cert
    w = certs.issue_workload(inter, WID, key_type="rsa-2048")
    assert w.chain == (inter.cert,) and w.trust_anchor is ca.cert
    w.cert.verify_directly_issued_by(inter.cert)
    identity = WorkloadIdentity.from_pem(certs.cert_pem(w.full_chain), certs.key_pem(w.key),
                                         certs.cert_pem(ca.cert), now=time.time())
    assert identity.spiffe_id == WID and len(identity.chain) == 2


def test_files_and_modes(tmp_path, ca):
    inter = certs.make_intermediate(ca)
    written = certs.write_ca(tmp_path / "ica", inter)
    assert [p.name for p in written] == ["ca.pem", "ca-key.pem", "ca-chain.pem"]
    assert stat.S_IMODE((tmp_path / "ica" / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ica" / "ca.pem").stat().st_mode) == 0o644
    back, bundle = certs.read_ca(tmp_path / "ica")
    assert back.cert == inter.cert and back.root == ca.cert and bundle == [ca.cert]
    w = certs.issue_workload(back, WID)
    certs.write_workload(tmp_path / "w", w, bundle)
    assert stat.S_IMODE((tmp_path / "w" / "key.pem").stat().st_mode) == 0o600
    assert list(tmp_path.glob("w/.*")) == []  # no temporary files left behind
    identity = WorkloadIdentity.load(tmp_path / "w" / "cert.pem", tmp_path / "w" / "key.pem",
                                     tmp_path / "w" / "bundle.pem", now=time.time())
    assert identity.spiffe_id == WID and identity.leaf == w.cert


# --- our own identity

def _from(c: pki.Cert, bundle: bytes, now: float | None = None, key: bytes | None = None) -> WorkloadIdentity:
    return WorkloadIdentity.from_pem(c.chain_pem(), key or c.key_pem(), bundle, now=now or time.time())


@pytest.fixture(scope="module")
def root():
    return make_ca("root")


@pytest.mark.parametrize("case, reason", [
    ("valid", None), ("no_san", "no_spiffe_id"), ("two_uris", "multiple_uri_sans"), ("bad_syntax", "bad_spiffe_id"),
    ("ca_leaf", "ca_as_leaf"), ("expired", "expired"), ("not_yet_valid", "not_yet_valid"),
    ("other_ca", "untrusted"), ("missing_intermediate", "untrusted"), ("expired_intermediate", "expired"),
    ("key_mismatch", "key_mismatch"),
])
def test_workload_identity_checks(root, case, reason):
    h = dt.timedelta(hours=1)
    bundle = pki.pem(root.cert)
    inter = make_ca("i", issuer=root, path_length=0)
    old_inter = make_ca("old", issuer=root, not_before=NOW - 10 * h, not_after=NOW - h)
    key = None
    if case == "valid":
        c = make(Spec(), inter)
    elif case == "no_san":
        c = make(Spec(uris=None), root)
    elif case == "two_uris":
        c = make(Spec(uris=(f"spiffe://{TD}/a", f"spiffe://{TD}/b")), root)
    elif case == "bad_syntax":
        c = make(Spec(uris=(f"spiffe://{TD}/a/",)), root)
    elif case == "ca_leaf":
        c = make(Spec(ca=True), root)
    elif case == "expired":
        c = make(Spec(not_before=NOW - 3 * h, not_after=NOW - h), root)
    elif case == "not_yet_valid":
        c = make(Spec(not_before=NOW + h, not_after=NOW + 3 * h), root)
    elif case == "other_ca":
        c = make(Spec(), make_ca("root"))
    elif case == "missing_intermediate":
        c = make(Spec(), inter)
        c.chain = ()
    elif case == "expired_intermediate":
        c = make(Spec(), old_inter)  # the leaf itself is within its dates
        with pytest.raises(IdentityError, match="old.*expired") as info:
            _from(c, bundle)
        assert info.value.reason == "expired"
        return
    elif case == "key_mismatch":
        c = make(Spec(), root)
        key = make(Spec(), root).key_pem()
    _expect(lambda: _from(c, bundle, key=key), reason)


def _expect(fn, reason):
    if reason is None:
        assert fn().spiffe_id.startswith("spiffe://")
        return
    with pytest.raises(IdentityError) as info:
        fn()
    assert info.value.reason == reason, info.value


def test_unreadable_inputs(root):
    c = make(Spec(), root)
    bundle = pki.pem(root.cert)
    encrypted = c.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"secret"))
    for chain, key, bund in [(b"", c.key_pem(), bundle), (c.chain_pem()[:-40], c.key_pem(), bundle),
                             (c.chain_pem(), b"garbage", bundle), (c.chain_pem(), encrypted, bundle),
                             (c.chain_pem(), c.key_pem(), b"")]:
        with pytest.raises(IdentityError) as info:
            WorkloadIdentity.from_pem(chain, key, bund, now=time.time())
        assert info.value.reason == "unreadable"
    with pytest.raises(IdentityError, match="No such file") as info:
        WorkloadIdentity.load("/nonexistent/cert.pem", "/nonexistent/key.pem", "/nonexistent/b.pem")
    assert info.value.reason == "unreadable"


def test_identity_digest_and_expiry(root):
    c = make(Spec(), root)
    bundle = pki.pem(root.cert)
    a, b = _from(c, bundle), _from(c, bundle)
    assert a.digest == b.digest and a.trust_domain == TD
    assert a.not_after == c.cert.not_valid_after_utc.timestamp()
    assert a.bundle_not_after == root.cert.not_valid_after_utc.timestamp()
    assert not a.expired(a.not_after) and a.expired(a.not_after + 1)


# --- the peer's leaf

def test_check_peer_rules(root):
    good = make(Spec(), root)
    der = good.cert.public_bytes(serialization.Encoding.DER)
    t = time.time()
    peer = check_peer(der, t)
    assert peer.spiffe_id == f"spiffe://{TD}/ns/default/sa/client" and peer.trust_domain == TD
    assert peer.serial == good.cert.serial_number
    # Validity bounds are inclusive, as in OpenSSL.
    assert check_peer(der, good.cert.not_valid_after_utc.timestamp()).spiffe_id == peer.spiffe_id
    assert check_peer(der, good.cert.not_valid_before_utc.timestamp()).spiffe_id == peer.spiffe_id

    def reason(spec_or_der, now=t, role="client"):
        d = spec_or_der if isinstance(spec_or_der, bytes) else make(spec_or_der, root).cert.public_bytes(
            serialization.Encoding.DER)
        with pytest.raises(TLSRejected) as info:
            check_peer(d, now, role)
        assert info.value.reason in REASONS
        return info.value.reason

    assert reason(der, now=good.cert.not_valid_after_utc.timestamp() + 1) == "expired"
    assert reason(der, now=good.cert.not_valid_before_utc.timestamp() - 1) == "not_yet_valid"
    assert reason(Spec(eku=(EKU.SERVER_AUTH,))) == "bad_eku"
    assert reason(Spec(eku=(EKU.CLIENT_AUTH,)), role="server") == "bad_eku"
    assert check_peer(make(Spec(eku=(EKU.SERVER_AUTH,)), root).cert.public_bytes(serialization.Encoding.DER), t,
                      "server")
    assert reason(Spec(ku=key_usage("digital_signature", "key_cert_sign"))) == "bad_key_usage"
    assert reason(Spec(ku=key_usage("key_agreement"))) == "bad_key_usage"
    assert reason(Spec(ca=True)) == "ca_as_leaf"
    assert reason(Spec(uris=None)) == "no_spiffe_id"
    assert reason(Spec(uris=("urn:uuid:1234",))) == "no_spiffe_id"
    assert reason(Spec(uris=(f"spiffe://{TD}/a", "https://x/"))) == "multiple_uri_sans"
    assert reason(Spec(uris=(f"spiffe://{TD}/a?b",))) == "bad_spiffe_id"
    # The first broken rule in the documented order wins, whatever the extension order.
    assert reason(Spec(ca=True, ku=key_usage("key_agreement"), eku=(EKU.SERVER_AUTH,))) == "ca_as_leaf"
    assert reason(Spec(ku=key_usage("key_agreement"), eku=(EKU.SERVER_AUTH,), uris=None)) == "bad_key_usage"
    assert reason(Spec(eku=(EKU.SERVER_AUTH,), uris=None)) == "bad_eku"
    assert reason(b"\x30\x03garbage") == "bad_certificate"
    assert reason(b"") == "no_client_cert"


# --- contexts

def test_context_settings(root):
    ident = _from(make(Spec(), root), pki.pem(root.cert))
    server = contexts.server_context(ident)
    client = contexts.client_context(ident)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_TICKET and ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        assert not ctx.check_hostname
        for suite in ctx.get_ciphers():
            if suite["protocol"] == "TLSv1.2":
                assert suite["kea"] == "kx-ecdhe" and suite["aead"], suite["name"]
    assert server.num_tickets == 0
    assert server.get_ca_certs()[0]["subject"] == client.get_ca_certs()[0]["subject"]


def test_contexts_without_memfd(root, monkeypatch):
    """Where memfd_create is missing, the chain and key go through a removed-at-once 0600 file."""
    ident = _from(make(Spec(), root), pki.pem(root.cert))
    monkeypatch.delattr(contexts.os, "memfd_create")
    ctx = contexts.server_context(ident)
    assert ctx.get_ca_certs()


@pytest.mark.parametrize("exc, reason", [
    (TimeoutError(), "handshake_timeout"),
    (ConnectionAbortedError("SSL handshake is taking longer than 3.0 seconds: aborting the connection"),
     "handshake_timeout"),
    (ConnectionResetError(), "connection_closed"),
    (BrokenPipeError(), "connection_closed"),
    (ssl.SSLEOFError(8, "EOF"), "connection_closed"),
    (RuntimeError("?"), "protocol_error"),
])
def test_reason_for_error_without_openssl(exc, reason):
    assert contexts.reason_for_error(exc) == reason


@pytest.mark.parametrize("code, reason", [
    (9, "not_yet_valid"), (10, "expired"), (18, "unknown_ca"), (19, "unknown_ca"), (20, "unknown_ca"),
    (26, "bad_purpose"), (24, "bad_certificate"), (25, "bad_certificate"), (999, "bad_certificate")])
def test_reason_for_verify_codes(code, reason):
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_code = code
    assert contexts.reason_for_error(exc) == reason


@pytest.mark.parametrize("openssl_reason, reason", [
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_client_cert"), ("UNSUPPORTED_PROTOCOL", "unsupported_version"),
    ("NO_SHARED_CIPHER", "no_shared_cipher"), ("TLSV1_ALERT_UNKNOWN_CA", "peer_rejected"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "peer_rejected"), ("WRONG_VERSION_NUMBER", "protocol_error"),
    (None, "protocol_error")])
def test_reason_for_ssl_errors(openssl_reason, reason):
    exc = ssl.SSLError(1, "x")
    exc.reason = openssl_reason
    assert contexts.reason_for_error(exc) == reason


def test_reasons_are_a_closed_set():
    with pytest.raises(ValueError):
        TLSRejected("something new")
    assert len(set(REASONS)) == len(REASONS)

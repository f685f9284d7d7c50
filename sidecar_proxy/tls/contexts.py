"""``ssl.SSLContext`` builders for the mesh, and ssl errors mapped to refusal reasons.

Safe defaults, decided here once:

- TLS 1.2 minimum; 1.3 is negotiated whenever both sides have it (OpenSSL
  picks the highest common version, and every mesh peer built on this module
  has it).
- TLS 1.2 suites: ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 only
  (forward secret, AEAD). TLS 1.3 suites are all of that kind already.
- No session resumption: no TLS 1.2 tickets (``OP_NO_TICKET``), no TLS 1.3
  tickets (``num_tickets = 0``), and clients never offer a session. OpenSSL's
  TLS 1.2 session-ID cache cannot be turned off from Python, but it lives in
  one ``SSL_CTX``: a rotation builds new contexts, so nothing resumes across a
  certificate or trust-bundle change, and :func:`.identity.check_peer` checks
  the peer's validity on every handshake anyway.
- No renegotiation; no compression.
- The peer must present a certificate that chains to the trust bundle, in
  both directions (strict mTLS; permissive listeners use the same context and
  let the protocol sniffer pass plaintext elsewhere).
- ``VERIFY_X509_STRICT``: RFC 5280 rules (e.g. CA certificates need keyUsage
  and key identifiers). X.509-SVIDs from SPIRE, cert-manager and
  :mod:`.certs` satisfy them.
- Hostname checking is OFF on the client: mesh peers are named by SPIFFE IDs
  in URI SANs, which OpenSSL does not match; :func:`.identity.check_peer` and
  the expected-identity pattern do that after the handshake.

The certificate and key are loaded from the bytes :class:`.identity.WorkloadIdentity`
validated (through an anonymous memory file), never re-read from their paths.
"""
from __future__ import annotations

import os
import ssl
import tempfile
from typing import Sequence

from .identity import WorkloadIdentity

__all__ = ["SERVER_ALPN", "CLIENT_ALPN", "TLS12_CIPHERS", "server_context", "client_context", "reason_for_error"]

SERVER_ALPN = ("h2", "http/1.1")
CLIENT_ALPN = ("h2", "http/1.1")
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

_OPTIONS = ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)


def _base(protocol: int, identity: WorkloadIdentity, alpn: Sequence[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= _OPTIONS
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # before verify_mode: see the module docstring
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_TRUSTED_FIRST
    ctx.load_verify_locations(cadata=identity.bundle_pem.decode("ascii"))
    _load_cert_chain(ctx, identity.chain_pem + b"\n" + identity.key_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(identity: WorkloadIdentity, alpn: Sequence[str] = SERVER_ALPN) -> ssl.SSLContext:
    """Inbound: our certificate, a client certificate required (strict and permissive alike)."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, identity, alpn)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    return ctx


def client_context(identity: WorkloadIdentity, alpn: Sequence[str] = CLIENT_ALPN) -> ssl.SSLContext:
    """Outbound origination: our certificate offered, the server's chain verified against the bundle."""
    return _base(ssl.PROTOCOL_TLS_CLIENT, identity, alpn)


def _load_cert_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` takes only a path: give it a memfd, so the key never touches a disk.

    Without memfd or /proc, a 0600 temporary file (in /dev/shm when there is
    one) that is removed at once.
    """
    try:
        fd = os.memfd_create("sidecar-tls-identity", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            os.write(fd, pem)
            path = f"/proc/self/fd/{fd}"
            if os.path.exists(path):
                ctx.load_cert_chain(path)
                return
        finally:
            os.close(fd)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(prefix="sidecar-tls-", dir=shm) as f:  # 0600, removed on close
        f.write(pem)
        f.flush()
        ctx.load_cert_chain(f.name)


# --- ssl errors -> reasons

# OpenSSL X509_V_ERR_* codes (x509_vfy.h), as SSLCertVerificationError.verify_code.
_V_UNABLE_TO_GET_ISSUER_CERT = 2
_V_CERT_SIGNATURE_FAILURE = 7
_V_CERT_NOT_YET_VALID = 9
_V_CERT_HAS_EXPIRED = 10
_V_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_V_SELF_SIGNED_CERT_IN_CHAIN = 19
_V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_V_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_V_INVALID_PURPOSE = 26

_VERIFY_REASONS = {
    _V_CERT_NOT_YET_VALID: "not_yet_valid",
    _V_CERT_HAS_EXPIRED: "expired",
    _V_UNABLE_TO_GET_ISSUER_CERT: "unknown_ca",
    _V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unknown_ca",
    _V_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unknown_ca",
    _V_DEPTH_ZERO_SELF_SIGNED_CERT: "unknown_ca",
    _V_SELF_SIGNED_CERT_IN_CHAIN: "unknown_ca",
    # Found an issuer by name whose signature does not verify: another CA of
    # the same name (e.g. two demo CAs for one trust domain) when the
    # certificates carry no key identifiers. Not our bundle, so unknown_ca.
    _V_CERT_SIGNATURE_FAILURE: "unknown_ca",
    _V_INVALID_PURPOSE: "bad_purpose",
}

# ssl.SSLError.reason (OpenSSL's reason string) -> reason.
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "UNSUPPORTED_PROTOCOL": "unsupported_version",
    "WRONG_SSL_VERSION": "unsupported_version",
    "NO_PROTOCOLS_AVAILABLE": "unsupported_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "unsupported_version",
    "VERSION_TOO_LOW": "unsupported_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_CIPHERS_AVAILABLE": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "UNEXPECTED_EOF_WHILE_READING": "connection_closed",
}
_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_", "TLSV1_UNRECOGNIZED_NAME")


def reason_for_error(exc: BaseException) -> str:
    """The refusal reason for an exception raised while a TLS handshake ran.

    Certificate verification failures map by OpenSSL's verify code (the
    message text varies between versions), other ssl errors by OpenSSL's
    reason string, socket errors and EOF to ``connection_closed``, timeouts
    to ``handshake_timeout``; anything else is ``protocol_error``.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "connection_closed"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        mapped = _SSL_REASONS.get(reason)
        if mapped is not None:
            return mapped
        if reason.startswith(_ALERT_PREFIXES):
            return "peer_rejected"
        return "protocol_error"
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    if isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc):
        return "handshake_timeout"  # uvloop's own handshake timer (ssl_handshake_timeout)
    if isinstance(exc, OSError):
        return "connection_closed"
    return "protocol_error"

"""The fixed set of reasons a TLS connection is refused.

They are metric label values (``sidecar_tls_handshake_failures_total{reason}``
once wired), so the set is closed: every failure maps to exactly one of these,
never to an exception message. Grouped by who decides:

before TLS starts
  ``plaintext``          a strict listener received bytes that are not a TLS ClientHello
  ``no_local_identity``  this workload has no valid certificate (expired, none loaded)

the TLS layer (OpenSSL)
  ``handshake_timeout``  the handshake did not finish in time
  ``connection_closed``  the peer closed or reset the connection mid-handshake
  ``unsupported_version`` the peer offered only TLS versions below our minimum (1.2)
  ``no_shared_cipher``   no forward-secret AEAD suite (or group) in common
  ``peer_rejected``      the peer aborted with a fatal alert (typically: it refused *our* certificate)
  ``no_client_cert``     strict inbound: the client sent no certificate
  ``expired`` / ``not_yet_valid``   a certificate of the peer's chain is outside its validity
  ``unknown_ca``         the peer's chain does not lead to the trust bundle (wrong CA, self-signed)
  ``bad_purpose``        OpenSSL's purpose check: the peer certificate's extendedKeyUsage lacks
                         clientAuth/serverAuth (as its role needs), or its keyUsage allows neither
                         digitalSignature nor keyAgreement. OpenSSL reports both with one code
                         (X509_V_ERR_INVALID_PURPOSE) and hands out no certificate after a failed
                         verification, so the two cannot be told apart here.
  ``bad_certificate``    any other chain verification failure (bad signature, an issuer that is
                         not a CA, path length, a malformed or RFC 5280-strict-invalid certificate)
  ``protocol_error``     anything else in the TLS layer (malformed records, unexpected messages)

after the handshake (:func:`sidecar_proxy.tls.identity.check_peer`)
  ``no_spiffe_id``       no URI SAN at all, or its URI is not ``spiffe://``
  ``multiple_uri_sans``  more than one URI SAN
  ``bad_spiffe_id``      a ``spiffe://`` URI that breaks the SPIFFE ID syntax
  ``ca_as_leaf``         the peer's own certificate says CA:true
  ``bad_key_usage``      keyUsage present without digitalSignature (e.g. keyAgreement only)
  ``bad_eku``            extendedKeyUsage present without the role's usage (OpenSSL normally
                         rejects this first, as ``bad_purpose``)
  ``identity_mismatch``  the peer's SPIFFE ID is not the one expected (outbound peer_identity,
                         inbound allow_identities)
"""
from __future__ import annotations

__all__ = ["REASONS", "TLSRejected"]

REASONS: tuple[str, ...] = (
    "plaintext", "no_local_identity",
    "handshake_timeout", "connection_closed", "unsupported_version", "no_shared_cipher", "peer_rejected",
    "no_client_cert", "expired", "not_yet_valid", "unknown_ca", "bad_purpose", "bad_certificate",
    "protocol_error",
    "no_spiffe_id", "multiple_uri_sans", "bad_spiffe_id", "ca_as_leaf", "bad_key_usage", "bad_eku",
    "identity_mismatch",
)
_KNOWN = frozenset(REASONS)


class TLSRejected(Exception):
    """A refusal with a ``reason`` from :data:`REASONS` and a human ``detail`` for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in _KNOWN:
            # A programming error, not a peer's doing: labels must stay a closed set.
            raise ValueError(f"unknown TLS rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class HandshakeFailed(TLSRejected):
    """The handshake or the peer check failed; the connection is already aborted."""

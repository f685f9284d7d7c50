"""Who this workload is (its certificate, key and trust bundle) and who the peer is.

Two jobs, both about X.509-SVIDs:

- :class:`WorkloadIdentity`: this workload's chain, key and trust bundle,
  loaded from PEM and checked *before* any context is built from them, so a
  half-rotated or wrong set of files is refused with a reason instead of
  being served (see :mod:`.rotation`).
- :func:`check_peer`: what OpenSSL does not check about the peer's leaf after
  it verified the chain: exactly one URI SAN that is a valid SPIFFE ID,
  CA:false, keyUsage with digitalSignature, extendedKeyUsage for the peer's
  role. Validity is checked again here (OpenSSL already did) so the function
  is complete on its own, e.g. for a resumed or cached peer.

Failures carry a reason from :data:`.reasons.REASONS` (peers) or
:data:`LOAD_REASONS` (our own files), never free text alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import certs
from .reasons import TLSRejected
from .spiffe import IdentityMatcher, identity_matches, parse_spiffe_id

__all__ = [
    "LOAD_REASONS", "IdentityError", "PeerIdentity", "WorkloadIdentity",
    "spiffe_id_of", "check_peer", "identity_matches", "IdentityMatcher", "CLIENT", "SERVER",
]

# The peer's role in the handshake: a client (we are the server) or a server.
CLIENT = "client"
SERVER = "server"
_EKU_FOR_ROLE = {CLIENT: ExtendedKeyUsageOID.CLIENT_AUTH, SERVER: ExtendedKeyUsageOID.SERVER_AUTH}

# Why our own certificate files were refused (a reload keeps the previous identity).
LOAD_REASONS = (
    "unreadable",        # missing file, or not PEM / not a certificate / not an unencrypted EC or RSA key
    "key_mismatch",      # the key is not the certificate's (a half-done rotation)
    "no_spiffe_id", "multiple_uri_sans", "bad_spiffe_id", "ca_as_leaf",
    "expired", "not_yet_valid",
    "untrusted",         # the chain does not lead to a certificate of the trust bundle
)
_MAX_CHAIN = 8


class IdentityError(ValueError):
    """This workload's certificate files cannot be used; ``reason`` is one of :data:`LOAD_REASONS`."""

    def __init__(self, reason: str, detail: str, not_before: float | None = None) -> None:
        assert reason in LOAD_REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.not_before = not_before  # "not_yet_valid": when the certificate becomes usable


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The verified peer: what routing, rate limits, access logs and spans may use."""

    spiffe_id: str
    trust_domain: str
    not_after: float  # the peer certificate's notAfter, seconds since the epoch
    serial: int


def spiffe_id_of(cert: x509.Certificate) -> str:
    """The SPIFFE ID in ``cert``'s one URI SAN.

    Raises :class:`TLSRejected` with reason ``no_spiffe_id`` (no SAN extension,
    no URI SAN, or a URI that is not ``spiffe://``), ``multiple_uri_sans`` or
    ``bad_spiffe_id`` (a ``spiffe://`` URI breaking the SPIFFE ID syntax).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TLSRejected("no_spiffe_id", "the certificate has no subjectAltName") from None
    except ValueError as exc:  # a malformed extension
        raise TLSRejected("no_spiffe_id", f"unreadable subjectAltName: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise TLSRejected("no_spiffe_id", "the subjectAltName has no URI")
    if len(uris) > 1:
        raise TLSRejected("multiple_uri_sans", f"{len(uris)} URI SANs; an X.509-SVID has exactly one")
    uri = uris[0]
    if not uri.lower().startswith("spiffe:"):
        raise TLSRejected("no_spiffe_id", f"the URI SAN {uri[:80]!r} is not a spiffe:// ID")
    try:
        return str(parse_spiffe_id(uri))
    except ValueError as exc:
        raise TLSRejected("bad_spiffe_id", f"{uri[:80]!r}: {exc}") from None


def _validity(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_peer(leaf_der: bytes, now: float, role: str = CLIENT) -> PeerIdentity:
    """Check the peer's leaf certificate (DER, as ``SSLObject.getpeercert(True)`` gives it).

    ``role`` is the peer's: ``"client"`` when we are the server (strict
    inbound), ``"server"`` when we originate. The chain was verified by
    OpenSSL; this adds the X.509-SVID rules for the leaf, in this order (the
    first failure is the reason): validity (``not_yet_valid``, ``expired``),
    ``ca_as_leaf``, ``bad_key_usage`` (present without digitalSignature, or
    with keyCertSign/cRLSign), ``bad_eku`` (present without the role's usage),
    then the SPIFFE ID (``no_spiffe_id``, ``multiple_uri_sans``,
    ``bad_spiffe_id``). Raises :class:`TLSRejected`.
    """
    if not leaf_der:
        raise TLSRejected("no_client_cert" if role == CLIENT else "bad_certificate", "the peer sent no certificate")
    try:
        cert = x509.load_der_x509_certificate(leaf_der)
        not_before, not_after = _validity(cert)
    except ValueError as exc:
        raise TLSRejected("bad_certificate", f"unparsable peer certificate: {exc}") from None
    if now < not_before:
        raise TLSRejected("not_yet_valid", f"valid from {cert.not_valid_before_utc.isoformat()}")
    if now > not_after:
        raise TLSRejected("expired", f"expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        ext = cert.extensions
        _check_leaf_extensions(ext, role)
    except ValueError as exc:  # a malformed extension
        raise TLSRejected("bad_certificate", f"unreadable extension: {exc}") from None
    spiffe_id = spiffe_id_of(cert)
    return PeerIdentity(spiffe_id, spiffe_id[9:].partition("/")[0], not_after, cert.serial_number)


def _check_leaf_extensions(ext: x509.Extensions, role: str) -> None:
    # One pass over the extensions, then the checks in the documented order
    # (the reason must not depend on the order a CA wrote them in).
    bc = ku = eku = None
    for e in ext:
        value = e.value
        if isinstance(value, x509.BasicConstraints):
            bc = value
        elif isinstance(value, x509.KeyUsage):
            ku = value
        elif isinstance(value, x509.ExtendedKeyUsage):
            eku = value
    if bc is not None and bc.ca:
        raise TLSRejected("ca_as_leaf", "the peer's own certificate is a CA certificate (CA:true)")
    if ku is not None:
        if not ku.digital_signature:
            raise TLSRejected("bad_key_usage", "keyUsage lacks digitalSignature")
        if ku.key_cert_sign or ku.crl_sign:
            raise TLSRejected("bad_key_usage", "keyUsage of a leaf has keyCertSign or cRLSign")
    if eku is not None and _EKU_FOR_ROLE[role] not in eku:
        raise TLSRejected("bad_eku", f"extendedKeyUsage lacks {role}Auth")


@dataclass(frozen=True, eq=False)
class WorkloadIdentity:
    """This workload's certificate chain (leaf first), key and trust bundle, checked and ready for contexts.

    The PEM bytes are kept as they were validated: contexts are built from
    these exact bytes, never by re-reading the files (which may have changed
    again in between).
    """

    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    key: certs.PrivateKey
    bundle: tuple[x509.Certificate, ...]
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    not_before: float
    not_after: float
    bundle_not_after: float  # the earliest notAfter in the trust bundle
    digest: str  # SHA-256 over the three PEM inputs: equal digests, equal identities

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id[9:].partition("/")[0]

    def expired(self, now: float) -> bool:
        return now > self.not_after

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path, bundle_path: str | Path,
             now: float | None = None) -> WorkloadIdentity:
        """Read and check the three files. Raises :class:`IdentityError`."""
        parts = []
        for what, path in (("certificate", cert_path), ("key", key_path), ("trust bundle", bundle_path)):
            try:
                parts.append(Path(path).read_bytes())
            except OSError as exc:
                raise IdentityError("unreadable", f"{what} {path}: {exc.strerror or exc}") from None
        return cls.from_pem(*parts, now=now)

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes,
                 now: float | None = None) -> WorkloadIdentity:
        """Check a chain/key/bundle triple (``now``: seconds since the epoch; None skips validity).

        Raises :class:`IdentityError`.
        """
        chain = _load_certs(chain_pem, "certificate")
        bundle = _load_certs(bundle_pem, "trust bundle")
        try:
            key = certs.load_key_pem(key_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise IdentityError("unreadable", f"key: {exc}") from None
        leaf = chain[0]
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise IdentityError("key_mismatch", "the private key does not belong to the certificate "
                                "(files written in the middle of a rotation?)")
        try:
            spiffe_id = spiffe_id_of(leaf)
        except TLSRejected as exc:
            raise IdentityError(exc.reason, f"certificate: {exc.detail}") from None
        if _is_ca(leaf):
            raise IdentityError("ca_as_leaf", "certificate: a CA certificate (CA:true) is not a workload certificate")
        not_before, not_after = _validity(leaf)
        if now is not None:
            if now < not_before:
                raise IdentityError("not_yet_valid", f"certificate valid only from "
                                    f"{leaf.not_valid_before_utc.isoformat()}", not_before)
            if now > not_after:
                raise IdentityError("expired", f"certificate expired at {leaf.not_valid_after_utc.isoformat()}")
        _check_chains_to(chain, bundle, now)
        digest = hashlib.sha256()
        for part in (chain_pem, key_pem, bundle_pem):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return cls(spiffe_id=spiffe_id, chain=tuple(chain), key=key, bundle=tuple(bundle),
                   chain_pem=chain_pem, key_pem=key_pem, bundle_pem=bundle_pem,
                   not_before=not_before, not_after=not_after,
                   bundle_not_after=min(_validity(c)[1] for c in bundle), digest=digest.hexdigest())


def _load_certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        return certs.load_certs_pem(data)
    except ValueError as exc:
        # Also what a half-written file looks like: a PEM block without its END line.
        raise IdentityError("unreadable", f"{what}: no complete PEM certificate ({exc})") from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _check_chains_to(chain: list[x509.Certificate], bundle: list[x509.Certificate], now: float | None) -> None:
    """Walk leaf -> intermediates (from the chain file) -> a bundle certificate, checking each link.

    A sanity check of our own files before we serve them; the peers' OpenSSL
    makes the authoritative one. Raises IdentityError("untrusted" / "expired").
    """
    current = chain[0]
    pool = list(chain[1:])
    for _ in range(_MAX_CHAIN):
        for anchor in bundle:
            if _issued_by(current, anchor):
                return
        issuer = next((c for c in pool if _issued_by(current, c)), None)
        if issuer is None:
            raise IdentityError("untrusted", f"certificate: {current.subject.rfc4514_string() or 'the leaf'} "
                                             f"is not issued by the trust bundle or a CA in the chain")
        if not _is_ca(issuer):
            raise IdentityError("untrusted", f"certificate chain: {issuer.subject.rfc4514_string()} is not a CA")
        if now is not None and now > _validity(issuer)[1]:
            raise IdentityError("expired", f"certificate chain: {issuer.subject.rfc4514_string()} expired at "
                                           f"{issuer.not_valid_after_utc.isoformat()}")
        pool.remove(issuer)
        current = issuer
    raise IdentityError("untrusted", "certificate chain too long")

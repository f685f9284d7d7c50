"""A mesh CA and SPIFFE workload certificates, for demos, tests and ``sidecar-proxy certs``.

Production meshes get their certificates from SPIRE, cert-manager or a CA of
their own; this module exists so that a demo, a test or a benchmark can make a
correct X.509-SVID chain with nothing but ``cryptography``. The builders are
pure (they return ``cryptography`` objects and take ``now`` explicitly); the
writers at the bottom are the only functions that touch files.

What is made follows the SPIFFE X.509-SVID profile:

- signing certificates (root and intermediates): CA:true (critical), keyUsage
  keyCertSign + cRLSign (critical), the trust domain's ID as their one URI
  SAN, subject and authority key identifiers;
- workload (leaf) certificates: CA:false (critical), keyUsage
  digitalSignature (critical), extendedKeyUsage serverAuth + clientAuth (a
  mesh workload is both), exactly one URI SAN = its SPIFFE ID, a short
  lifetime (24 h by default) that starts a few minutes in the past so a peer
  whose clock runs slightly behind does not see "not yet valid".

ECDSA P-256 is the default: its handshakes are several times cheaper than
RSA-2048's for the signing side, and it is what SPIRE issues by default.
"""
from __future__ import annotations

import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .spiffe import parse_spiffe_id

__all__ = [
    "KEY_TYPES", "DEFAULT_TTL", "DEFAULT_CA_DAYS", "BACKDATE", "PrivateKey", "Issued",
    "generate_key", "make_ca", "make_intermediate", "issue_workload", "trust_domain_of",
    "cert_pem", "key_pem", "load_certs_pem", "load_key_pem",
    "write_file", "write_ca", "read_ca", "write_workload",
    "CA_CERT_FILE", "CA_KEY_FILE", "CA_CHAIN_FILE", "CERT_FILE", "KEY_FILE", "BUNDLE_FILE",
]

KEY_TYPES = ("ec-p256", "rsa-2048")
DEFAULT_TTL = dt.timedelta(hours=24)
DEFAULT_CA_DAYS = 365
# Clock skew allowance: a workload cert is dated this far back.
BACKDATE = dt.timedelta(minutes=5)

CA_CERT_FILE = "ca.pem"            # the signing certificate (root, or an intermediate)
CA_KEY_FILE = "ca-key.pem"
CA_CHAIN_FILE = "ca-chain.pem"     # intermediate CA dirs only: the certificates above it, up to the root
CERT_FILE = "cert.pem"             # workload: leaf first, then intermediates
KEY_FILE = "key.pem"
BUNDLE_FILE = "bundle.pem"         # workload: the trust bundle (root CAs)

PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]


@dataclass(frozen=True)
class Issued:
    """A certificate, its private key, the intermediates between it and the root (nearest first,
    the root excluded) and the root itself (None when ``cert`` is the root)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    root: x509.Certificate | None = None

    @property
    def trust_anchor(self) -> x509.Certificate:
        """The root this certificate chains to: what goes into peers' trust bundles."""
        return self.root if self.root is not None else self.cert

    @property
    def full_chain(self) -> tuple[x509.Certificate, ...]:
        """The certificate followed by its intermediates: what a TLS peer sends."""
        return (self.cert, *self.chain)


def _utcnow(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now


def generate_key(key_type: str = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


def _ca_builder(subject: x509.Name, issuer: x509.Name, public_key, issuer_public_key, trust_domain: str,
                not_before: dt.datetime, not_after: dt.datetime, path_length: int | None) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False)
    )


def _check_trust_domain(trust_domain: str) -> str:
    sid = parse_spiffe_id(f"spiffe://{trust_domain}")  # raises ValueError with the rule broken
    if sid.path:
        raise ValueError(f"a trust domain has no path: {trust_domain!r}")
    return sid.trust_domain


def make_ca(trust_domain: str = "example.org", *, key_type: str = "ec-p256", days: int = DEFAULT_CA_DAYS,
            now: dt.datetime | None = None) -> Issued:
    """A self-signed root CA for ``trust_domain`` (its SPIFFE ID is the one URI SAN)."""
    trust_domain = _check_trust_domain(trust_domain)
    if days <= 0:
        raise ValueError("days must be positive")
    now = _utcnow(now)
    key = generate_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} mesh root CA")])
    cert = _ca_builder(name, name, key.public_key(), key.public_key(), trust_domain,
                       now - BACKDATE, now + dt.timedelta(days=days), None).sign(key, hashes.SHA256())
    return Issued(cert, key)


def make_intermediate(parent: Issued, *, key_type: str = "ec-p256", days: int = 30,
                      now: dt.datetime | None = None) -> Issued:
    """An intermediate signing CA under ``parent`` (path length 0: it signs workloads only)."""
    now = _utcnow(now)
    trust_domain = trust_domain_of(parent.cert)
    if trust_domain is None:
        raise ValueError("the parent CA has no spiffe:// URI SAN naming its trust domain")
    key = generate_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} intermediate CA")])
    not_before = max(now - BACKDATE, parent.cert.not_valid_before_utc)
    not_after = min(now + dt.timedelta(days=days), parent.cert.not_valid_after_utc)
    if not_after <= not_before:
        raise ValueError("the parent CA is not valid at that time")
    cert = _ca_builder(name, parent.cert.subject, key.public_key(), parent.key.public_key(), trust_domain,
                       not_before, not_after, 0).sign(parent.key, hashes.SHA256())
    return Issued(cert, key, _issuer_chain(parent), parent.trust_anchor)


def issue_workload(ca: Issued, spiffe_id: str, *, ttl: dt.timedelta = DEFAULT_TTL, key_type: str = "ec-p256",
                   now: dt.datetime | None = None, backdate: dt.timedelta = BACKDATE) -> Issued:
    """A workload certificate for ``spiffe_id`` signed by ``ca``.

    Its ``chain`` holds ``ca`` and the intermediates above it when ``ca`` is an
    intermediate (what the workload must send), and nothing when ``ca`` is the
    root (peers have the root in their bundles). The lifetime is cut to the
    CA's own notAfter: a leaf that outlives its issuer would only fail later.
    """
    sid = parse_spiffe_id(spiffe_id)
    ca_domain = trust_domain_of(ca.cert)
    if ca_domain is not None and ca_domain != sid.trust_domain:
        raise ValueError(f"{spiffe_id} is not in the CA's trust domain {ca_domain!r}")
    if ttl <= dt.timedelta(0):
        raise ValueError("ttl must be positive")
    now = _utcnow(now)
    not_before = max(now - backdate, ca.cert.not_valid_before_utc)
    not_after = min(now + ttl, ca.cert.not_valid_after_utc)
    if not_after <= not_before:
        raise ValueError(f"the CA is valid only from {ca.cert.not_valid_before_utc.isoformat()} to "
                         f"{ca.cert.not_valid_after_utc.isoformat()}: no certificate for {now.isoformat()} and a "
                         f"{ttl} lifetime fits in it")
    key = generate_key(key_type)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, sid.trust_domain)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert, key, _issuer_chain(ca), ca.trust_anchor)


def _issuer_chain(issuer: Issued) -> tuple[x509.Certificate, ...]:
    """The intermediates a certificate signed by ``issuer`` must be sent with."""
    return () if issuer.root is None else issuer.full_chain


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def trust_domain_of(cert: x509.Certificate) -> str | None:
    """The trust domain named by a certificate's spiffe:// URI SAN, if it has exactly one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    try:
        return parse_spiffe_id(uris[0]).trust_domain
    except ValueError:
        return None


# --- PEM

def cert_pem(certs: x509.Certificate | Iterable[x509.Certificate]) -> bytes:
    if isinstance(certs, x509.Certificate):
        certs = (certs,)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8: what SPIRE and cert-manager write, protected by file mode 0600."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_certs_pem(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order. Raises ValueError on no or malformed certificates."""
    return x509.load_pem_x509_certificates(data)


def load_key_pem(data: bytes) -> PrivateKey:
    """Raises ValueError on a malformed key, TypeError on an encrypted one or an unsupported type."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise TypeError(f"unsupported private key type {type(key).__name__}: use ECDSA or RSA")
    return key


# --- files

def write_file(path: Path, data: bytes, *, private: bool = False) -> Path:
    """Write ``data`` atomically (temporary file, fsync, rename): a watcher never sees half a file.

    ``private`` files are created 0600 from the start, so the key is never
    readable by others even for an instant.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp creates 0600
    try:
        if not private:
            os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_ca(out_dir: Path, ca: Issued) -> list[Path]:
    """``ca.pem``, ``ca-key.pem`` (0600) and, for an intermediate, ``ca-chain.pem`` (the
    certificates above it, the root last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [write_file(out_dir / CA_CERT_FILE, cert_pem(ca.cert)),
               write_file(out_dir / CA_KEY_FILE, key_pem(ca.key), private=True)]
    if ca.root is not None:
        written.append(write_file(out_dir / CA_CHAIN_FILE, cert_pem((*ca.chain, ca.root))))
    return written


def read_ca(ca_dir: Path) -> tuple[Issued, list[x509.Certificate]]:
    """The signing CA in ``ca_dir`` and the trust bundle it implies (its root).

    Raises OSError (missing files) or ValueError (malformed or mismatched PEM).
    """
    ca_dir = Path(ca_dir)
    certs = load_certs_pem((ca_dir / CA_CERT_FILE).read_bytes())
    key = load_key_pem((ca_dir / CA_KEY_FILE).read_bytes())
    cert = certs[0]
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{ca_dir / CA_KEY_FILE} is not the key of {ca_dir / CA_CERT_FILE}")
    chain_path = ca_dir / CA_CHAIN_FILE
    above = load_certs_pem(chain_path.read_bytes()) if chain_path.exists() else []
    top = above[-1] if above else cert
    if not _self_signed(top):
        raise ValueError(f"{ca_dir}: the top of the CA chain is not a self-signed root")
    ca = Issued(cert, key, tuple(above[:-1]), above[-1]) if above else Issued(cert, key)
    return ca, [top]


def write_workload(out_dir: Path, workload: Issued, bundle: Iterable[x509.Certificate]) -> list[Path]:
    """``cert.pem`` (leaf + intermediates), ``key.pem`` (0600), ``bundle.pem`` (roots).

    The key is written first and the certificate last, so that a watcher
    polling in between sees an old-cert/new-key pair (refused: mismatch)
    rather than a new cert with an old key being taken for a rotation.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_file(out_dir / BUNDLE_FILE, cert_pem(list(bundle))),
            write_file(out_dir / KEY_FILE, key_pem(workload.key), private=True),
            write_file(out_dir / CERT_FILE, cert_pem(workload.full_chain))]

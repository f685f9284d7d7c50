"""Certificates for the TLS tests, built directly with ``cryptography``.

Deliberately independent of ``sidecar_proxy.tls.certs``: the matrix needs
certificates that module refuses to make (no SAN, two URI SANs, CA leaves,
odd key usages), and a check is stronger when the thing checked did not
also make its input.
"""
from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
TD = "mesh.test"


def new_key(kind: str = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Cert:
    cert: x509.Certificate
    key: object
    chain: tuple = ()  # intermediates to send after the leaf

    def chain_pem(self) -> bytes:
        return pem(self.cert, *self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


_KU_NAMES = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")


def key_usage(*names: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{n: n in names for n in _KU_NAMES})


@dataclass
class Spec:
    uris: tuple[str, ...] | None = (f"spiffe://{TD}/ns/default/sa/client",)  # None: no SAN at all
    dns: tuple[str, ...] = ()
    ca: bool = False
    path_length: int | None = None
    ku: x509.KeyUsage | None = field(default_factory=lambda: key_usage("digital_signature"))
    eku: tuple | None = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    not_before: dt.datetime = NOW - dt.timedelta(minutes=5)
    not_after: dt.datetime = NOW + dt.timedelta(hours=1)
    key_kind: str = "ec"
    cn: str = "workload"


def make(spec: Spec, issuer: Cert | None = None) -> Cert:
    """A certificate per ``spec``, signed by ``issuer`` (or self-signed)."""
    key = new_key(spec.key_kind)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TD),
                         x509.NameAttribute(NameOID.COMMON_NAME, spec.cn)])
    signer_key = issuer.key if issuer else key
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer.cert.subject if issuer else subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(spec.not_before)
         .not_valid_after(spec.not_after)
         .add_extension(x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False))
    if spec.ku is not None:
        b = b.add_extension(spec.ku, critical=True)
    if spec.eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(spec.eku)), critical=False)
    if spec.uris is not None or spec.dns:
        names = [x509.UniformResourceIdentifier(u) for u in spec.uris or ()]
        names += [x509.DNSName(d) for d in spec.dns]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(signer_key, hashes.SHA256())
    chain = ()
    if issuer is not None and issuer.cert.issuer != issuer.cert.subject:
        chain = (issuer.cert, *issuer.chain)
    return Cert(cert, key, chain)


def ca_spec(name: str = "root", **kw) -> Spec:
    kw.setdefault("uris", (f"spiffe://{TD}",))
    kw.setdefault("ku", key_usage("key_cert_sign", "crl_sign"))
    kw.setdefault("eku", None)
    kw.setdefault("not_after", NOW + dt.timedelta(days=30))
    return Spec(ca=True, cn=name, **kw)


def make_ca(name: str = "root", issuer: Cert | None = None, **kw) -> Cert:
    return make(ca_spec(name, **kw), issuer)


def write_chain(tmpdir, name: str, c: Cert) -> str:
    path = os.path.join(tmpdir, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(c.chain_pem() + c.key_pem())
    return path


def client_ssl_context(bundle: bytes, cert: Cert | None = None, *, max_version=None) -> ssl.SSLContext:
    """A plain ``ssl`` client, independent of sidecar_proxy.tls.contexts."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundle.decode())
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert is not None:
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(cert.chain_pem() + cert.key_pem())
            f.flush()
            ctx.load_cert_chain(f.name)
    return ctx


def server_ssl_context(bundle: bytes, cert: Cert) -> ssl.SSLContext:
    """A plain ``ssl`` server requiring a client certificate, independent of our contexts."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle.decode())
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(cert.chain_pem() + cert.key_pem())
        f.flush()
        ctx.load_cert_chain(f.name)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx

"""``sidecar-proxy certs`` end to end, as a subprocess; its output loaded by identity.py."""
import datetime as dt
import os
import stat
import subprocess
import sys
import time

import pytest
from cryptography import x509

from sidecar_proxy.tls.cli import parse_ttl
from sidecar_proxy.tls.contexts import client_context, server_context
from sidecar_proxy.tls.identity import WorkloadIdentity, spiffe_id_of

from ..support import REPO_ROOT


def certs_cli(*args: str):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "sidecar_proxy", "certs", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT, env=env)


def _load(d):
    return WorkloadIdentity.load(d / "cert.pem", d / "key.pem", d / "bundle.pem", now=time.time())


def test_ca_then_issue(tmp_path):
    ca = certs_cli("ca", "--out", str(tmp_path / "ca"), "--trust-domain", "shop.test", "--days", "10")
    assert ca.returncode == 0, ca.stderr
    assert "ca.pem" in ca.stdout and "ca-key.pem" in ca.stdout and "spiffe://shop.test" in ca.stdout
    assert stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode) == 0o600

    out = certs_cli("issue", "--ca", str(tmp_path / "ca"), "--spiffe-id", "spiffe://shop.test/ns/shop/sa/cart",
                    "--out", str(tmp_path / "cart"), "--ttl", "2h")
    assert out.returncode == 0, out.stderr
    for name in ("cert.pem", "key.pem", "bundle.pem"):
        assert name in out.stdout
    assert stat.S_IMODE((tmp_path / "cart" / "key.pem").stat().st_mode) == 0o600

    identity = _load(tmp_path / "cart")
    assert identity.spiffe_id == "spiffe://shop.test/ns/shop/sa/cart"
    assert 2 * 3600 - 5 <= identity.not_after - time.time() <= 2 * 3600 + 5
    assert len(identity.chain) == 1 and len(identity.bundle) == 1
    server_context(identity)
    client_context(identity)
    ca_cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.pem").read_bytes())
    assert ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc <= dt.timedelta(days=10, minutes=6)


def test_intermediate_and_rsa(tmp_path):
    assert certs_cli("ca", "--out", str(tmp_path / "root")).returncode == 0
    inter = certs_cli("ca", "--out", str(tmp_path / "inter"), "--parent", str(tmp_path / "root"),
                      "--key-type", "rsa-2048")
    assert inter.returncode == 0, inter.stderr
    assert "ca-chain.pem" in inter.stdout and "RSA-2048" in inter.stdout
    out = certs_cli("issue", "--ca", str(tmp_path / "inter"), "--spiffe-id", "spiffe://example.org/ns/a/sa/b",
                    "--out", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    identity = _load(tmp_path / "w")
    assert len(identity.chain) == 2  # leaf + intermediate
    assert spiffe_id_of(identity.bundle[0]) == "spiffe://example.org"  # the root's own ID


@pytest.mark.parametrize("args, code, message", [
    (["issue", "--ca", "{ca}", "--spiffe-id", "spiffe://example.org/a//b", "--out", "{tmp}/w"], 2, "empty segment"),
    (["issue", "--ca", "{ca}", "--spiffe-id", "spiffe://example.org", "--out", "{tmp}/w"], 2, "has a path"),
    (["issue", "--ca", "{ca}", "--spiffe-id", "spiffe://example.org/a", "--out", "{tmp}/w", "--ttl", "5x"], 2,
     "--ttl"),
    (["issue", "--ca", "{ca}", "--spiffe-id", "spiffe://other.org/a", "--out", "{tmp}/w"], 1,
     "not in the CA's trust domain"),
    (["issue", "--ca", "{tmp}/nope", "--spiffe-id", "spiffe://example.org/a", "--out", "{tmp}/w"], 1,
     "No such file"),
    (["ca", "--out", "{ca}"], 1, "exists"),
    (["ca", "--out", "{tmp}/x", "--trust-domain", "Bad.Domain"], 2, "lower case"),
    (["ca", "--out", "{tmp}/x", "--days", "0"], 2, "--days"),
    (["issue", "--ca", "{ca}"], 2, "required"),
    ([], 2, "required"),
])
def test_errors(tmp_path, args, code, message):
    assert certs_cli("ca", "--out", str(tmp_path / "ca")).returncode == 0
    result = certs_cli(*[a.format(ca=tmp_path / "ca", tmp=tmp_path) for a in args])
    assert result.returncode == code, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_ca_force_replaces(tmp_path):
    assert certs_cli("ca", "--out", str(tmp_path)).returncode == 0
    before = (tmp_path / "ca.pem").read_bytes()
    assert certs_cli("ca", "--out", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "ca.pem").read_bytes() != before


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800),
                                           ("1.5h", 5400)])
def test_parse_ttl(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "0s", "1w", "1 h x"])
def test_parse_ttl_rejects(text):
    with pytest.raises(ValueError):
        parse_ttl(text)

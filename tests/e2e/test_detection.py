"""Protocol detection on "auto" listeners, with real clients, through the real proxy.

Every protocol is still relayed as TCP; what detection changes is what the
proxy knows (metrics, /connections) and when it connects upstream.
"""
from __future__ import annotations

import datetime
import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..support import Proxy, ThreadedServer, echo_handler, recv_all, relay_config, require_tools, wait_for

pytestmark = pytest.mark.e2e

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
def started(tmp_path):
    made: list = []

    def proxy(backend_port: int, **listener) -> Proxy:
        p = Proxy(relay_config(backend_port, protocol="auto", **listener), tmp_path / f"p{len(made)}").wait_ready()
        made.append(p)
        return p

    def server(handler) -> ThreadedServer:
        s = ThreadedServer(handler)
        made.append(s)
        return s

    yield proxy, server
    for thing in made:
        if isinstance(thing, Proxy):
            assert thing.stop() == 0, thing.log()
            assert "Traceback" not in thing.log(), thing.log()
        else:
            thing.close()


def outcome(proxy: Proxy, name: str) -> float:
    return proxy.metric("sidecar_protocol_detections_total", listener="relay", outcome=name)


def self_signed(tmp_path, host: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_is_detected_with_sni_and_passed_through_end_to_end(started, tmp_path):
    proxy_for, server_for = started
    cert, key = self_signed(tmp_path, "api.example.com")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.set_alpn_protocols(["http/1.1"])

    def tls_echo(conn):
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())

    proxy = proxy_for(server_for(tls_echo).port)
    client_ctx = ssl.create_default_context(cafile=cert)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="api.example.com") as tls:
            (conn,) = proxy.connections()
            assert (conn["protocol"], conn["sni"]) == ("tls", "api.example.com")
            tls.sendall(b"through the sidecar")
            assert tls.recv(100) == b"THROUGH THE SIDECAR"  # the certificate verified end to end
            assert tls.selected_alpn_protocol() == "http/1.1"
    assert outcome(proxy, "tls") == 1


def test_http1_with_curl(started):
    require_tools("curl")
    proxy_for, server_for = started

    def http_ok(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")

    proxy = proxy_for(server_for(http_ok).port)
    out = subprocess.run(["curl", "-s", "--max-time", "5", f"http://127.0.0.1:{proxy.port()}/x"],
                         capture_output=True, text=True, timeout=10)
    assert out.stdout == "hello\n", out
    assert outcome(proxy, "http1") == 1


def test_http2_prior_knowledge_and_opaque_bytes(started):
    proxy_for, server_for = started
    proxy = proxy_for(server_for(echo_handler).port)
    for payload in (H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", b"\x00\x01binary\xff\xfe" * 10):
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)  # a FIN while the proxy may still be detecting
            assert recv_all(client) == payload
    assert (outcome(proxy, "http2"), outcome(proxy, "opaque")) == (1, 1)


def banner(conn):
    conn.sendall(b"220 smtp.example ESMTP ready\r\n")
    conn.recv(100)


def test_server_speaks_first_waits_for_the_detection_timeout_only(started):
    proxy_for, server_for = started
    proxy = proxy_for(server_for(banner).port, detection_timeout="300ms")
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as client:
        assert client.recv(100).startswith(b"220 ")
    waited = time.monotonic() - began
    assert 0.25 < waited < 2.0, waited
    assert outcome(proxy, "timeout") == 1


def test_opaque_ports_are_not_sniffed(started):
    proxy_for, server_for = started
    server = server_for(banner)
    proxy = proxy_for(server.port, detection_timeout="2s", opaque_ports=[])
    # The listener's port is the destination of a non-transparent listener.
    config = dict(proxy.config, listeners={"relay": dict(proxy.config["listeners"]["relay"],
                                                         opaque_ports=[proxy.port()])})
    status, body = proxy.post_config(config)
    assert status == 200, body
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as client:
        assert client.recv(100).startswith(b"220 ")
    assert time.monotonic() - began < 1.0  # not the 2 s detection timeout
    wait_for(lambda: outcome(proxy, "opaque_port") == 1, 3, what="opaque_port counted")
    assert outcome(proxy, "timeout") == 0

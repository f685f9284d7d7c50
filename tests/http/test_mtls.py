"""mTLS through real proxies on loopback: sidecar A originates, sidecar B terminates.

    client --plaintext--> A (listener "out") --mTLS--> B (listener "inbound") --plaintext--> app

Certificates come from ``sidecar_proxy.tls.certs`` (one mesh CA, a SPIFFE ID
per sidecar), written to files the proxies watch. Each test checks what the
application received (nothing at all for a refused connection), what the
client got, and the handshake counters in /metrics.
"""
from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar_proxy.tls import certs

from ..support import Proxy, ThreadedServer, echo_handler, free_port, recv_exactly, stop_all, wait_for
from .upstreams import RecordingUpstream

pytestmark = pytest.mark.e2e

TD = "example.org"
CLIENT_ID = f"spiffe://{TD}/ns/a/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/b/sa/server"


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = certs.make_ca(TD)

    def workload(self, name: str, spiffe_id: str, ca: certs.Issued | None = None) -> dict:
        issued = certs.issue_workload(ca or self.ca, spiffe_id)
        directory = self.root / name
        certs.write_workload(directory, issued, [self.ca.trust_anchor])
        return {"cert_chain": str(directory / "cert.pem"), "private_key": str(directory / "key.pem"),
                "trust_bundle": str(directory / "bundle.pem"), "poll_interval": "100ms"}

    def issued(self, name: str, spiffe_id: str) -> certs.Issued:
        issued = certs.issue_workload(self.ca, spiffe_id)
        certs.write_workload(self.root / name, issued, [self.ca.trust_anchor])
        return issued


def server_config(tls: dict, app_port: int, mode: str = "strict", routes: list | None = None,
                  echo_port: int | None = None) -> dict:
    cfg = {
        "version": 1, "node": {"id": "b"}, "tls": tls,
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"inbound": {"address": "127.0.0.1", "port": free_port(), "protocol": "auto",
                                  "routes": "in", "tls": {"mode": mode}}},
        "clusters": {"app": {"endpoints": [f"127.0.0.1:{app_port}"]}},
        "route_tables": {"in": routes or [{"match": {}, "cluster": "app"}]},
    }
    if echo_port is not None:
        cfg["clusters"]["echo"] = {"endpoints": [f"127.0.0.1:{echo_port}"]}
        cfg["listeners"]["raw"] = {"address": "127.0.0.1", "port": free_port(), "protocol": "tcp",
                                   "routes": "raw", "tls": {"mode": mode}}
        cfg["route_tables"]["raw"] = [{"match": {}, "cluster": "echo"}]
    return cfg


def client_config(tls: dict, b_port: int, peer: str = SERVER_ID, pool: dict | None = None,
                  tcp_port: int | None = None) -> dict:
    cluster = {"endpoints": [f"127.0.0.1:{b_port}"], "tls": {"mode": "mutual", "peer_identity": [peer]}}
    if pool is not None:
        cluster["pool"] = pool
    cfg = {
        "version": 1, "node": {"id": "a"}, "tls": tls,
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"out": {"address": "127.0.0.1", "port": free_port(), "protocol": "http", "routes": "out"}},
        "clusters": {"b": cluster},
        "route_tables": {"out": [{"match": {}, "cluster": "b"}]},
    }
    if tcp_port is not None:
        cfg["clusters"]["b_tcp"] = {"endpoints": [f"127.0.0.1:{tcp_port}"],
                                    "tls": {"mode": "mutual", "peer_identity": [peer]}}
        cfg["listeners"]["tcp_out"] = {"address": "127.0.0.1", "port": free_port(), "protocol": "tcp",
                                       "routes": "tcp_out"}
        cfg["route_tables"]["tcp_out"] = [{"match": {}, "cluster": "b_tcp"}]
    return cfg


def get(port: int, path: str, close: bool = False) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{'connection: close' if close else ''}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"closed before a response: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        while len(body) < length:
            body += s.recv(65536)
        return int(head.split()[1]), body


def refused(port: int, payload: bytes) -> bytes:
    """Send ``payload`` and read until the proxy closes: what came back (nothing, for a refusal)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk
        except ConnectionResetError:
            return out


def tls_client(pki: Pki, cert: certs.Issued | None, alpn=("http/1.1", "sidecar-mesh")) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=certs.cert_pem(pki.ca.trust_anchor).decode())
    if cert is not None:
        d = pki.root / f"client-{id(cert)}"
        certs.write_workload(d, cert, [pki.ca.trust_anchor])
        ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


@pytest.fixture
def world(tmp_path):
    proxies: list[Proxy] = []
    servers: list = []

    class World:
        pki = Pki(tmp_path / "pki")

        def app(self) -> RecordingUpstream:
            up = RecordingUpstream()
            servers.append(up)
            return up

        def echo(self) -> ThreadedServer:
            srv = ThreadedServer(echo_handler)
            servers.append(srv)
            return srv

        def proxy(self, cfg: dict, name: str) -> Proxy:
            proxy = Proxy(cfg, tmp_path / name)
            proxies.append(proxy)
            return proxy.wait_ready()

    yield World()
    errors = stop_all(proxies)
    for srv in servers:
        srv.close()
    assert not errors, errors


def test_http_between_two_sidecars_is_mutual_tls_with_one_handshake_per_pooled_connection(world):
    app = world.app()
    b = world.proxy(server_config(world.pki.workload("b", SERVER_ID), app.port), "b")
    a = world.proxy(client_config(world.pki.workload("a", CLIENT_ID), b.port("inbound")), "a")
    for i in range(10):
        assert get(a.port("out"), f"/r{i}") == (200, b"ok %d" % i)
    assert len(app.requests) == 10
    assert b.metric("sidecar_tls_terminations_total", listener="inbound", result="ok") == 1
    assert a.metric("sidecar_tls_originations_total", cluster="b", result="ok") == 1
    conns = [c for c in b.connections() if c["listener"] == "inbound"]
    assert conns and conns[0]["peer_identity"] == CLIENT_ID and conns[0]["tls"] in ("TLSv1.3", "TLSv1.2")
    assert b.metric("sidecar_tls_certificate_expiry_timestamp_seconds") > time.time()


def test_strict_refuses_plaintext_and_clients_without_a_valid_certificate_with_nothing_reaching_the_app(world):
    app = world.app()
    b = world.proxy(server_config(world.pki.workload("b", SERVER_ID), app.port), "b")
    port = b.port("inbound")
    assert refused(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n") == b""
    assert refused(port, b"\x00\x01binary protocol\r\n") == b""
    # A TLS client without a certificate, and one whose certificate another CA signed.
    other = certs.make_ca(TD)
    for cert in (None, certs.issue_workload(other, CLIENT_ID)):
        ctx = tls_client(world.pki, cert)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    if not s.recv(100):
                        raise ConnectionError("closed")
    wait_for(lambda: b.metric("sidecar_tls_terminations_total", listener="inbound", result="unknown_ca") == 1,
             5, what="the unknown_ca refusal counted")
    assert b.metric("sidecar_tls_terminations_total", listener="inbound", result="plaintext") == 2
    assert b.metric("sidecar_tls_terminations_total", listener="inbound", result="no_client_cert") == 1
    assert app.accepted == 0 and not app.requests


def test_permissive_serves_plaintext_and_mesh_mtls_and_relays_foreign_tls_untouched(world):
    app, echo = world.app(), world.echo()
    b = world.proxy(server_config(world.pki.workload("b", SERVER_ID), app.port, mode="permissive",
                                  echo_port=echo.port), "b")
    a = world.proxy(client_config(world.pki.workload("a", CLIENT_ID), b.port("inbound")), "a")
    assert get(b.port("inbound"), "/plain")[0] == 200
    assert get(a.port("out"), "/mesh")[0] == 200
    assert [r.target for r in app.requests] == [b"/plain", b"/mesh"]
    # An application's own TLS (no mesh ALPN) is not the proxy's to terminate: the bytes go through as sent.
    hello = client_hello(alpn=["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", b.port("raw")), timeout=10) as s:
        s.sendall(hello)
        assert recv_exactly(s, len(hello)) == hello
    assert b.metric("sidecar_tls_terminations_total", listener="inbound", result="ok") == 1


def client_hello(alpn: list[str]) -> bytes:
    """The first flight of a real TLS client, taken from memory BIOs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="app.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_route_authorization_allows_and_denies_by_spiffe_id(world):
    app, echo = world.app(), world.echo()
    routes = [{"match": {"path_prefix": "/ours"}, "cluster": "app",
               "authorization": {"allow_identities": [f"spiffe://{TD}/ns/a/*"]}},
              {"match": {"path_prefix": "/theirs"}, "cluster": "app",
               "authorization": {"allow_identities": [f"spiffe://{TD}/ns/other/sa/x"]}},
              {"match": {}, "cluster": "app"}]
    cfg = server_config(world.pki.workload("b", SERVER_ID), app.port, routes=routes, echo_port=echo.port)
    cfg["route_tables"]["raw"][0]["authorization"] = {"allow_identities": [f"spiffe://{TD}/ns/other/*"]}
    b = world.proxy(cfg, "b")
    a = world.proxy(client_config(world.pki.workload("a", CLIENT_ID), b.port("inbound"),
                                  tcp_port=b.port("raw")), "a")
    assert get(a.port("out"), "/ours/1")[0] == 200
    status, body = get(a.port("out"), "/theirs/1")
    assert status == 403
    assert [r.target for r in app.requests] == [b"/ours/1"]
    assert b.metric("sidecar_http_requests_total", listener="inbound",
                    route="in[1]", cluster="none", code_class="4xx", flags="AD") == 1
    # TCP: the connection is closed and the echo server never sees it.
    assert refused(a.port("tcp_out"), b"hello") == b""
    wait_for(lambda: b.metric("sidecar_tcp_connections_refused_total", listener="raw", reason="unauthorized") == 1,
             5, what="the TCP refusal counted")
    assert echo.accepted == 0


def test_tcp_over_mtls_is_sniffed_inside_and_relayed(world):
    app, echo = world.app(), world.echo()
    b = world.proxy(server_config(world.pki.workload("b", SERVER_ID), app.port, echo_port=echo.port), "b")
    a = world.proxy(client_config(world.pki.workload("a", CLIENT_ID), b.port("inbound"),
                                  tcp_port=b.port("raw")), "a")
    with socket.create_connection(("127.0.0.1", a.port("tcp_out")), timeout=10) as s:
        payload = bytes(range(256)) * 400
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
    assert b.metric("sidecar_tls_terminations_total", listener="raw", result="ok") == 1


def test_a_server_with_the_wrong_identity_is_refused_by_the_client_sidecar(world):
    app = world.app()
    b = world.proxy(server_config(world.pki.workload("b", f"spiffe://{TD}/ns/b/sa/impostor"), app.port), "b")
    a = world.proxy(client_config(world.pki.workload("a", CLIENT_ID), b.port("inbound")), "a")
    assert get(a.port("out"), "/x")[0] == 503
    assert a.metric("sidecar_tls_originations_total", cluster="b", result="identity_mismatch") == 1
    assert not app.requests


def test_rotation_under_load_keeps_every_request_succeeding(world):
    app = world.app()
    pki = world.pki
    b_tls = pki.workload("b", SERVER_ID)
    b = world.proxy(server_config(b_tls, app.port), "b")
    # No pooling on A: every request is a new mTLS handshake with B, across the rotation.
    a = world.proxy(client_config(pki.workload("a", CLIENT_ID), b.port("inbound"),
                                  pool={"max_idle_per_endpoint": 0}), "a")
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 2000:
            results.append(get(a.port("out"), "/load")[0])

    worker = threading.Thread(target=load)
    worker.start()
    wait_for(lambda: len(results) >= 20, 10, what="load before the rotation")
    rotated = pki.issued("b", SERVER_ID)  # B's files rewritten in place
    wait_for(lambda: b.metric("sidecar_tls_identity_reloads_total", result="applied") == 1, 10,
             what="B to pick up its new certificate")
    status, body = b.get("/tls")
    shown = json.loads(body)["tls"]
    assert status == 200 and shown["spiffe_id"] == SERVER_ID and shown["generation"] == 2
    assert shown["serial"] == f"{rotated.cert.serial_number:x}" and shown["expires_in_s"] > 0
    seen_after = len(results)
    wait_for(lambda: len(results) >= seen_after + 20, 10, what="load after the rotation")
    stop.set()
    worker.join(30)
    assert results and set(results) == {200}, {s: results.count(s) for s in set(results)}
    # New handshakes now get the new certificate.
    with socket.create_connection(("127.0.0.1", b.port("inbound")), timeout=10) as raw:
        client = pki.issued("probe", CLIENT_ID)
        with tls_client(pki, client).wrap_socket(raw) as s:
            served = s.getpeercert(binary_form=True)
    assert served == rotated.cert.public_bytes(Encoding.DER)


def test_a_config_whose_certificate_files_are_unusable_is_refused_naming_tls(world, tmp_path):
    app = world.app()
    b = world.proxy(server_config(world.pki.workload("b", SERVER_ID), app.port), "b")
    cfg = server_config(dict(world.pki.workload("b", SERVER_ID), private_key=str(tmp_path / "missing.pem")),
                        app.port)
    cfg["admin"] = b.config["admin"]
    cfg["listeners"]["inbound"]["port"] = b.port("inbound")
    status, body = b.post_config(cfg)
    assert status == 400, body
    assert any(e["path"] == "tls" for e in body["errors"]), body
    # The live identity still serves: an mTLS client gets through to the app.
    with socket.create_connection(("127.0.0.1", b.port("inbound")), timeout=10) as raw:
        with tls_client(world.pki, world.pki.issued("probe", CLIENT_ID)).wrap_socket(raw) as s:
            s.sendall(b"GET /still HTTP/1.1\r\nHost: t\r\nconnection: close\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert [r.target for r in app.requests] == [b"/still"]


def test_the_peer_identity_reaches_spans_and_the_access_log(world):
    from ..telemetry.otlp_receiver import OtlpReceiver
    app = world.app()
    with OtlpReceiver() as collector:
        cfg = server_config(world.pki.workload("b", SERVER_ID), app.port)
        cfg["telemetry"] = {"metrics": {"port": 0}, "access_log": {"enabled": True, "format": "json"},
                            "tracing": {"enabled": True, "sampling": 1.0, "endpoint": collector.endpoint}}
        b = world.proxy(cfg, "b")
        a = world.proxy(client_config(world.pki.workload("a", CLIENT_ID), b.port("inbound")), "a")
        assert get(a.port("out"), "/who")[0] == 200
        server = [s for s in collector.wait_for_spans(2) if s.kind == "SERVER"]
        assert server and server[0].attributes["sidecar.peer_identity"] == CLIENT_ID
    line = wait_for(lambda: next((l for l in b.log().splitlines() if '"path":"/who"' in l), None), 5,
                    what="B's access-log line")
    assert json.loads(line)["peer_identity"] == CLIENT_ID

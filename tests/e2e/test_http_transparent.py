"""HTTP/1.1 at L7 on the transparent outbound listener, end to end, in network namespaces.

As in test_transparent.py, a NAT rule in the pod redirects the app's
connections to the remote's port 8080 into the proxy (which runs as the
exempt group 1337). The outbound listener is ``protocol: auto``: curl's
requests are handled at L7 (forwarding headers added, one route answered by
the proxy itself, everything else to where the app was going), while a
connection that does not speak HTTP to the same server is still relayed as
bytes.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import h11
import pytest

from ..support import require_tools, round_trip_upper
from .netns import POD_V4, POD_V6, REMOTE_V4, REMOTE_V6, connect_from, entered, run_in
from .test_transparent import APP_PORT, OUTBOUND_PORT, PROXY_GID, redirect_app_port

pytestmark = pytest.mark.e2e

SPECIAL_BODY = "answered by the sidecar\n"
HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


def transparent_config(codec: str) -> dict:
    listener = {"port": OUTBOUND_PORT, "transparent": True, "protocol": "auto", "routes": "out",
                "http": {"codec": codec}}
    return {
        "version": 1,
        "node": {"id": "pod-under-test"},
        "admin": {"address": "127.0.0.1", "port": 15000},
        "listeners": {"outbound": {"address": "0.0.0.0", **listener},
                      "outbound6": {"address": "::", **listener}},
        "clusters": {"original-destination": {"original_destination": True}},
        "route_tables": {"out": [
            {"name": "special", "match": {"path_prefix": "/special"},
             "direct_response": {"status": 200, "body": SPECIAL_BODY, "content_type": "text/plain"}},
            {"name": "passthrough", "match": {}, "cluster": "original-destination"},
        ]},
    }


class HttpOrBytesServer:
    """The remote server: HTTP/1.1 (h11) when a connection starts like a request, else an upper-caser.

    Records every HTTP request's head and the peer it came from.
    """

    def __init__(self, namespace: str, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with entered(namespace):
            self._listener = socket.create_server((host, port), family=family)
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.byte_peers: list[tuple] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            with self.lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, peer[:2]), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        try:
            first = conn.recv(65536)
            if first.startswith(HTTP_METHODS):
                self._http(conn, peer, first)
            else:
                with self.lock:
                    self.byte_peers.append(peer)
                data = first
                while data:
                    conn.sendall(data.upper())
                    data = conn.recv(65536)
        except (OSError, h11.ProtocolError):
            pass
        finally:
            conn.close()

    def _http(self, conn: socket.socket, peer: tuple, first: bytes) -> None:
        h = h11.Connection(h11.SERVER)
        h.receive_data(first)
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(conn.recv(65536))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                record = {"peer": peer, "method": event.method.decode(), "target": event.target.decode(),
                          "headers": [(k.decode(), v.decode()) for k, v in event.headers]}
            elif isinstance(event, h11.EndOfMessage):
                with self.lock:
                    self.requests.append(record)
                body = f"real server saw {record['target']}\n".encode()
                conn.sendall(h.send(h11.Response(status_code=200, reason=b"OK", headers=[
                    ("content-type", "text/plain"), ("content-length", str(len(body)))])))
                conn.sendall(h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
                if h.our_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server_for(netns_pair):
    servers: list[HttpOrBytesServer] = []

    def start(host: str) -> HttpOrBytesServer:
        server = HttpOrBytesServer(netns_pair.remote, host, APP_PORT)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def curl_in(namespace: str, url: str, tmp_path: Path) -> tuple[int, dict[str, str], bytes]:
    """curl run by the app (uid 0, gid 0: redirected) inside the pod; status, header fields, body."""
    head_file, body_file = tmp_path / "head.txt", tmp_path / "body.bin"
    run_in(namespace, ["curl", "-sS", "--globoff", "--noproxy", "*", "--max-time", "10",
                       "-D", str(head_file), "-o", str(body_file), url], timeout=15)
    lines = head_file.read_bytes().decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body_file.read_bytes()


def url(host: str, path: str) -> str:
    return f"http://[{host}]:{APP_PORT}{path}" if ":" in host else f"http://{host}:{APP_PORT}{path}"


CASES = [
    pytest.param(REMOTE_V4, POD_V4, "outbound", "h11", id="ipv4-h11"),
    pytest.param(REMOTE_V4, POD_V4, "outbound", "httptools", id="ipv4-httptools"),
    pytest.param(REMOTE_V6, POD_V6, "outbound6", "httptools", id="ipv6-httptools"),
]


@pytest.mark.parametrize("remote, pod, listener, codec", CASES)
def test_http_through_the_transparent_outbound_listener(netns_pair, start_proxy, server_for, tmp_path,
                                                          remote, pod, listener, codec):
    require_tools("curl")
    redirect_app_port(netns_pair.pod)
    proxy = start_proxy(transparent_config(codec), gid=PROXY_GID)
    server = server_for(remote)

    # An ordinary request reaches the real server, with the proxy's headers added.
    status, _, body = curl_in(netns_pair.pod, url(remote, "/hello?x=1"), tmp_path)
    assert (status, body) == (200, b"real server saw /hello?x=1\n")
    assert len(server.requests) == 1, server.requests
    seen = server.requests[0]
    headers = dict(seen["headers"])
    assert seen["peer"][0] == pod, "the proxy's own connection, from the pod"
    assert headers["host"] == (f"[{remote}]:{APP_PORT}" if ":" in remote else f"{remote}:{APP_PORT}")
    assert headers["x-forwarded-for"] == pod
    assert headers["x-forwarded-proto"] == "http"
    assert headers.get("x-request-id"), f"no x-request-id: {headers}"

    # /special is answered by the proxy; the server never hears of it.
    status, fields, body = curl_in(netns_pair.pod, url(remote, "/special/offer"), tmp_path)
    assert (status, body) == (200, SPECIAL_BODY.encode())
    assert fields["content-type"].startswith("text/plain")
    assert len(server.requests) == 1, server.requests

    # Bytes that are not HTTP, to the same server and port, are relayed as they are.
    with contextlib.closing(connect_from(netns_pair.pod, remote, APP_PORT)) as app:
        round_trip_upper(app, b"\x00\x01 not http at all")
        round_trip_upper(app, b"second exchange on the same connection")
    assert [peer[0] for peer in server.byte_peers] == [pod]

    def detections(outcome: str) -> float:
        return proxy.metric("sidecar_protocol_detections_total", listener=listener, outcome=outcome)
    assert (detections("http1"), detections("opaque")) == (2, 1)

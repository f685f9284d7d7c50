"""A recording HTTP/1.1 upstream for black-box tests of the L7 proxy.

``RecordingUpstream`` is a threaded TCP server on loopback. It records every
connection it accepts and every byte each one received, parses requests with
h11 (keep-alive, pipelining, ``Expect: 100-continue``) and answers each with
a small ``content-length`` 200 unless a ``Script`` says otherwise. Scripts
are consumed in order by the next request to arrive (``script``) or by the
next connection to be accepted (``script_connection``), whichever connection
the proxy picks from its pool.

Everything is bounded: the accept loop polls a stop flag, ``close`` shuts
down every connection so no thread outlives the test.
"""
from __future__ import annotations

import socket
import threading
from collections import deque
from dataclasses import dataclass, field

import h11

# The proxy refuses heads over 60 KiB; the upstream must not be the one that
# limits what a test can send through it.
MAX_EVENT = 4 << 20


@dataclass(frozen=True)
class Script:
    """What the upstream does with one request (or one freshly accepted connection).

    ``send``: bytes to write and float pauses (seconds), in order; ``None``
    means the default 200. ``at``: when to start sending: ``"end"`` once the
    request is complete, ``"head"`` once its head is parsed (the body is not
    waited for), ``"accept"`` at once (connection scripts only).
    ``interim``: bytes written right after the head, before the body is read
    (a ``100 Continue``). ``after``: ``"serve"`` parse the next request on the
    connection, ``"close"`` close it, ``"hold"`` keep it open answering
    nothing, recording bytes until the peer closes.
    """

    send: tuple | None = None
    at: str = "end"
    interim: bytes | None = None
    after: str = "serve"


def reply(*parts, at: str = "end", after: str = "serve", interim: bytes | None = None) -> Script:
    return Script(send=tuple(parts), at=at, interim=interim, after=after)


class UpstreamConn:
    """One accepted connection: what it received and how it ended."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.data = bytearray()
        self.peer_closed = False   # the proxy closed (EOF) or reset its side
        self.reset = False
        self.closed = False        # the handler finished and closed the socket
        self.requests: list[UpstreamRequest] = []
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        return (f"UpstreamConn(#{self.index}, {len(self.data)} bytes, requests={len(self.requests)}, "
                f"peer_closed={self.peer_closed}, closed={self.closed})")


@dataclass
class UpstreamRequest:
    seq: int
    conn: int
    method: bytes
    target: bytes
    http_version: bytes
    headers: list          # [(name as sent, value)]
    body: bytearray = field(default_factory=bytearray)
    trailers: list = field(default_factory=list)
    complete: bool = False
    scripted: bool = False

    def header(self, name: bytes) -> list[bytes]:
        """Every value of field ``name`` (any case)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass(frozen=True)
class Mark:
    lengths: tuple[int, ...]   # bytes received so far, per connection
    requests: int


class RecordingUpstream:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.conns: list[UpstreamConn] = []
        self.requests: list[UpstreamRequest] = []
        self.errors: list[BaseException] = []
        self._request_scripts: deque[Script] = deque()
        self._conn_scripts: deque[Script] = deque()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"upstream-{self.port}")
        self._thread.start()

    # -- what a test drives --------------------------------------------------------------

    def script(self, *scripts: Script) -> None:
        """Answer the next requests (on whatever connection) with these, in order."""
        self._request_scripts.extend(scripts)

    def script_connection(self, *scripts: Script) -> None:
        """Run these on the next accepted connections, before any request is parsed."""
        self._conn_scripts.extend(scripts)

    def clear_scripts(self) -> None:
        self._request_scripts.clear()
        self._conn_scripts.clear()

    @property
    def pending_scripts(self) -> int:
        return len(self._request_scripts) + len(self._conn_scripts)

    @property
    def accepted(self) -> int:
        return len(self.conns)

    @property
    def closed(self) -> int:
        return sum(c.closed for c in list(self.conns))

    @property
    def peer_closed(self) -> int:
        return sum(c.peer_closed for c in list(self.conns))

    @property
    def open_connections(self) -> list[UpstreamConn]:
        return [c for c in list(self.conns) if not c.closed]

    def mark(self) -> Mark:
        with self._lock:
            return Mark(tuple(len(c.data) for c in self.conns), len(self.requests))

    def received_since(self, mark: Mark) -> list[tuple[UpstreamConn, bytes]]:
        """(connection, bytes) for every connection that received bytes after ``mark``."""
        with self._lock:
            out = []
            for conn in self.conns:
                start = mark.lengths[conn.index] if conn.index < len(mark.lengths) else 0
                if len(conn.data) > start:
                    out.append((conn, bytes(conn.data[start:])))
            return out

    def requests_since(self, mark: Mark) -> list[UpstreamRequest]:
        with self._lock:
            return list(self.requests[mark.requests:])

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
        for conn in list(self.conns):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- the server ----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                sock, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            sock.settimeout(None)
            with self._lock:
                conn = UpstreamConn(len(self.conns), sock)
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True,
                             name=f"upstream-{self.port}-{conn.index}").start()

    def _run(self, conn: UpstreamConn) -> None:
        try:
            self._serve(conn)
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            # The proxy forwarded something an HTTP/1.1 server refuses: record it.
            conn.error = exc
            self.errors.append(exc)
            try:
                conn.sock.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            except OSError:
                pass
        except OSError:
            pass
        except BaseException as exc:  # a bug here: keep it for the test to see
            conn.error = exc
            self.errors.append(exc)
        finally:
            try:
                conn.sock.close()
            finally:
                conn.closed = True

    def _recv(self, conn: UpstreamConn) -> bytes:
        try:
            data = conn.sock.recv(1 << 18)
        except ConnectionResetError:
            conn.reset = True
            data = b""
        with self._lock:
            if data:
                conn.data += data
            else:
                conn.peer_closed = True
        return data

    def _send(self, conn: UpstreamConn, parts) -> None:
        for part in parts:
            if isinstance(part, (int, float)):
                threading.Event().wait(part)
            elif part:
                conn.sock.sendall(part)

    def _hold(self, conn: UpstreamConn) -> None:
        while self._recv(conn):
            pass

    def _finish(self, conn: UpstreamConn, after: str) -> bool:
        """True to go on serving the connection."""
        if after == "hold":
            self._hold(conn)
            return False
        if after == "close":
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        return True

    def _serve(self, conn: UpstreamConn) -> None:
        if self._conn_scripts:
            try:
                script = self._conn_scripts.popleft()
            except IndexError:
                script = None
            if script is not None and script.at == "accept":
                self._send(conn, script.send or ())
                if not self._finish(conn, script.after):
                    return
        leftover = b""
        while True:
            # A fresh h11 state per request: a raw scripted answer does not
            # confuse the next request's parse, and leftovers carry over.
            h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
            if leftover:
                h.receive_data(leftover)
            event = self._next(conn, h)
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            with self._lock:
                req = UpstreamRequest(seq=len(self.requests), conn=conn.index, method=event.method,
                                      target=event.target, http_version=event.http_version,
                                      headers=list(event.headers.raw_items()))
                self.requests.append(req)
                conn.requests.append(req)
            try:
                script = self._request_scripts.popleft()
            except IndexError:
                script = None
            req.scripted = script is not None and script.send is not None
            if script is not None and script.interim:
                conn.sock.sendall(script.interim)
            elif not req.scripted and h.they_are_waiting_for_100_continue:
                conn.sock.sendall(h.send(h11.InformationalResponse(status_code=100, headers=[])))
            if req.scripted and script.at == "head":
                self._send(conn, script.send)
                if not self._finish(conn, script.after):
                    return
                req.scripted = False  # answered; read the body and go on
                script = None
                done_answering = True
            else:
                done_answering = False
            while True:
                event = self._next(conn, h)
                if isinstance(event, h11.Data):
                    req.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    req.trailers = list(event.headers.raw_items())
                    req.complete = True
                    break
                else:
                    raise h11.RemoteProtocolError(f"unexpected {event!r} in a request body")
            if done_answering:
                leftover = h.trailing_data[0]
                continue
            if script is not None and script.send is not None:
                self._send(conn, script.send)
                if not self._finish(conn, script.after):
                    return
                leftover = h.trailing_data[0]
                continue
            body = b"ok %d" % req.seq
            headers = [("content-length", str(len(body))), ("x-upstream-conn", str(conn.index)),
                       ("x-upstream-seq", str(req.seq))]
            out = h.send(h11.Response(status_code=200, headers=headers))
            if req.method != b"HEAD":
                out += h.send(h11.Data(data=body))
            out += h.send(h11.EndOfMessage())
            conn.sock.sendall(out)
            if h.our_state is h11.MUST_CLOSE:
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                self._hold(conn)  # see the proxy's close too
                return
            leftover = h.trailing_data[0]

    def _next(self, conn: UpstreamConn, h: h11.Connection):
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(self._recv(conn))
                continue
            return event


def parse_requests(raw: bytes) -> tuple[list[tuple[h11.Request, bytes, list]], bytes]:
    """Requests in ``raw`` as an HTTP/1.1 server parses them: ([(head, body, trailers)], leftover).

    Stops at the first incomplete request: its bytes are the leftover.
    Raises h11.RemoteProtocolError on anything h11 refuses.
    """
    out = []
    while raw:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_EVENT)
        h.receive_data(raw)
        head, body, trailers = None, bytearray(), []
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                return out, raw
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers.raw_items())
                break
        out.append((head, bytes(body), trailers))
        raw = h.trailing_data[0]
    return out, b""

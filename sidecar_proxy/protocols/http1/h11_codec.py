"""HTTP/1.1 on h11: the reference codec (and the fallback without httptools).

h11 is a client/server state machine and lenient in places (it folds
obs-fold lines, accepts bare LF line ends, CTLs in values, zero-padded
20-digit chunk sizes and any ``;...`` chunk extension, merges repeated
Content-Length fields). So:

* Heads: this codec finds where a head ends, as the httptools codec does,
  and runs ``strict.parse_head`` on it *before* h11 sees it: every decision
  and every refusal is strict's, identical to the other codec's. h11 then
  parses the same head (a second opinion: if it refuses what strict
  accepted, that is a 400/502 too) and drives the body.
* Bodies: h11's readers, with the chunk reader replaced by one that checks
  each chunk line and the trailer section with strict's rules first.
* One ``h11.Connection`` per message (per request/response exchange in role
  "response"): the proxy answers requests itself, so instead of feeding h11
  fake responses to reach ``start_next_cycle``, the bytes h11 did not use
  (``trailing_data``) go to the next connection. In role "response" the
  connection first sends a stand-in request with the expected method (HEAD
  and CONNECT change the framing), proposing an upgrade so h11 accepts a 101.
"""
from __future__ import annotations

from collections import deque

import h11
from h11._readers import ChunkedReader   # replaced per message by _StrictChunkedReader

from ..events import BODY_CHUNKED, BODY_TUNNEL, HttpError, Limits, Parser
from . import strict


class _StrictChunkedReader(ChunkedReader):
    """h11's chunk reader after strict's checks of each chunk-size line and
    of the trailer section (h11 would fold, accept bare LF, long sizes)."""

    def __init__(self, request: bool, limits: Limits) -> None:
        super().__init__()
        self._request = request
        self._limits = limits
        self._trailer_buf: strict.HeadBuffer | None = None
        self._trailer_seen = 0

    def __call__(self, buf):
        data = buf._data
        if self._reading_trailer:
            if data and not data.startswith(b"\r\n") and data != b"\r":
                self._check_trailers(data)
        elif not self._bytes_in_chunk:
            # A chunk-size line follows the CRLF still to discard: h11 reads
            # both in one call, so check the line before h11 gets there.
            start = len(self._bytes_to_discard)
            if len(data) > start:
                eol = data.find(b"\r\n", start)
                if eol < 0:
                    if len(data) - start > strict.MAX_CHUNK_LINE_BYTES or data.find(b"\n", start) >= 0:
                        raise strict.fail(self._request, 400, "malformed chunk size line")
                elif eol - start > strict.MAX_CHUNK_LINE_BYTES:
                    raise strict.fail(self._request, 400, "chunk size line too long")
                else:
                    strict.chunk_size(bytes(data[start:eol]), self._request)
        return super().__call__(buf)

    def _check_trailers(self, data: bytearray) -> None:
        # h11 extracts nothing until the section is complete, so the buffer
        # only grows; the HeadBuffer sees each new byte once.
        if self._trailer_buf is None:
            self._trailer_buf = strict.HeadBuffer(self._request, self._limits, trailers=True)
        new = bytes(data[self._trailer_seen:])
        self._trailer_seen = len(data)
        if new and self._trailer_buf.add(new):
            end = data.find(b"\r\n\r\n")
            strict.parse_trailers(bytes(data[:end + 2]), self._request, self._limits)


class H11Parser(Parser):
    def __init__(self, role: str, sink, limits: Limits) -> None:
        if role not in ("request", "response"):
            raise ValueError(f"role must be 'request' or 'response', not {role!r}")
        self._request = role == "request"
        self._sink = sink
        self._limits = limits
        self._conn: h11.Connection | None = None    # the exchange in progress
        self._body = False                # _conn is reading a body
        self._switch = False              # the stream stops being HTTP/1 after this message
        self._head_buf: strict.HeadBuffer | None = None
        self._pending = b""               # a lone CR before a start line
        self._methods: deque = deque()
        self._error: Exception | None = None
        self._done = False

    def set_sink(self, sink) -> None:
        """Deliver the next messages to ``sink`` (a pooled connection's next exchange)."""
        self._sink = sink

    def expect(self, method: bytes) -> None:
        self._methods.append(method)

    def feed(self, data: bytes) -> bytes | None:
        if self._error is not None:
            raise self._error
        if not data:
            return None
        try:
            if self._body:
                self._conn.receive_data(data)
                rest = self._pump()
                if rest is None or self._done:
                    return rest
                data = rest
            elif self._head_buf is not None:
                if not self._head_buf.add(data):
                    return None
                data = bytes(self._head_buf.data)
                self._head_buf = None
            elif self._pending:
                data = self._pending + data
                self._pending = b""
            return self._heads(data)
        except HttpError as exc:
            self._error = exc
            raise

    def feed_eof(self) -> bool:
        if self._error is not None:
            return self._done
        self._error = RuntimeError("feed after feed_eof")
        if self._body:
            self._conn.receive_data(b"")
            try:
                self._pump()                # ends a read-until-close body
            except HttpError:
                return False
            return not self._body
        if self._conn is not None or self._head_buf is not None or self._pending not in (b"", b"\r"):
            return False
        return self._request or not self._methods

    # -- heads --------------------------------------------------------------

    def _heads(self, data: bytes) -> bytes | None:
        """Heads (and bodies, through _pump) from ``data`` on."""
        request = self._request
        limits = self._limits
        pos = 0
        while pos < len(data):
            if data[pos] in b"\r\n":
                pos = strict.skip_empty_lines(data, pos, request)
                if pos < 0:
                    self._pending = b"\r"
                    return None
                if pos == len(data):
                    return None
            hend = data.find(b"\r\n\r\n", pos)
            if hend < 0:
                head_buf = strict.HeadBuffer(request, limits)
                head_buf.add(data[pos:])
                self._head_buf = head_buf
                return None
            hend += 4
            head = data[pos:hend]
            method = self._methods[0] if self._methods else b"GET"
            msg = strict.parse_head(head, request, limits, method)
            msg.raw = head
            conn = self._conn
            if conn is None:
                conn = self._conn = self._new_conn(method)
            conn.receive_data(self._h11_head(head, msg))
            event = self._next(conn)
            self._check_event(event, msg)
            if type(conn._reader) is ChunkedReader:
                conn._reader = _StrictChunkedReader(request, limits)
            pos = hend
            if request:
                self._switch = msg.upgrade is not None or msg.framing == BODY_TUNNEL
            elif (msg.status >= 200 or msg.status == 101) and self._methods:
                self._methods.popleft()
            self._sink.on_head(msg)
            if not request:
                if msg.status < 200 and msg.status != 101:
                    continue                  # informational: the final head follows
                if msg.framing == BODY_TUNNEL:
                    return self._stop(data[pos:])
            # h11 frames the body and hands back what follows it.
            self._body = True
            if pos < len(data):
                conn.receive_data(data[pos:])
            rest = self._pump()
            if rest is None or self._done:
                return rest
            data = rest
            pos = 0
        return None

    def _new_conn(self, method: bytes) -> h11.Connection:
        size = self._limits.max_header_bytes + strict.MAX_CHUNK_LINE_BYTES + 64   # ours fire first
        if self._request:
            return h11.Connection(h11.SERVER, max_incomplete_event_size=size)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=size)
        if method == b"CONNECT":
            stand_in = h11.Request(method=method, target=b"x:1", headers=[(b"host", b"x:1")])
        else:
            stand_in = h11.Request(method=method, target=b"/", headers=[
                (b"host", b"x"), (b"connection", b"upgrade"), (b"upgrade", b"x")])
        conn.send(stand_in)
        conn.send(h11.EndOfMessage())
        return conn

    def _h11_head(self, head: bytes, msg) -> bytes:
        """The head as h11 gets it. h11 supports no transfer coding but a lone
        ``chunked``: a response whose codings strict accepted (``gzip,
        chunked``) reaches h11 with that one field made plain."""
        if self._request:
            return head
        codings = [value for name, value in msg.headers if name == b"transfer-encoding"]
        if not codings or (len(codings) == 1 and codings[0].lower() == b"chunked"):
            return head
        lines = [head[:head.find(b"\r\n")]]
        lines += [name + b": " + value for name, value in msg.headers if name != b"transfer-encoding"]
        if msg.framing == BODY_CHUNKED:
            lines.append(b"transfer-encoding: chunked")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _check_event(self, event, msg) -> None:
        expected = h11.Request if self._request else (
            h11.InformationalResponse if msg.status < 200 else h11.Response)
        if type(event) is not expected:
            raise strict.fail(self._request, 400, f"h11 disagrees on the head: {event!r}")

    # -- bodies -------------------------------------------------------------

    def _next(self, conn: h11.Connection):
        try:
            return conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise strict.fail(self._request, exc.error_status_hint, "h11: " + str(exc)) from None

    def _pump(self) -> bytes | None:
        """Body events until the message ends (-> the bytes h11 left) or
        more data is needed (-> None)."""
        conn = self._conn
        sink = self._sink
        while True:
            event = self._next(conn)
            kind = type(event)
            if kind is h11.Data:
                if event.data:
                    sink.on_data(bytes(event.data))
            elif kind is h11.EndOfMessage:
                rest = conn.trailing_data[0]
                self._conn = None
                self._body = False
                sink.on_end(list(event.headers) or None)
                if self._switch:
                    return self._stop(rest)
                return rest
            elif event is h11.NEED_DATA:
                return None
            else:
                raise strict.fail(self._request, 400, f"unexpected h11 event {event!r}")

    def _stop(self, rest: bytes) -> bytes:
        self._done = True
        self._error = RuntimeError("the stream is no longer HTTP/1: feed the returned bytes elsewhere")
        return rest

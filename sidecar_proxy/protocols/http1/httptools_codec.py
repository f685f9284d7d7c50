"""HTTP/1.1 on httptools (llhttp): the fast codec.

How the work is split, and why:

* This codec finds where each head ends (the first CRLF CRLF) and gives
  llhttp exactly one complete head at a time. llhttp parses every pipelined
  message of a buffer in one call and reports no offsets, so this is the only
  way to know each head's exact size (the limits), to see each request line
  raw (llhttp accepts ``GET  /`` and ``RTSP/1.0``) and to return the bytes
  after an upgrade.
* llhttp (strict: no lenient flags) checks the head syntax in C: methods,
  target octets, field names and values, obs-fold, bare CR/LF, Content-Length
  and Transfer-Encoding syntax. Python only collects ``(name, value)``
  through one callback per field.
* ``strict`` then decides framing and the rest from the field list, exactly
  as for the h11 codec. When llhttp refuses a head, ``strict.parse_head``
  runs on it to name the status, so both codecs give the same one (and
  strict's verdict stands where it finds the head valid).
* Bodies are framed here: Content-Length bodies are sliced (and also given
  to llhttp, which then stays in step without a new parser); chunked bodies
  are decoded here with ``strict``'s chunk-line rules (llhttp accepts
  zero-padded sizes beyond 16 digits and ``;a=`` extensions), after which
  the llhttp parser is replaced.
"""
from __future__ import annotations

from collections import deque

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser, HttpResponseParser

from ..events import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_TUNNEL, HttpError, Limits, Parser, Sink
from . import strict

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)
_VERSIONS = strict.VERSIONS
_MAX_CHUNK_LINE = strict.MAX_CHUNK_LINE_BYTES


class _Collector:
    """The llhttp callbacks. A separate object (not the parser) so that
    llhttp's references to its bound methods make no reference cycle."""

    __slots__ = ("fields", "done")

    def __init__(self) -> None:
        self.fields: list = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp skips OWS before a value but keeps it after.
        self.fields.append((name.lower(), value.rstrip(b" \t")))

    def on_message_complete(self) -> None:
        self.done = True


class HttptoolsParser(Parser):
    __slots__ = ("_request", "_sink", "_limits", "_c", "_hp", "_state", "_left", "_pending",
                 "_head_buf", "_switch", "_methods", "_error")
    # Typed C fields when compiled (compiled.pxd_text): reached without a lookup.
    _sink: Sink
    _c: _Collector

    def __init__(self, role: str, sink, limits: Limits) -> None:
        if role not in ("request", "response"):
            raise ValueError(f"role must be 'request' or 'response', not {role!r}")
        self._request = role == "request"
        self._sink = sink
        self._limits = limits
        self._c = _Collector()
        self._hp = self._llhttp()
        self._state = _HEAD
        self._left = 0                    # bytes left in the body (LENGTH) or chunk
        self._pending = b""               # an incomplete chunk line / CRLF, kept for the next feed
        self._head_buf: strict.HeadBuffer | None = None   # a head or trailers arriving in pieces
        self._switch = False              # the stream stops being HTTP/1 when this message ends
        self._methods: deque = deque()    # response role: methods of requests awaiting answers
        self._error: Exception | None = None

    def _llhttp(self):
        return (HttpRequestParser if self._request else HttpResponseParser)(self._c)

    # -- the Parser interface -------------------------------------------------

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
            head_buf = self._head_buf
            if head_buf is not None:
                if not head_buf.add(data):
                    return None
                data = bytes(head_buf.data)
                self._head_buf = None
            elif self._pending:
                data = self._pending + data
                self._pending = b""
            return self._run(data)
        except HttpError as exc:
            self._error = exc
            raise

    def feed_eof(self) -> bool:
        state = self._state
        if self._error is not None:
            return state == _DONE
        self._error = RuntimeError("feed after feed_eof")
        if state == _UNTIL_CLOSE:
            self._state = _DONE
            self._sink.on_end(None)
            return True
        if state != _HEAD or self._head_buf is not None or self._pending not in (b"", b"\r"):
            return False
        return self._request or not self._methods

    # -- the byte loop ----------------------------------------------------------

    def _run(self, data: bytes) -> bytes | None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._head(data, pos) if self._request else self._response_head(data, pos)
                if pos < 0:
                    return None
                if self._state == _DONE:
                    return data[pos:]
            elif state == _LENGTH or state == _CHUNK_DATA:
                left = self._left
                if end - pos >= left:
                    chunk = data if (pos == 0 and left == end) else data[pos:pos + left]
                    pos += left
                    self._left = 0
                else:
                    chunk = data[pos:] if pos else data
                    self._left = left - (end - pos)
                    pos = end
                if state == _LENGTH:
                    # Keeps llhttp in step (no callbacks, no copy), unless it
                    # already ended the message: httptools makes llhttp skip
                    # the body of an Upgrade request.
                    if not self._c.done:
                        try:
                            self._hp.feed_data(chunk)
                        except HttpParserUpgrade:
                            pass
                    self._sink.on_data(chunk)
                    if not self._left:
                        self._end(None)
                        if self._state == _DONE:
                            return data[pos:]
                else:
                    self._sink.on_data(chunk)
                    if not self._left:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    rest = data[pos:]
                    if len(rest) > _MAX_CHUNK_LINE or b"\n" in rest:
                        raise strict.fail(self._request, 400, "malformed chunk size line")
                    self._pending = rest
                    return None
                if eol - pos > _MAX_CHUNK_LINE:
                    raise strict.fail(self._request, 400, "chunk size line too long")
                size = strict.chunk_size(data[pos:eol], self._request)
                pos = eol + 2
                if size:
                    self._left = size
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            elif state == _CHUNK_CRLF:
                if data.startswith(b"\r\n", pos):
                    pos += 2
                    self._state = _CHUNK_SIZE
                elif end - pos == 1 and data[pos] == 13:
                    self._pending = b"\r"
                    return None
                else:
                    raise strict.fail(self._request, 400, "chunk data not followed by CRLF")
            elif state == _TRAILERS:
                pos = self._trailers(data, pos)
                if pos < 0:
                    return None
                if self._state == _DONE:
                    return data[pos:]
            elif state == _UNTIL_CLOSE:
                self._sink.on_data(data[pos:] if pos else data)
                return None
        return None

    def _end(self, trailers) -> None:
        """The message ended: tell the sink, get llhttp ready for the next
        head, or stop if the stream stops being HTTP/1 here."""
        self._sink.on_end(trailers)
        if self._switch:
            self._stop()
            return
        if not self._c.done:
            self._hp = self._llhttp()
        self._state = _HEAD

    def _stop(self) -> None:
        self._state = _DONE
        self._error = RuntimeError("the stream is no longer HTTP/1: feed the returned bytes elsewhere")

    def _skip_empty(self, data: bytes, pos: int) -> int:
        """Empty lines before a start line: -> the position after them (the
        byte loop carries on from there), or -1 after a lone CR."""
        pos = strict.skip_empty_lines(data, pos, self._request)
        if pos < 0:
            self._pending = b"\r"
        return pos

    def _feed_head(self, head: bytes):
        """Let llhttp check ``head``; -> its (name, value) fields, or the
        head strict parsed itself when llhttp refused it (see _overrule)."""
        c = self._c
        c.fields = fields = []
        c.done = False
        try:
            self._hp.feed_data(head)
        except HttpParserUpgrade:
            pass                            # CONNECT / Upgrade: judged from the fields below
        except HttpParserError:
            return self._overrule(head)
        return fields

    def _overrule(self, head: bytes):
        """llhttp refused ``head``. strict's complete check names the status,
        as the h11 codec would. Where strict finds the head valid, strict's
        rules are the contract and win: llhttp refuses a few valid heads
        (``Transfer-Encoding: chunked<HTAB>``; a 101 without Upgrade fields,
        which it parses whole, then pauses in a way httptools reports as an
        error). The llhttp parser is dead either way."""
        request = self._request
        self._hp = self._llhttp()
        self._c.done = True                 # llhttp has nothing of this message to finish
        try:
            return strict.parse_head(head, request, self._limits, self._methods[0] if self._methods else b"GET")
        except HttpError as error:
            raise error from None

    def _head(self, data: bytes, pos: int) -> int:
        """A request head at ``pos``: -> where its body starts, or -1 when
        more bytes are needed."""
        hend = data.find(b"\r\n\r\n", pos)
        if hend < 0:
            return self._partial_head(data, pos)
        hend += 4
        limits = self._limits
        eol = data.find(b"\r\n", pos)
        try:
            method, target, version = data[pos:eol].split(b" ")
            version = _VERSIONS[version]
            if not target or data[pos] < 33:     # llhttp would skip a leading CR/LF
                raise ValueError
        except (ValueError, KeyError):
            # Rare: empty lines first, or a bad request line; the latter
            # raises strict's precise error.
            if data[pos] in b"\r\n":
                return self._skip_empty(data, pos)
            strict.parse_request_line(data[pos:eol], limits)
            raise HttpError(400, "malformed request line") from None
        if len(target) > limits.max_uri_bytes:
            raise HttpError(414, f"request target over {limits.max_uri_bytes} bytes")
        head = data if (pos == 0 and hend == len(data)) else data[pos:hend]
        fields = self._feed_head(head)
        if type(fields) is list:
            if hend - pos > limits.max_header_bytes or len(fields) > limits.max_header_count:
                strict.check_head_size(hend - pos, len(fields), True, limits)
            req = strict.build_request(method, target, version, fields, limits)
        else:
            req = fields
        req.raw = head
        self._switch = req.upgrade is not None or req.framing == BODY_TUNNEL
        self._sink.on_head(req)
        framing = req.framing
        if framing == BODY_LENGTH:
            self._left = req.length
            self._state = _LENGTH
        elif framing == BODY_CHUNKED:
            self._state = _CHUNK_SIZE
        else:
            self._end(None)
        return hend

    def _response_head(self, data: bytes, pos: int) -> int:
        hend = data.find(b"\r\n\r\n", pos)
        if hend < 0:
            return self._partial_head(data, pos)
        hend += 4
        eol = data.find(b"\r\n", pos)
        version = _VERSIONS.get(data[pos:pos + 8])
        if version is None or data[pos + 8] != 32:
            if data[pos] in b"\r\n":
                return self._skip_empty(data, pos)
            strict.parse_status_line(data[pos:eol])
            raise strict.fail(False, 502, "malformed status line")
        head = data if (pos == 0 and hend == len(data)) else data[pos:hend]
        fields = self._feed_head(head)
        methods = self._methods
        if type(fields) is list:            # llhttp checked the 3 status digits
            limits = self._limits
            if hend - pos > limits.max_header_bytes or len(fields) > limits.max_header_count:
                strict.check_head_size(hend - pos, len(fields), False, limits)
            status = int(data[pos + 9:pos + 12])
            resp = strict.build_response(status, data[pos + 13:eol], version, fields,
                                         methods[0] if methods else b"GET")
        else:
            resp = fields
            status = resp.status
        resp.raw = head
        if (status >= 200 or status == 101) and methods:
            methods.popleft()
        self._sink.on_head(resp)
        framing = resp.framing
        if framing == BODY_LENGTH:
            self._left = resp.length
            self._state = _LENGTH
        elif framing == BODY_CHUNKED:
            self._state = _CHUNK_SIZE
        elif framing == BODY_NONE:
            if status >= 200:
                self._end(None)
            elif not self._c.done:
                self._hp = self._llhttp()
        elif framing == BODY_TUNNEL:
            self._stop()
        else:
            self._state = _UNTIL_CLOSE
        return hend

    def _partial_head(self, data: bytes, pos: int) -> int:
        if data[pos] in b"\r\n":
            return self._skip_empty(data, pos)
        head_buf = strict.HeadBuffer(self._request, self._limits)
        head_buf.add(data[pos:] if pos else data)
        self._head_buf = head_buf
        return -1

    def _trailers(self, data: bytes, pos: int) -> int:
        if data.startswith(b"\r\n", pos):
            pos += 2
            trailers = None
        elif len(data) - pos == 1 and data[pos] == 13:
            self._pending = b"\r"
            return -1
        else:
            tend = data.find(b"\r\n\r\n", pos)
            if tend < 0:
                head_buf = strict.HeadBuffer(self._request, self._limits, trailers=True)
                head_buf.add(data[pos:])
                self._head_buf = head_buf
                return -1
            trailers = strict.parse_trailers(data[pos:tend + 2], self._request, self._limits)
            pos = tend + 4
        self._end(trailers)
        return pos

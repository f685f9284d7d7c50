"""The HTTP/1.1 rules both codecs share, so that their decisions are identical.

Each codec finds where a head ends itself (the first CRLF CRLF), so the size
of every head is known exactly whatever the library, and hands the complete
head to its library. This module judges the rest:

* ``HeadBuffer`` collects a head (or a trailer section) that arrives in
  pieces and enforces the limits while it grows, so an oversized head fails
  without waiting for its end.
* ``parse_head`` is the complete, regex-based check of a raw head, in the
  order a streaming parser meets faults: the start line, then each field
  line (and the framing ambiguities it creates: a second Content-Length,
  both framing fields), then size and field count, then ``build_*``. The h11
  codec runs it before h11 sees a head (h11 folds obs-fold, accepts bare LF,
  CTLs, equal Content-Length lists); the httptools codec runs it on a head
  llhttp refused, so the status is named the same way -- and where strict
  finds that head valid, strict's rules win (llhttp refuses
  ``Transfer-Encoding: chunked<HTAB>``).
* ``build_request`` / ``build_response`` decide framing, authority,
  keep-alive, upgrade and 100-continue from a field list (names lower-case,
  values stripped): the hot path, after llhttp accepted a head.
* ``chunk_size`` and ``parse_trailers`` check chunked framing.

Choices where the RFCs leave room (the test suite pins every one):

* Leading empty lines before a request (or status) line: any number of CRLF
  is skipped (RFC 9112 2.2 says at least one); a bare LF or CR there is a 400.
* Request line: exactly ``METHOD SP target SP HTTP/1.x``. A version that is
  not ``HTTP/<d>.<d>`` (``http/1.1``, none at all as in HTTP/0.9's
  ``GET /``), and ``HTTP/0.9`` itself, is a 400; a well-formed other version
  (``HTTP/2.0``, ``HTTP/1.2``, ``HTTP/3.0``) is a 505.
* Methods: a token llhttp does not know (``KNOWN_METHODS``) is a 501 (RFC
  9110 9.1); a method that is not a token is a 400.
* Target: origin-form without ``#``, absolute-form with a letters-only
  scheme (as llhttp) and a non-empty host without userinfo (authority then
  overrides Host), authority-form ``host:port`` only with CONNECT, ``*``
  only with OPTIONS.
* Transfer-Encoding in a request: one field whose list is exactly
  ``chunked``; anything else (other or empty codings, several fields) is a
  501. In a response a list ending in a single ``chunked`` is forwarded as
  chunked; a final coding other than chunked (RFC 9112 6.3 would read until
  close) is refused with a 502 -- a proxy gains nothing from guessing where
  such a body ends. Transfer-Encoding in an HTTP/1.0 message is refused
  (RFC 9112 6.1 calls its framing faulty): 400 / 502.
* ``Expect`` values other than ``100-continue`` are forwarded unchanged;
  ``100-continue`` counts only in HTTP/1.1, ``Upgrade`` only in HTTP/1.1
  with the ``upgrade`` Connection option and not with CONNECT.
* Responses: status 100-599, version HTTP/1.0 or HTTP/1.1, reason phrase
  without CTLs. 1xx/204/304 and answers to HEAD have no body whatever the
  fields say (which must still be well-formed).
* Trailers: same syntax and limits as head fields (counted on their own);
  Content-Length or Transfer-Encoding there is refused (400 / 502).
* Chunk lines: 1-16 hex digits, then ``;name[=token|quoted-string]``
  extensions without whitespace (dropped), at most ``MAX_CHUNK_LINE_BYTES``.
* With several faults in one head, which one is named may depend on how the
  bytes were cut into feeds (a trickled head is judged as it grows).
"""
from __future__ import annotations

import re

from ..events import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_TUNNEL, BODY_UNTIL_CLOSE,
                      FLAG_UPSTREAM_PROTOCOL_ERROR, HttpError, Limits, Request, Response)

# A chunk-size line (size, extensions, CRLF) longer than this is refused: a
# line the codec must buffer whole has to have a bound (400 / 502).
MAX_CHUNK_LINE_BYTES = 4096
# Content-Length values with more digits are refused (h11 allows 20; 18
# digits always fit in an int64).
MAX_CONTENT_LENGTH_DIGITS = 18

# The methods llhttp accepts in HTTP mode: the httptools codec cannot parse
# others, so the h11 codec refuses them too (501).
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH "
    b"UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE "
    b"UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split())

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
TOKEN_RE = re.compile(rb"[%s]+" % _TCHAR)
# field-line = field-name ":" OWS field-value OWS; value octets: HTAB, SP,
# VCHAR, obs-text -- no NUL, CR, LF or other CTL. Greedy (linear) match; the
# caller strips trailing OWS.
FIELD_LINE_RE = re.compile(rb"([%s]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)" % _TCHAR)
_VERSION_RE = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TARGET_RE = re.compile(rb"[\x21-\x7e]+")
_STATUS_LINE_RE = re.compile(rb"(HTTP/[0-9]\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
# Host / authority: uri-host [":" port] (RFC 9110 4.2.3, RFC 3986 3.2.2).
_REG_NAME = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"
_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|%s)(?::[0-9]*)?" % _REG_NAME)
_AUTHORITY_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)"
                           rb":[0-9]{1,5}")
_ABSOLUTE_RE = re.compile(rb"[A-Za-z]+://([^/?#]+)([^#]*)")
# chunk = chunk-size [ chunk-ext ] CRLF, chunk-ext = *( ";" name [ "=" token / quoted-string ] )
CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;[%s]+(?:=(?:[%s]+|\"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|"
    rb"\\[\t\x20-\x7e\x80-\xff])*\"))?)*" % (_TCHAR, _TCHAR))

_HOST_COMMON = b"-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TEXT = b"\t" + bytes(range(0x20, 0x7f)) + bytes(range(0x80, 0x100))   # HTAB, SP, VCHAR, obs-text
_REQUEST_FIELDS = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade",
                             b"expect"))
_RESPONSE_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"connection"))

VERSIONS = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}
_CONNECTION_FAST = {b"close": (False, False, True), b"keep-alive": (True, False, False),
                    b"upgrade": (False, True, False)}  # -> (keep-alive, upgrade, close) tokens


def fail(request: bool, status: int, detail: str) -> HttpError:
    """The error for bad input: ``status`` from a client, always 502 from an upstream."""
    if request:
        return HttpError(status, detail)
    return HttpError(502, "upstream: " + detail, FLAG_UPSTREAM_PROTOCOL_ERROR)


def skip_empty_lines(data: bytes, pos: int, request: bool) -> int:
    """Skip CRLFs before a start line. Returns the new position; -1 when
    ``data`` ends in a lone CR that may be half of one (keep it, wait)."""
    end = len(data)
    stripped = end - len(data[pos:].lstrip(b"\r\n"))
    if stripped == pos:
        return pos
    blank = data[pos:stripped]
    count = blank.count(b"\r\n")
    if count * 2 == len(blank):
        return stripped
    if stripped == end and blank.endswith(b"\r") and (count * 2 + 1) == len(blank):
        return -1
    raise fail(request, 400, "bare CR or LF before the start line")


class HeadBuffer:
    """A head, or a trailer section, that arrives in pieces.

    ``add`` appends bytes and enforces, on what has arrived so far, what the
    complete section would fail anyway: its size, its number of complete
    field lines, a bare CR or LF, and (request heads) the target length. Work
    per call is proportional to the new bytes, so a head trickled byte by
    byte costs linear time.
    """

    __slots__ = ("data", "_request", "_limits", "_trailers", "_crlf", "_lf", "_cr",
                 "_line_open", "_sp1", "_sp2")

    def __init__(self, request: bool, limits: Limits, trailers: bool = False) -> None:
        self.data = bytearray()
        self._request = request
        self._limits = limits
        self._trailers = trailers
        self._crlf = self._lf = self._cr = 0
        self._line_open = not trailers    # the start line is still arriving
        self._sp1 = self._sp2 = -1

    def add(self, data: bytes) -> bool:
        """True once the section is complete (or starts with an empty line,
        which the codec handles); raises HttpError when it cannot be valid."""
        buf = self.data
        start = len(buf)
        buf += data
        self._crlf += buf.count(b"\r\n", start - 1 if start else 0)
        self._lf += data.count(b"\n")
        self._cr += data.count(b"\r")
        request = self._request
        if buf.startswith(b"\r\n") or buf.find(b"\r\n\r\n", start - 3 if start > 3 else 0) >= 0:
            return True
        if self._line_open:
            self._check_start_line(buf, start)
        if self._lf != self._crlf or self._cr - self._crlf - (buf[-1] == 13) != 0:
            raise fail(request, 400, "bare CR or LF in the header section")
        limits = self._limits
        if len(buf) > limits.max_header_bytes:
            raise fail(request, 431, f"header section over {limits.max_header_bytes} bytes")
        lines = self._crlf if self._trailers else self._crlf - 1
        if lines > limits.max_header_count:
            raise fail(request, 431, f"more than {limits.max_header_count} header fields")
        return False

    def _check_start_line(self, buf: bytearray, start: int) -> None:
        """A complete start line is checked at once (garbage fails early);
        an incomplete request line only for its target's length. Only the
        new bytes are searched: earlier ones held no CRLF, and no space not
        already recorded."""
        eol = buf.find(b"\r\n", start - 1 if start else 0)
        if eol >= 0:
            self._line_open = False
            if self._request:
                parse_request_line(bytes(buf[:eol]), self._limits)
            else:
                parse_status_line(bytes(buf[:eol]))
            return
        if not self._request:
            return
        limit = len(buf) - (buf[-1] == 13)          # a final CR is not part of the target
        if self._sp1 < 0:
            self._sp1 = buf.find(b" ", start, limit)
            if self._sp1 < 0:
                return
        if self._sp2 < 0:
            self._sp2 = buf.find(b" ", max(start, self._sp1 + 1), limit)
        end = self._sp2 if self._sp2 >= 0 else limit
        if end - self._sp1 - 1 > self._limits.max_uri_bytes:
            raise HttpError(414, f"request target over {self._limits.max_uri_bytes} bytes")


def parse_request_line(line: bytes, limits: Limits) -> tuple[bytes, bytes, bytes]:
    """``METHOD SP target SP HTTP/1.x`` -> (method, target, version b"1.1"/b"1.0")."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    ver = VERSIONS.get(version)
    if ver is None:
        if _VERSION_RE.fullmatch(version) and version != b"HTTP/0.9":
            raise HttpError(505, "unsupported HTTP version")
        raise HttpError(400, "malformed HTTP version")
    if len(target) > limits.max_uri_bytes:
        raise HttpError(414, f"request target over {limits.max_uri_bytes} bytes")
    if method not in KNOWN_METHODS:
        if TOKEN_RE.fullmatch(method):
            raise HttpError(501, "unknown method")
        raise HttpError(400, "malformed method")
    if not _TARGET_RE.fullmatch(target):
        raise HttpError(400, "malformed request target")
    return method, target, ver


def parse_status_line(line: bytes) -> tuple[bytes, int, bytes]:
    """``HTTP/1.x SP 3DIGIT [SP reason]`` -> (version, status, reason)."""
    m = _STATUS_LINE_RE.fullmatch(line)
    if m is None:
        raise fail(False, 502, "malformed status line")
    version = VERSIONS.get(m[1])
    if version is None:
        raise fail(False, 502, "unsupported HTTP version")
    return version, int(m[2]), m[3] or b""


def parse_fields(lines: list, request: bool, framing: _FramingCheck | None) -> list:
    """Field lines -> [(lower-case name, stripped value)], checking each line
    in order (and its framing meaning, when ``framing`` is given)."""
    headers = []
    append = headers.append
    match = FIELD_LINE_RE.fullmatch
    for line in lines:
        m = match(line)
        if m is None:
            raise fail(request, 400, "malformed header field line")
        name = m[1].lower()
        value = m[2].rstrip(b" \t")
        if framing is not None and (name == b"content-length" or name == b"transfer-encoding"):
            framing.field(name, value)
        append((name, value))
    return headers


def parse_head(head: bytes, request: bool, limits: Limits, method: bytes = b"GET") -> Request | Response:
    """The complete check of a raw head (start line through the final CRLF
    CRLF, no leading empty lines). Errors come in the order llhttp meets
    them, so both codecs name the same one: the start line (form, version,
    target length, method, target octets), then each field line (syntax and
    framing meaning), then the head's size and field count, then what
    ``build_*`` decides from the whole head."""
    lines = head[:-4].split(b"\r\n")
    if request:
        req_method, target, version = parse_request_line(lines[0], limits)
    else:
        version, status, reason = parse_status_line(lines[0])
    headers = parse_fields(lines[1:], request, _FramingCheck(request))
    check_head_size(len(head), len(headers), request, limits)
    if request:
        return build_request(req_method, target, version, headers, limits)
    return build_response(status, reason, version, headers, method)


def check_head_size(size: int, count: int, request: bool, limits: Limits) -> None:
    """A complete head: ``size`` bytes from the start line through the final
    CRLF CRLF, ``count`` field lines."""
    if size > limits.max_header_bytes:
        raise fail(request, 431, f"header section over {limits.max_header_bytes} bytes")
    if count > limits.max_header_count:
        raise fail(request, 431, f"more than {limits.max_header_count} header fields")


def parse_trailers(block: bytes, request: bool, limits: Limits) -> list:
    """A trailer section without its final empty line (``name: v\\r\\n``...)."""
    if len(block) + 2 > limits.max_header_bytes:
        raise fail(request, 431, f"trailer section over {limits.max_header_bytes} bytes")
    lines = block[:-2].split(b"\r\n")
    if len(lines) > limits.max_header_count:
        raise fail(request, 431, f"more than {limits.max_header_count} trailer fields")
    trailers = parse_fields(lines, request, None)
    for name, _ in trailers:
        if name == b"content-length" or name == b"transfer-encoding":
            raise fail(request, 400, "framing field in trailers")
    return trailers


def chunk_size(line: bytes, request: bool) -> int:
    """The size announced by a chunk line (without its CRLF); extensions are
    checked and dropped."""
    m = CHUNK_LINE_RE.fullmatch(line)
    if m is None:
        raise fail(request, 400, "malformed chunk size line")
    return int(m[1], 16)


class _FramingCheck:
    """Content-Length / Transfer-Encoding, field by field in order. What
    makes the framing ambiguous (a second Content-Length, both fields, a
    malformed length) is a 400 at the field; which transfer codings are
    acceptable is judged in ``finish``, after every field line's syntax, so
    that a malformed line (obs-fold continuing a Transfer-Encoding) is named
    as such."""

    __slots__ = ("request", "length", "codings")

    def __init__(self, request: bool) -> None:
        self.request = request
        self.length = -1                  # Content-Length, -1 when absent
        self.codings: list | None = None  # Transfer-Encoding values, in order

    def field(self, name: bytes, value: bytes) -> None:
        request = self.request
        if name == b"content-length":
            if self.codings is not None:
                raise fail(request, 400, "Content-Length with Transfer-Encoding")
            if self.length >= 0:
                raise fail(request, 400, "several Content-Length fields")
            if not value.isdigit() or len(value) > MAX_CONTENT_LENGTH_DIGITS:
                raise fail(request, 400, "malformed Content-Length")
            self.length = int(value)
        else:
            if self.length >= 0:
                raise fail(request, 400, "Transfer-Encoding with Content-Length")
            if self.codings is None:
                self.codings = [value]
            else:
                self.codings.append(value)

    def finish(self, version: bytes) -> int:
        """-> -2 for chunked, else the Content-Length (-1: neither field)."""
        values = self.codings
        if values is None:
            return self.length
        request = self.request
        if request and len(values) > 1:
            raise HttpError(501, "several Transfer-Encoding fields")
        codings = [c.strip(b" \t").lower() for value in values for c in value.split(b",")]
        if not all(codings):
            raise fail(request, 501, "empty transfer coding")
        if request and codings != [b"chunked"]:
            raise HttpError(501, "only Transfer-Encoding: chunked is supported")
        if codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
            raise fail(request, 501, "chunked is not the final transfer coding, once")
        if version == b"1.0":
            raise fail(request, 400, "Transfer-Encoding in an HTTP/1.0 message")
        return -2


def _connection_tokens(value: bytes) -> tuple[bool, bool, bool]:
    """(keep-alive, upgrade, close) present in a Connection value."""
    low = value.lower()
    fast = _CONNECTION_FAST.get(low)
    if fast is not None:
        return fast
    tokens = {t.strip(b" \t") for t in low.split(b",")}
    return b"keep-alive" in tokens, b"upgrade" in tokens, b"close" in tokens


def _framing_of(headers: list, request: bool, version: bytes) -> int:
    check = _FramingCheck(request)
    for name, value in headers:
        if name == b"content-length" or name == b"transfer-encoding":
            check.field(name, value)
    return check.finish(version)


def _valid_host(host: bytes) -> bool:
    # Most hosts are letters, digits, dots and dashes, maybe with a port:
    # one translate decides those; anything else takes the full grammar.
    rest = host.translate(None, _HOST_COMMON)
    if not rest:
        return True
    if rest == b":":
        port = host.partition(b":")[2]
        if not port or port.isdigit():
            return True
    return _HOST_RE.fullmatch(host) is not None


def build_request(method: bytes, target: bytes, version: bytes, headers: list, limits: Limits) -> Request:
    """Decide a request head from its parts; ``headers`` as ``parse_fields``
    returns them. The caller has checked the syntax and the limits (see
    ``parse_head``). Raises HttpError (400/501)."""
    host = connection = upgrade = expect = cl = None
    hosts = framing_fields = 0
    for name, value in headers:
        if name in _REQUEST_FIELDS:
            if name == b"host":
                hosts += 1
                host = value
            elif name == b"content-length":
                framing_fields += 1
                cl = value
            elif name == b"transfer-encoding":
                framing_fields += 2
            elif name == b"connection":
                connection = value if connection is None else connection + b", " + value
            elif name == b"upgrade":
                upgrade = value if upgrade is None else upgrade + b", " + value
            else:
                expect = value if expect is None else expect + b", " + value
    if not framing_fields:
        length = -1
    elif framing_fields == 1 and cl.isdigit() and len(cl) <= MAX_CONTENT_LENGTH_DIGITS:
        length = int(cl)
    else:
        length = _framing_of(headers, True, version)

    # Host (RFC 9112 3.2): exactly one in HTTP/1.1, and well-formed.
    if hosts != 1:
        if hosts or version == b"1.1":
            raise HttpError(400, "missing Host" if not hosts else "several Host fields")
    elif not _valid_host(host):
        raise HttpError(400, "malformed Host")

    # Target forms (RFC 9112 3.2.1-3.2.4).
    authority = host
    if target[0] == 47:             # "/": origin-form
        if b"#" in target:
            raise HttpError(400, "fragment in request target")
        path = target.partition(b"?")[0]
        if method == b"CONNECT":
            raise HttpError(400, "CONNECT needs an authority-form target")
    elif method == b"CONNECT":
        if not _AUTHORITY_RE.fullmatch(target):
            raise HttpError(400, "CONNECT needs an authority-form target")
        authority = target
        path = b""
    elif target == b"*":
        if method != b"OPTIONS":
            raise HttpError(400, "asterisk-form target without OPTIONS")
        path = target
    else:
        m = _ABSOLUTE_RE.fullmatch(target)
        if m is None or not _HOST_RE.fullmatch(m[1]) or m[1][0] == 58:
            raise HttpError(400, "malformed request target")
        authority = m[1]
        path = m[2].partition(b"?")[0] or b"/"

    # Connection options (RFC 9112 9.3, RFC 9110 7.6.1).
    if connection is None:
        keep_alive = version == b"1.1"
        wants_upgrade = False
    else:
        ka, wants_upgrade, close = _connection_tokens(connection)
        keep_alive = not close and (ka or version == b"1.1")

    if method == b"CONNECT":
        if length > 0 or length == -2:
            raise HttpError(400, "CONNECT with a body")
        return Request(method, target, path, authority, headers, version, keep_alive, BODY_TUNNEL, 0,
                       None, False)
    if length > 0:
        framing = BODY_LENGTH
    elif length == -2:
        framing, length = BODY_CHUNKED, 0
    else:
        framing, length = BODY_NONE, 0
    if upgrade is not None and not (wants_upgrade and version == b"1.1"):
        upgrade = None
    return Request(method, target, path, authority, headers, version, keep_alive, framing, length, upgrade,
                   expect is not None and version == b"1.1" and expect.lower() == b"100-continue")


def build_response(status: int, reason: bytes, version: bytes, headers: list, method: bytes) -> Response:
    """Decide a response head (RFC 9112 6.3); ``method`` is the request's.
    Raises HttpError 502."""
    if not 100 <= status <= 599:
        raise fail(False, 502, "status code out of range")
    if reason.translate(None, _TEXT):
        raise fail(False, 502, "control character in reason phrase")
    connection = cl = None
    framing_fields = 0
    for name, value in headers:
        if name in _RESPONSE_FIELDS:
            if name == b"content-length":
                framing_fields += 1
                cl = value
            elif name == b"transfer-encoding":
                framing_fields += 2
            else:
                connection = value if connection is None else connection + b", " + value
    if not framing_fields:
        length = -1
    elif framing_fields == 1 and cl.isdigit() and len(cl) <= MAX_CONTENT_LENGTH_DIGITS:
        length = int(cl)
    else:
        length = _framing_of(headers, False, version)

    if connection is None:
        keep_alive = version == b"1.1"
    else:
        ka, _, close = _connection_tokens(connection)
        keep_alive = not close and (ka or version == b"1.1")

    if status < 200:
        if status == 101:
            return Response(status, reason, headers, version, False, BODY_TUNNEL, 0)
        return Response(status, reason, headers, version, keep_alive, BODY_NONE, 0)
    if method == b"HEAD" or status == 204 or status == 304:
        return Response(status, reason, headers, version, keep_alive, BODY_NONE, 0)
    if method == b"CONNECT" and status < 300:
        return Response(status, reason, headers, version, False, BODY_TUNNEL, 0)
    if length > 0:
        return Response(status, reason, headers, version, keep_alive, BODY_LENGTH, length)
    if length == -2:
        return Response(status, reason, headers, version, keep_alive, BODY_CHUNKED, 0)
    if length == 0:
        return Response(status, reason, headers, version, keep_alive, BODY_NONE, 0)
    return Response(status, reason, headers, version, False, BODY_UNTIL_CLOSE, 0)

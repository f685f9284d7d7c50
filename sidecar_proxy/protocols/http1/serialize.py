"""HTTP/1.1 bytes the proxy writes: heads, chunks, and its own responses.

Nothing unchecked is written: a CR, LF, NUL or other CTL in a value, or a
name that is not a token, would let one field become two on the wire.
Every field the proxy writes goes through ``field_line`` (two regex
matches). Lines written on every request are made once and reused: the
proxy's own fields per connection or process, a route's additions per
snapshot. Field lines forwarded unchanged (``received_block``) are the
bytes the codec already checked by the same rules, so the hot path writes
a received head with one slice and its request or status line check.
"""
from __future__ import annotations

import re
from http import HTTPStatus

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
_FIELD_NAME_RE = re.compile(rb"[%s]+" % _TCHAR)
_FIELD_VALUE_RE = re.compile(_VALUE)
_METHOD_RE = _FIELD_NAME_RE
_TARGET_RE = re.compile(rb"[\x21-\x7e]+")

# Standard reason phrases, for heads given an empty one.
REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_VERSIONS = (b"1.1", b"1.0")


class InvalidHeader(ValueError):
    """A method, target, status, reason, field name or value that must not be written."""



# Fields that describe one hop, never forwarded (RFC 9110 7.6.1); the codec
# already turned Transfer-Encoding and Content-Length into framing.
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"))
# Connection values that name no other field (the common case: no set to build).
PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade", b"Upgrade"))
# Request fields the proxy edits or leaves alone instead of adding its own.
PROXY_FIELDS = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"))

def request_head(method: bytes, target: bytes, headers) -> bytes:
    """``METHOD SP target SP HTTP/1.1 CRLF`` + fields + CRLF; names are
    written as given."""
    return forward_request_head(method, target, b"", field_lines(headers))


def response_head(status: int, reason: bytes, headers, version: bytes = b"1.1") -> bytes:
    """``HTTP/1.x SP status SP reason CRLF`` + fields + CRLF. An empty
    reason becomes the standard phrase of ``status`` (or stays empty)."""
    return forward_response_head(status, reason, b"", field_lines(headers), version)


def received_block(head) -> bytes:
    """A received head's field lines, each with its CRLF, exactly as received.

    A head from the codec carries its bytes (``head.raw``), checked by the
    same rules this module applies (tokens, no CTL): forwarding them as they
    are skips rebuilding and re-checking what cannot have changed. A head
    made otherwise has its fields written (and checked) here.
    """
    raw = head.raw
    if raw is None:
        return field_lines(head.headers)
    return raw[raw.find(b"\r\n") + 2:-2]


def without(block: bytes, headers, drop) -> bytes:
    """``block`` (see received_block) without the lines of the fields named in ``drop``."""
    lines = block.split(b"\r\n")  # one per field, then b"" after the final CRLF
    i = len(headers)
    while i:
        i -= 1
        if headers[i][0] in drop:
            del lines[i]
    return b"\r\n".join(lines)


def field_line(name: bytes, value: bytes) -> bytes:
    """One checked field line with its CRLF. Lines the proxy adds on every
    request (x-forwarded-*, x-request-id, a route's additions) are made and
    checked once (per connection, per route, per process) and then reused."""
    if _FIELD_NAME_RE.fullmatch(name) is None:
        raise InvalidHeader(f"invalid header name {name!r}")
    if _FIELD_VALUE_RE.fullmatch(value) is None:
        raise InvalidHeader(f"invalid value for header {name!r}")
    return b"%s: %s\r\n" % (name, value)


def field_lines(headers) -> bytes:
    return b"".join([field_line(name, value) for name, value in headers])


# Field lines the proxy adds, checked once here.
CHUNKED_LINE = field_line(b"transfer-encoding", b"chunked")
UPGRADE_LINE = field_line(b"connection", b"upgrade")
XFP_LINE = field_line(b"x-forwarded-proto", b"http")


_REQUEST_LINE_RE = re.compile(rb"[%s]+ [\x21-\x7e]+" % _TCHAR)


def forward_request_head(method: bytes, target: bytes, block: bytes, added: bytes) -> bytes:
    """A forwarded request head: HTTP/1.1 request line, the received field
    lines kept (``block``, see received_block), then ``added`` (lines made
    by field_line)."""
    line = b"%s %s" % (method, target)
    if _REQUEST_LINE_RE.fullmatch(line) is None:
        if _METHOD_RE.fullmatch(method) is None:
            raise InvalidHeader(f"invalid method {method!r}")
        raise InvalidHeader(f"invalid request target {target!r}")
    return b"%s HTTP/1.1\r\n%s%s\r\n" % (line, block, added)


def forward_response_head(status: int, reason: bytes, block: bytes, added: bytes, version: bytes = b"1.1") -> bytes:
    """A forwarded response head: as forward_request_head."""
    if not 100 <= status <= 999:
        raise InvalidHeader(f"invalid status {status!r}")
    if version not in _VERSIONS:
        raise InvalidHeader(f"invalid HTTP version {version!r}")
    if not reason:
        reason = REASONS.get(status, b"")
    elif _FIELD_VALUE_RE.fullmatch(reason) is None:
        raise InvalidHeader(f"invalid reason phrase {reason!r}")
    return b"HTTP/%s %d %s\r\n%s%s\r\n" % (version, status, reason, block, added)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; ``data`` is never empty (that would end
    the body)."""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


def last_chunk(trailers=None) -> bytes:
    """The end of a chunked body, with its trailer fields."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n%s\r\n" % field_lines(trailers)


def local_response(status: int, body: bytes = b"", headers=(), close: bool = False) -> bytes:
    """A whole response the proxy makes itself (errors, direct responses):
    Content-Length (not on 1xx/204/304), text/plain when there is a body and
    ``headers`` names no content-type, ``connection: close`` when ``close``."""
    fields = []
    if status >= 200 and status != 204 and status != 304:
        fields.append((b"content-length", b"%d" % len(body)))
    if body and not any(name.lower() == b"content-type" for name, _ in headers):
        fields.append((b"content-type", b"text/plain; charset=utf-8"))
    if close:
        fields.append((b"connection", b"close"))
    fields.extend(headers)
    return response_head(status, b"", fields) + body

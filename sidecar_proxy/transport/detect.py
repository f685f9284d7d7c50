"""What protocol a client speaks, from the first bytes it sent.

An ``auto`` listener does not know in advance whether a connection carries
TLS, HTTP/2 with prior knowledge, HTTP/1.x or something else. :func:`sniff`
looks at what the client has sent so far and either decides or asks for more
(``None``). It is pure and sans-IO: no sockets, no clock, no state; the
caller accumulates bytes and calls again.

Only client-first protocols can be recognised; a server-first protocol (SSH,
MySQL, SMTP) sends nothing until the server speaks, so the caller must bound
the wait with a timeout and treat silence as opaque. Once
:data:`MAX_SNIFF_BYTES` have arrived, :func:`sniff` always decides.

TLS: the first record must be a handshake record (``0x16``, major version 3)
whose first message is a ClientHello. The ClientHello is parsed with every
length checked against both the declared handshake length and the bytes of
the first record, so nothing raises: a malformed hello is still TLS, but
without a server name (``detail`` says what is wrong). A hello longer than
one record (huge key shares) is parsed up to the end of the first record;
the server name is reported if its extension lies entirely in that record.

HTTP/1.x: only the standard methods are accepted, so that a binary protocol
whose first bytes happen to be token characters is not taken for HTTP.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["Proto", "Detection", "MAX_SNIFF_BYTES", "MAX_REQUEST_LINE", "HTTP2_PREFACE", "HTTP1_METHODS", "sniff"]


class Proto(str, enum.Enum):
    TLS = "tls"
    HTTP2 = "http2"
    HTTP1 = "http1"
    OPAQUE = "opaque"


@dataclass(frozen=True, slots=True)
class Detection:
    proto: Proto
    sni: str | None = None  # TLS: server_name from the ClientHello, lower-cased
    alpn: tuple[str, ...] = ()  # TLS: ALPN protocols offered, in order (latin-1 decoded, so byte-exact)
    detail: str = ""  # e.g. "GET", or why it is OPAQUE, or what is wrong with a TLS ClientHello


MAX_SNIFF_BYTES = 16 * 1024 + 5  # one TLS record at most; beyond this, decide with what we have
MAX_REQUEST_LINE = 8 * 1024  # an HTTP/1 request line longer than this (terminator included) is not HTTP to us
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP1_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"})

_MAX_TLS_RECORD = 1 << 14  # RFC 8446 5.1: a plaintext record carries at most 2^14 bytes
_MAX_METHOD = max(map(len, HTTP1_METHODS))
# Every non-empty prefix of a method (the method itself included: the SP may be next).
_METHOD_PREFIXES = frozenset(m[:i] for m in HTTP1_METHODS for i in range(1, len(m) + 1))
_METHOD_FIRST = frozenset(m[0] for m in HTTP1_METHODS)
_HTTP1 = {m: Detection(Proto.HTTP1, detail=m.decode()) for m in HTTP1_METHODS}
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_VERSION_PREFIXES = (b"HTTP/1.1\r", b"HTTP/1.0\r")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")  # no SP, no controls (CR and LF included) in a request target
_HOST_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
_HTTP2 = Detection(Proto.HTTP2)
_NOT_CLIENT_HELLO = Detection(Proto.OPAQUE, detail="not a TLS ClientHello")
_UNKNOWN = Detection(Proto.OPAQUE, detail="not TLS, the HTTP/2 preface or an HTTP/1 request line")
_SSL2 = Detection(Proto.OPAQUE, detail="SSLv2-style ClientHello")
_CONTINUED = "ClientHello continues past the first record"


def sniff(data: bytes) -> Detection | None:
    """None: not enough bytes yet to decide (call again with more). Never raises, whatever the bytes."""
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)  # memoryview and other buffers
    if not data:
        return None
    first = data[0]
    if first == 0x16:
        return _sniff_tls(data)
    if first == 0x50:  # "P": the HTTP/2 preface, or POST / PUT / PATCH
        if len(data) < len(HTTP2_PREFACE):
            if HTTP2_PREFACE.startswith(data):
                return None
        elif data.startswith(HTTP2_PREFACE):
            return _HTTP2
        if data.startswith(b"PRI "):
            return Detection(Proto.OPAQUE, detail="not the HTTP/2 connection preface")
    if first in _METHOD_FIRST:
        return _sniff_http1(data)
    if first & 0x80 and len(data) >= 3 and data[2] == 1:
        return _SSL2
    return _UNKNOWN


# --- HTTP/1 ------------------------------------------------------------------------------------


def _sniff_http1(data: bytes) -> Detection | None:
    sp = data.find(b" ", 0, _MAX_METHOD + 1)
    if sp < 0:
        # Fewer than 8 bytes that could still become "METHOD ", or not a method at all.
        return None if bytes(data[: _MAX_METHOD + 1]) in _METHOD_PREFIXES else _UNKNOWN
    found = _HTTP1.get(bytes(data[:sp]))
    if found is None:
        return Detection(Proto.OPAQUE, detail="not a standard HTTP/1 method")
    lf = data.find(b"\n", sp, MAX_REQUEST_LINE)
    if lf < 0:
        if len(data) >= MAX_REQUEST_LINE:
            return Detection(Proto.OPAQUE, detail=f"no request line end within {MAX_REQUEST_LINE} bytes")
        return _partial_request_line(data, sp)
    end = lf - 1 if data[lf - 1] == 0x0D else lf  # CRLF, or a bare LF (good enough to detect)
    version_at = end - 8
    # method SP target SP version: the target needs at least one byte.
    if version_at - 1 < sp + 2 or data[version_at - 1] != 0x20:
        return Detection(Proto.OPAQUE, detail="no HTTP version in the request line")
    if data[version_at:end] not in _VERSIONS:
        return _version_problem(data[version_at:end])
    if _BAD_TARGET.search(data, sp + 1, version_at - 1):
        return Detection(Proto.OPAQUE, detail="invalid request target")
    return found


def _partial_request_line(data: bytes, sp: int) -> Detection | None:
    """No LF yet: None while what is there can still become a valid request line."""
    target_at = sp + 1
    sp2 = data.find(b" ", target_at)
    if sp2 < 0:
        return Detection(Proto.OPAQUE, detail="invalid request target") if _BAD_TARGET.search(data, target_at) else None
    if sp2 == target_at or _BAD_TARGET.search(data, target_at, sp2):
        return Detection(Proto.OPAQUE, detail="invalid request target")
    tail = data[sp2 + 1 :]
    if len(tail) <= 9 and (_VERSION_PREFIXES[0].startswith(tail) or _VERSION_PREFIXES[1].startswith(tail)):
        return None
    return _version_problem(tail)


def _version_problem(version: bytes) -> Detection:
    if version.startswith(b"HTTP/"):
        return Detection(Proto.OPAQUE, detail="HTTP version is not 1.0 or 1.1")
    return Detection(Proto.OPAQUE, detail="no HTTP version in the request line")


# --- TLS ---------------------------------------------------------------------------------------


class _Malformed(Exception):
    """The ClientHello contradicts itself; the message says how."""


class _Continued(Exception):
    """The ClientHello goes on in a later record; what the first one held is all we parse."""


def _sniff_tls(data: bytes) -> Detection | None:
    n = len(data)
    if n < 2:
        return None
    if data[1] != 3:
        return _UNKNOWN
    if n < 5:
        return None
    record_len = data[3] << 8 | data[4]
    if record_len == 0:
        return _NOT_CLIENT_HELLO  # handshake records are never empty (RFC 8446 5.1)
    if n < 6:
        return None
    if data[5] != 1:
        return _NOT_CLIENT_HELLO
    if record_len > _MAX_TLS_RECORD:
        return Detection(Proto.TLS, detail=f"TLS record length {record_len} exceeds {_MAX_TLS_RECORD}")
    record_end = 5 + record_len
    if n < record_end:
        # record_end <= MAX_SNIFF_BYTES, so a caller holding MAX_SNIFF_BYTES always gets a decision.
        return None
    if record_len < 4:
        return Detection(Proto.TLS, detail=_CONTINUED)  # even the handshake header is split
    hello_end = 9 + (data[6] << 16 | data[7] << 8 | data[8])
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    try:
        # A length that points past hello_end is malformed; one that only points past the
        # record is a hello spanning records.
        limit = min(hello_end, record_end)
        pos = 9 + 34  # legacy_version, random
        _need(pos + 1, hello_end, limit, "random")
        session_id_len = data[pos]
        if session_id_len > 32:
            raise _Malformed("session id longer than 32 bytes")
        pos += 1 + session_id_len
        _need(pos + 2, hello_end, limit, "session id")
        suites_len = data[pos] << 8 | data[pos + 1]
        if suites_len < 2 or suites_len & 1:
            raise _Malformed("bad cipher suites length")
        pos += 2 + suites_len
        _need(pos + 1, hello_end, limit, "cipher suites")
        compression_len = data[pos]
        if compression_len < 1:
            raise _Malformed("no compression methods")
        pos += 1 + compression_len
        _need(pos, hello_end, limit, "compression methods")
        if pos == hello_end:
            return Detection(Proto.TLS, detail="ClientHello without extensions")
        _need(pos + 2, hello_end, limit, "extensions length")
        extensions_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
        if extensions_end > hello_end:
            raise _Malformed("extensions run past the end of the ClientHello")
        if extensions_end < hello_end:
            raise _Malformed("bytes after the extensions")
        pos += 2
        while pos < extensions_end:  # the hot loop: the checks are inlined, _need only raises
            if pos + 4 > limit:
                _need(pos + 4, hello_end, limit, "extension header")
            ext_type = data[pos] << 8 | data[pos + 1]
            ext_end = pos + 4 + (data[pos + 2] << 8 | data[pos + 3])
            if ext_end > limit:
                _need(ext_end, hello_end, limit, f"extension {ext_type}")
            # Duplicates (RFC 8446 4.2) matter only for what we route on: which copy would the
            # server believe? Both parsers return a non-empty value or raise.
            if ext_type == 0:
                if sni is not None:
                    raise _Malformed("duplicate server_name extension")
                sni = _server_name(data, pos + 4, ext_end)
            elif ext_type == 16:
                if alpn:
                    raise _Malformed("duplicate ALPN extension")
                alpn = _alpn(data, pos + 4, ext_end)
            pos = ext_end
    except _Continued:
        return Detection(Proto.TLS, sni=sni, alpn=alpn, detail=_CONTINUED)
    except _Malformed as exc:
        return Detection(Proto.TLS, detail=f"malformed ClientHello: {exc}")
    return Detection(Proto.TLS, sni=sni, alpn=alpn)


def _need(end: int, hello_end: int, limit: int, what: str) -> None:
    if end > limit:
        if end > hello_end:
            raise _Malformed(f"{what} runs past the end of the ClientHello")
        raise _Continued


def _server_name(data: bytes, start: int, end: int) -> str:
    """RFC 6066 3: a list of (name_type, name); exactly one host_name (type 0) is accepted."""
    if end - start < 2 or (data[start] << 8 | data[start + 1]) != end - start - 2:
        raise _Malformed("server_name list length does not match the extension")
    pos = start + 2
    if pos == end:
        raise _Malformed("empty server_name list")
    host = None
    while pos < end:
        name_end = pos + 3 + (data[pos + 1] << 8 | data[pos + 2]) if pos + 3 <= end else end + 1
        if name_end > end:
            raise _Malformed("server_name entry runs past the end of the extension")
        if data[pos] == 0:
            if host is not None:
                raise _Malformed("more than one host_name")
            host = data[pos + 3 : name_end]
        pos = name_end
    if host is None:
        raise _Malformed("no host_name in server_name")
    if not host:
        raise _Malformed("empty host_name")
    if len(host) > 255 or host.translate(None, _HOST_CHARS):
        raise _Malformed("host_name is not a DNS name")
    return host.decode("ascii").lower()


def _alpn(data: bytes, start: int, end: int) -> tuple[str, ...]:
    """RFC 7301 3.1: a non-empty list of non-empty protocol names, each with a one-byte length."""
    if end - start < 2 or (data[start] << 8 | data[start + 1]) != end - start - 2:
        raise _Malformed("ALPN list length does not match the extension")
    pos = start + 2
    if pos == end:
        raise _Malformed("empty ALPN list")
    protocols = []
    while pos < end:
        name_end = pos + 1 + data[pos]
        if name_end == pos + 1:
            raise _Malformed("empty ALPN protocol name")
        if name_end > end:
            raise _Malformed("ALPN protocol name runs past the end of the extension")
        protocols.append(data[pos + 1 : name_end].decode("latin-1"))
        pos = name_end
    return tuple(protocols)

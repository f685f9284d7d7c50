"""The version-neutral HTTP message model that routing and policies work on.

A codec (HTTP/1.1 today, HTTP/2 later) turns bytes into calls on a sink:
``on_head(Request | Response)``, ``on_data(bytes)`` any number of times,
``on_end(trailers)``. Heads are plain slotted objects with bytes fields, so a
codec fills them without encoding work and a policy never learns which
codec carried the message.

Header names are lower-case bytes; values are bytes with surrounding
whitespace removed. The order of fields is kept, repeated fields stay
repeated.
"""
from __future__ import annotations

from dataclasses import dataclass

Headers = list  # list[tuple[bytes, bytes]]

# Body framing of a head, as the codec decided it from the fields.
BODY_NONE = 0        # no body (length 0, GET without framing, HEAD/204/304 responses)
BODY_LENGTH = 1      # Content-Length: ``Request.length`` bytes
BODY_CHUNKED = 2     # Transfer-Encoding: chunked
BODY_UNTIL_CLOSE = 3 # responses only: the body ends when the connection does
BODY_TUNNEL = 4      # after this head the connection carries opaque bytes (CONNECT 2xx, 101)


def _first_value(self, name: bytes) -> bytes | None:
    """The first value of a field (``name`` lower-case), or None."""
    for key, value in self.headers:
        if key == name:
            return value
    return None


class Request:
    """A request head.

    ``target`` is the request target as sent (origin-form ``/path?query``,
    ``host:port`` for CONNECT, ``*`` for OPTIONS); ``path`` is its path part
    without the query. ``authority`` is the Host field (or the authority of
    an absolute-form target, which overrides Host); ``None`` when absent.
    """

    __slots__ = ("method", "target", "path", "authority", "headers", "version", "keep_alive",
                 "framing", "length", "upgrade", "expect_continue", "raw")

    def __init__(self, method: bytes, target: bytes, path: bytes, authority: bytes | None,
                 headers: Headers, version: bytes = b"1.1", keep_alive: bool = True,
                 framing: int = BODY_NONE, length: int = 0, upgrade: bytes | None = None,
                 expect_continue: bool = False) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.authority = authority
        self.headers = headers
        self.version = version          # b"1.1" / b"1.0" (b"2" later)
        self.keep_alive = keep_alive    # the client lets the connection be reused after this request
        self.framing = framing          # BODY_NONE | BODY_LENGTH | BODY_CHUNKED | BODY_TUNNEL (CONNECT)
        self.length = length            # with BODY_LENGTH
        self.upgrade = upgrade          # the Upgrade field's value when the client asks to switch protocols
        self.expect_continue = expect_continue
        # The head as received (start line through the final CRLF CRLF), set
        # by the HTTP/1 codec after checking it; its field lines match
        # ``headers`` one to one. None for heads made otherwise.
        self.raw: bytes | None = None

    header = _first_value

    def __repr__(self) -> str:
        return f"Request({self.method!r} {self.target!r} authority={self.authority!r})"


class Response:
    """A response head. 1xx heads are informational: they have no body and no end."""

    __slots__ = ("status", "reason", "headers", "version", "keep_alive", "framing", "length", "raw")

    def __init__(self, status: int, reason: bytes, headers: Headers, version: bytes = b"1.1",
                 keep_alive: bool = True, framing: int = BODY_NONE, length: int = 0) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive    # the server lets the connection be reused after this response
        self.framing = framing          # any BODY_* (UNTIL_CLOSE and TUNNEL included)
        self.length = length
        self.raw: bytes | None = None   # as for Request

    header = _first_value

    def __repr__(self) -> str:
        return f"Response({self.status})"


class Sink:
    """What a codec delivers a message to (the calls in the module docstring):
    the session for requests, each exchange for its response.

    A base class rather than a ``typing.Protocol`` so that, compiled, a
    codec calls a sink in C (``compiled.pxd_text``). A sink must derive from it.
    """

    __slots__ = ()

    def on_head(self, head) -> None:
        raise NotImplementedError

    def on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def on_end(self, trailers) -> None:
        raise NotImplementedError


class Parser:
    """A codec's parser: bytes in, sink calls out (the HTTP/1 contract is in
    ``protocols.http1``). A base class for the reason Sink is one."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes | None:
        raise NotImplementedError

    def feed_eof(self) -> bool:
        raise NotImplementedError

    def expect(self, method: bytes) -> None:
        raise NotImplementedError

    def set_sink(self, sink: Sink) -> None:
        raise NotImplementedError


# Response flags: why the proxy answered itself or a request ended early, in
# the spirit of Envoy's. Shown in logs and metrics; a fixed set (label-safe).
FLAG_DOWNSTREAM_PROTOCOL_ERROR = "DPE"   # 400/414/431/501: the client sent what we refuse to forward
FLAG_REQUEST_HEADER_TIMEOUT = "DRT"      # 408: the request head did not arrive in time (slowloris)
FLAG_DOWNSTREAM_CLOSED = "DC"            # the client went away before the response was complete
FLAG_NO_ROUTE = "NR"                     # 404: no route matched on a non-transparent listener
FLAG_UPSTREAM_CONNECT_FAILURE = "UF"     # 503: connecting upstream failed
FLAG_UPSTREAM_TIMEOUT = "UT"             # 504: the route's timeout passed before the response head
FLAG_UPSTREAM_TERMINATED = "UC"          # 502: the upstream closed or reset before the response ended
FLAG_UPSTREAM_PROTOCOL_ERROR = "UPE"     # 502: the upstream sent bytes that are not a valid response
FLAG_DIRECT_RESPONSE = "DR"              # the route answers itself (direct_response / redirect)
FLAG_LOOP = "LOOP"                       # 508: the destination is this proxy's own listener
FLAG_RATE_LIMITED = "RL"                 # 429: the route's local rate limit refused the request
FLAG_UPSTREAM_OVERFLOW = "UO"            # 503: a circuit breaker of the cluster is full (nothing was sent)
FLAG_ACCESS_DENIED = "AD"                # 403: the route's authorization does not allow the client's identity
FLAG_RETRY_LIMIT = "URX"                 # the route's retry attempts ran out; added to the last try's flag

FLAGS = (FLAG_DOWNSTREAM_PROTOCOL_ERROR, FLAG_REQUEST_HEADER_TIMEOUT, FLAG_DOWNSTREAM_CLOSED, FLAG_NO_ROUTE,
         FLAG_UPSTREAM_CONNECT_FAILURE, FLAG_UPSTREAM_TIMEOUT, FLAG_UPSTREAM_TERMINATED,
         FLAG_UPSTREAM_PROTOCOL_ERROR, FLAG_DIRECT_RESPONSE, FLAG_LOOP, FLAG_RATE_LIMITED, FLAG_UPSTREAM_OVERFLOW,
         FLAG_RETRY_LIMIT, FLAG_ACCESS_DENIED)


class HttpError(Exception):
    """Input the codec refuses. ``status`` is what the proxy answers the peer
    that sent it (400, 414, 431, 501 for a request; 502 for a response),
    ``flag`` one of FLAGS, ``detail`` a short human reason for the log (never
    echoed to the client)."""

    def __init__(self, status: int, detail: str, flag: str = FLAG_DOWNSTREAM_PROTOCOL_ERROR) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.flag = flag


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds a codec enforces on what it parses. The defaults are the issue's numbers."""

    max_header_bytes: int = 60 * 1024   # the whole head: request/status line + fields (431 / 502)
    max_header_count: int = 100         # fields in the head, and in trailers (431 / 502)
    max_uri_bytes: int = 8 * 1024       # request target (414)

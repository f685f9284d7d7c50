"""HTTP/1.1: two sans-IO codecs behind one interface, and the proxy session.

The interface every codec implements (``Parser``; its sink is a ``Sink``,
both base classes in ``..events``)::

    parser = make_parser(codec, role, sink, limits)   # role: "request" | "response"
    rest = parser.feed(data)   # calls sink.on_head / on_data / on_end synchronously
    ok = parser.feed_eof()     # the peer closed its sending side

* ``sink.on_head(head)``: a ``Request`` (role "request") or ``Response``
  (role "response") from ``..events``, framing already decided and checked.
* ``sink.on_data(chunk)``: body bytes, de-chunked; never empty.
* ``sink.on_end(trailers)``: the message ended; ``trailers`` is a header
  list (lower-case names) or None. Informational (1xx) responses get
  ``on_head`` and no ``on_data``/``on_end``.
* ``feed`` returns None while the bytes are HTTP/1. It returns the bytes
  that followed (maybe b"") once the stream stops being HTTP/1: in role
  "request" right after ``on_end`` of a request with ``upgrade`` set or
  method CONNECT (whether the switch happens is the upstream's answer, so
  the session keeps these bytes and, if the upgrade is declined, feeds them
  to a fresh parser); in role "response" after ``on_head`` of a 101 or of a
  2xx answer to CONNECT. After that the parser takes no more input.
* Role "response": ``parser.expect(method)`` must be called before each
  response with the request's method (HEAD and CONNECT change framing).
  One parser serves every response of an upstream connection;
  ``set_sink(sink)`` points it at the exchange of the next one.
* Malformed input raises ``HttpError`` (from ``feed``, possibly after some
  sink calls for earlier, valid messages). The parser is then dead.
* ``feed_eof()`` returns True if the input ended cleanly: between messages,
  or ending a read-until-close response body (then ``on_end(None)`` was
  called). False means a message was cut short.
"""
from __future__ import annotations

import importlib.util

from ..events import Limits, Parser, Request, Sink

__all__ = ("BLOCK_UPGRADE", "BLOCK_UPSTREAM_FULL", "BLOCK_WAITING", "CODECS", "Parser", "REFUSED", "Sink",
           "available_codecs", "make_parser", "resolve_codec")

CODECS = ("h11", "httptools")

# Shared by the session and its exchanges. Here, not in either module: compiled,
# those two import each other's types before their code runs (compiled.pxd_text),
# so neither may import names from the other at module level.
# Reasons downstream reading is paused; reading resumes when none is left.
BLOCK_UPSTREAM_FULL = 1   # the upstream's write buffer is over its high mark
BLOCK_WAITING = 2         # a request is waiting for an earlier one (pipelining) or for a connection
BLOCK_UPGRADE = 4         # an Upgrade/CONNECT request awaits the upstream's answer
# The request of a refusal answered before any request head was whole.
REFUSED = Request(b"-", b"-", b"-", None, [], keep_alive=False)


def available_codecs() -> tuple[str, ...]:
    if importlib.util.find_spec("httptools") is None:
        return ("h11",)
    return CODECS


def resolve_codec(name: str) -> str:
    """"auto" -> the fastest installed codec; a named one must be installed."""
    available = available_codecs()
    if name == "auto":
        return available[-1]
    if name not in available:
        raise ValueError(f"http1 codec '{name}' is not installed (available: {', '.join(available)})")
    return name


def make_parser(codec: str, role: str, sink: Sink, limits: Limits) -> Parser:
    if codec == "httptools":
        from .httptools_codec import HttptoolsParser
        return HttptoolsParser(role, sink, limits)
    from .h11_codec import H11Parser
    return H11Parser(role, sink, limits)

"""Trace context on the wire: W3C traceparent/tracestate and B3, parsed and made without the SDK.

Why not the OpenTelemetry propagators: they work on a carrier mapping and a
Context object and cost several microseconds per request, sampled or not.
The proxy reads the fields straight from the codec's ``(name, value)`` list
(lower-case bytes) and writes ready-made field lines, and the unsampled path
(99 % of requests at the default ratio) creates no object of the SDK at all.

The formats:

- ``tracecontext`` (W3C Trace Context): ``traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex
  flags>``, lower-case hex, neither id all zeros, version ``ff`` invalid; a later version may carry
  more after a ``-``. ``tracestate`` is forwarded as received (several fields joined with ``,``),
  and only with a valid traceparent.
- ``b3`` / ``b3multi`` (Zipkin B3): ``b3: <trace id>-<span id>[-<sampling>[-<parent id>]]`` or
  ``b3: <sampling>``; or ``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-sampled`` (``1``/``0``/``true``/
  ``false``), ``x-b3-flags: 1`` (debug, sampled). Trace ids of 16 hex digits are left-padded. Both
  names extract both encodings, as the OpenTelemetry propagators do; they differ in what is injected.
  Without a sampling decision ("deferred") the proxy decides by its ratio and keeps the ids.

When several formats are configured (``OTEL_PROPAGATORS``), the last one
that yields a valid context wins, like OpenTelemetry's composite propagator.
"""
from __future__ import annotations

import re
from typing import NamedTuple

TRACECONTEXT, B3, B3MULTI = "tracecontext", "b3", "b3multi"
SUPPORTED = (TRACECONTEXT, B3, B3MULTI)
# Values of OTEL_PROPAGATORS that need nothing from a proxy: baggage is forwarded as any other field.
PASSIVE = ("baggage",)

TRACEPARENT, TRACESTATE = b"traceparent", b"tracestate"
B3_SINGLE = b"b3"
B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_ID, B3_SAMPLED, B3_FLAGS = (b"x-b3-traceid", b"x-b3-spanid",
                                                               b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags")
B3_NAMES = frozenset((B3_SINGLE, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_ID, B3_SAMPLED, B3_FLAGS))
W3C_NAMES = frozenset((TRACEPARENT, TRACESTATE))

_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_HEX16_32 = re.compile(rb"(?:[0-9a-f]{16}){1,2}\Z")
_HEX16 = re.compile(rb"[0-9a-f]{16}\Z")


class Context(NamedTuple):
    """An incoming trace context (a plain tuple of this shape on the hot path: NamedTuple() costs).

    Ids stay hex (validated, lower-case, 32 and 16 digits): most requests are decided without
    converting them. ``sampled``: the caller's decision, None when it deferred it (B3).
    ``trace_id`` empty: a B3 decision without ids (``b3: 0``).
    """

    trace_id: bytes           # 32 hex digits
    span_id: bytes            # 16 hex digits: the caller's span, parent of the proxy's SERVER span
    sampled: bool | None
    tracestate: bytes | None  # W3C only, as received


_ZERO32, _ZERO16 = b"0" * 32, b"0" * 16


def names_for(propagators: tuple[str, ...]) -> frozenset[bytes]:
    """The field names the configured formats read, and so the ones a sampled request's upstream head
    must not carry from the client (the proxy writes its own)."""
    names: set[bytes] = set()
    if TRACECONTEXT in propagators:
        names |= W3C_NAMES
    if B3 in propagators or B3MULTI in propagators:
        names |= B3_NAMES
    return frozenset(names)


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """-> (trace id hex, parent span id hex, sampled) or None when invalid (then the trace restarts)."""
    n = len(value)
    if n != 55:
        # Version 00 is exactly 55 bytes; a later version may append fields after a dash.
        if n < 55 or value[:2] == b"00" or value[55:56] != b"-":
            return None
    if _TRACEPARENT.match(value) is None or value[:2] == b"ff":
        return None
    trace_id, span_id = value[3:35], value[36:52]
    if trace_id == _ZERO32 or span_id == _ZERO16:
        return None
    return trace_id, span_id, value[54] in _ODD_HEX   # the flags' low bit: sampled


_ODD_HEX = frozenset(b"13579bdf")


def _b3_sampled(value: bytes | None) -> bool | None:
    if value is None:
        return None
    if value in (b"1", b"d", b"true"):
        return True
    if value in (b"0", b"false"):
        return False
    return None


def _b3_ids(trace_id: bytes, span_id: bytes) -> tuple[bytes, bytes] | None:
    if not _HEX16_32.match(trace_id) or not _HEX16.match(span_id):
        return None
    if len(trace_id) == 16:
        trace_id = _ZERO16 + trace_id
    if trace_id == _ZERO32 or span_id == _ZERO16:
        return None
    return trace_id, span_id


def parse_b3_single(value: bytes) -> tuple | None:
    """``b3`` field -> Context-shaped tuple; a lone sampling state gives empty ids (a decision only)."""
    parts = value.split(b"-")
    if len(parts) == 1:
        sampled = _b3_sampled(parts[0]) if parts[0] in (b"0", b"1", b"d") else None
        return None if sampled is None else (b"", b"", sampled, None)
    if len(parts) > 4:
        return None
    sampled = None
    if len(parts) >= 3:
        if parts[2] not in (b"0", b"1", b"d"):
            return None
        sampled = _b3_sampled(parts[2])
    if len(parts) == 4 and not _HEX16.match(parts[3]):
        return None
    ids = _b3_ids(parts[0], parts[1])
    return None if ids is None else (ids[0], ids[1], sampled, None)


def parse_b3_multi(trace_id: bytes | None, span_id: bytes | None, sampled: bytes | None,
                   flags: bytes | None) -> tuple | None:
    decision = True if flags == b"1" else _b3_sampled(sampled)
    if trace_id is None and span_id is None:
        return None if decision is None else (b"", b"", decision, None)
    if trace_id is None or span_id is None:
        return None
    ids = _b3_ids(trace_id, span_id)
    return None if ids is None else (ids[0], ids[1], decision, None)


def extract(headers: list, propagators: tuple[str, ...], names: frozenset[bytes]) -> tuple[tuple | None, bool]:
    """The incoming context -> (Context-shaped tuple or None, whether any of ``names`` was present).

    ``names`` is :func:`names_for` of ``propagators`` (passed in: computed once). A present but
    invalid field gives (None, True): the proxy starts a new trace and replaces the field.
    """
    traceparent = tracestate = b3 = tid = sid = sampled = flags = None
    seen = False
    repeated = False
    for name, value in headers:
        if name in names:
            seen = True
            if name == TRACEPARENT:
                repeated = repeated or traceparent is not None
                traceparent = value
            elif name == TRACESTATE:
                tracestate = value if tracestate is None else tracestate + b"," + value
            elif name == B3_SINGLE:
                b3 = value
            elif name == B3_TRACE_ID:
                tid = value
            elif name == B3_SPAN_ID:
                sid = value
            elif name == B3_SAMPLED:
                sampled = value
            elif name == B3_FLAGS:
                flags = value
    if not seen:
        return None, False
    found = None
    for propagator in propagators:
        if propagator == TRACECONTEXT:
            # Two traceparent fields: which one is meant is unknowable, so neither is (a new trace).
            parsed = parse_traceparent(traceparent) if traceparent is not None and not repeated else None
            if parsed is not None:
                found = (parsed[0], parsed[1], parsed[2], tracestate or None)
        else:
            ctx = parse_b3_single(b3) if b3 is not None else None
            if ctx is None:
                ctx = parse_b3_multi(tid, sid, sampled, flags)
            if ctx is not None:
                found = ctx
    return found, True


class Injector:
    """Field lines for the upstream head, in every configured format, for one span context."""

    __slots__ = ("tracecontext", "b3", "b3multi")

    def __init__(self, propagators: tuple[str, ...]) -> None:
        self.tracecontext = TRACECONTEXT in propagators
        self.b3 = B3 in propagators
        self.b3multi = B3MULTI in propagators

    def lines(self, trace_id: int, span_id: int, sampled: bool, tracestate: bytes | None = None,
              flags: int | None = None) -> bytes:
        """``traceparent: ...`` CRLF (+ tracestate, b3 ...): hex digits and the received tracestate
        (which the codec checked) only, so the lines need no further check."""
        out = b""
        if self.tracecontext:
            out = b"traceparent: 00-%032x-%016x-%02x\r\n" % (
                trace_id, span_id, (1 if sampled else 0) if flags is None else flags)
            if tracestate:
                out += b"tracestate: " + tracestate + b"\r\n"
        if self.b3:
            out += b"b3: %032x-%016x-%s\r\n" % (trace_id, span_id, b"1" if sampled else b"0")
        if self.b3multi:
            out += b"x-b3-traceid: %032x\r\nx-b3-spanid: %016x\r\nx-b3-sampled: %s\r\n" % (
                trace_id, span_id, b"1" if sampled else b"0")
        return out

"""The access log: one line per HTTP request on stdout, formatted on the loop, written by a thread.

Formats (``telemetry.access_log.format``):

``text``, in the spirit of Envoy's default, positional, ``-`` for a missing value::

    [START_TIME] "METHOD PATH PROTOCOL" STATUS FLAGS BYTES_RECEIVED BYTES_SENT DURATION_MS UPSTREAM_MS
    "X-FORWARDED-FOR" "USER-AGENT" "REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST" ROUTE CLUSTER DOWNSTREAM_PEER
    "PEER_IDENTITY" TRACE_ID

(one line), e.g.
``[2026-11-22T10:00:00.123Z] "GET /api/x HTTP/1.1" 200 - 0 1234 3 2 "-" "curl/8.5.0" "9f2c...-0000000001"
"api:8080" "10.0.0.5:8080" api-route api 10.0.0.9:51234 "-" -``. Durations are whole milliseconds as in
Envoy's format; START_TIME is UTC with milliseconds.

``json``: one object per line, always the same keys (``null`` for a missing value), durations as
milliseconds with microsecond resolution: ``start_time, method, path, protocol, status, response_flags,
bytes_received, bytes_sent, duration_ms, upstream_service_time_ms, x_forwarded_for, user_agent,
request_id, authority, upstream_host, route, cluster, downstream_peer, peer_identity, trace_id``.

What the client controls (method, path, protocol, user agent, request id, authority, x-forwarded-for,
peer identity) is escaped before it reaches a line: in ``text``, ``"`` and ``\\`` get a backslash and
every byte outside printable ASCII becomes ``\\xNN``, so no path can end a line or a quoted field and
forge another entry; in ``json`` it is a JSON string (UTF-8 decoded, undecodable bytes as ``\\xNN``
text, ``ensure_ascii``). Fields are truncated (path 1 KiB, the others 256 bytes) so every line and so
the buffer have a bound.

Never blocking the loop: ``log`` formats the line and appends it to a deque
(text ~1.7 us, json ~2.6 us per line with the writer thread's share, measured
by tests/telemetry/bench_telemetry.py); a daemon
thread wakes, waits ``flush_interval`` so lines batch up, and writes them
with ``os.write`` (a blocked stdout pipe blocks that thread only). When
more than ``max_buffer_bytes`` wait, new lines are dropped and counted in
``dropped`` (for a metric); the loop never waits for the writer.
"""
from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from typing import IO, NamedTuple

MAX_PATH = 1024
MAX_FIELD = 256
DEFAULT_BUFFER_BYTES = 4 << 20
DEFAULT_FLUSH_INTERVAL = 0.05

FORMATS = ("text", "json")


class AccessRecord(NamedTuple):
    """The fields of one line, in this order. ``log`` takes this or any plain tuple of the same shape
    (a plain tuple is cheaper to build on the hot path). Client-sent values are bytes as the codec
    delivers them; what the proxy makes is str."""

    start_time: float                 # epoch seconds of the request's first byte (time.time())
    method: bytes
    path: bytes                       # the request target as sent (query included); truncated to MAX_PATH
    protocol: bytes                   # b"HTTP/1.1"
    status: int                       # 0: no response was sent (the client left first)
    flags: str                        # "-" or e.g. "UF,URX"
    bytes_received: int               # request body bytes from the client
    bytes_sent: int                   # response body bytes to the client
    duration_ms: float
    upstream_ms: float | None         # request head sent upstream -> response head; None: no upstream answer
    request_id: bytes | None          # x-request-id as forwarded
    authority: bytes | None
    upstream_host: str | None         # "ip:port" of the last try
    route: str | None
    cluster: str | None
    downstream_peer: str | None       # "ip:port" of the client
    peer_identity: str | None         # the client's SPIFFE ID (mTLS)
    trace_id: str | None              # 32 hex digits of a sampled trace
    user_agent: bytes | None = None
    forwarded_for: bytes | None = None   # x-forwarded-for as forwarded


# Bytes that would let a value break out of its quotes or its line, and anything not printable ASCII.
_UNSAFE = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')
# The same set as a translation to NUL: ``0 in v.translate(_TO_NUL)`` is the fast test (~0.1 us for a
# whole line's worth of fields, against ~0.5 us for the regex search).
_TO_NUL = bytes(0 if b < 0x20 or b in (0x22, 0x5c) or b >= 0x7f else b for b in range(256))


def _escape_byte(m: re.Match) -> bytes:
    b = m.group()
    return b"\\" + b if b in (b'"', b"\\") else b"\\x%02x" % b[0]


def escape(value: bytes, limit: int = MAX_FIELD) -> bytes:
    """A client-sent value for the text format: truncated, quote/backslash escaped, the rest as \\xNN."""
    if len(value) > limit:
        value = value[:limit]
    return _UNSAFE.sub(_escape_byte, value)


def json_string(value: bytes, limit: int = MAX_FIELD) -> bytes:
    """A client-sent value as a JSON string: UTF-8 decoded (bad bytes as \\xNN text), ASCII-only."""
    if len(value) > limit:
        value = value[:limit]
    return json.dumps(value.decode("utf-8", "backslashreplace")).encode()


def _quoted(value: str | None) -> bytes:
    return b"null" if value is None else b'"%s"' % value.encode()


class AccessLog:
    """``log(record)`` from the event loop thread only; ``close()`` flushes what is queued."""

    def __init__(self, format: str = "text", stream: IO | None = None, *,
                 max_buffer_bytes: int = DEFAULT_BUFFER_BYTES, flush_interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, got {format!r}")
        if stream is None:
            import sys
            stream = sys.stdout
        self.format = format
        self._format = self._text if format == "text" else self._json
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None   # a file-like object without a descriptor (tests): stream.write
        self._limit = max_buffer_bytes
        self._interval = flush_interval
        self._queue: collections.deque[bytes] = collections.deque()
        # Single-writer counters: queued by the loop, flushed by the thread; their difference is what waits.
        self._queued_bytes = 0
        self._flushed_bytes = 0
        self.dropped = 0          # lines not queued because the buffer was full (loop thread)
        self.written = 0          # lines written (writer thread)
        self.write_errors = 0     # lines lost to a failing stdout (writer thread)
        self._sleeping = False
        self._stopping = False
        self._wake = threading.Event()
        self._second = -1
        self._second_text = b""
        self._thread = threading.Thread(target=self._run, name="sidecar-access-log", daemon=True)
        self._thread.start()

    # --- the loop's side

    def log(self, record: tuple) -> None:
        line = self._format(record)
        n = len(line)
        if self._queued_bytes - self._flushed_bytes + n > self._limit:
            self.dropped += 1
            return
        self._queue.append(line)
        self._queued_bytes += n
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    def _timestamp(self, start: float) -> tuple[bytes, int]:
        second = int(start)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return self._second_text, int((start - second) * 1000)

    def _text(self, r: tuple) -> bytes:
        if len(r) != 20:
            r = AccessRecord(*r)
        (start, method, path, protocol, status, flags, rx, tx, duration, upstream_ms, rid, authority,
         upstream, route, cluster, peer, identity, trace_id, ua, xff) = r
        second, ms = self._timestamp(start)
        rid = rid or b"-"
        authority = authority or b"-"
        ua = ua or b"-"
        xff = xff or b"-"
        identity = identity.encode("utf-8", "backslashreplace") if identity else b"-"
        # One test over everything the client controls; escaping and truncation only when needed.
        if (0 in b"".join((method, path, protocol, rid, authority, ua, xff, identity)).translate(_TO_NUL)
                or len(path) > MAX_PATH or len(rid) > MAX_FIELD or len(authority) > MAX_FIELD
                or len(ua) > MAX_FIELD or len(xff) > MAX_FIELD or len(identity) > MAX_FIELD or len(method) > MAX_FIELD):
            method, path, protocol = escape(method), escape(path, MAX_PATH), escape(protocol)
            rid, authority, ua, xff, identity = escape(rid), escape(authority), escape(ua), escape(xff), escape(identity)
        return b'[%s.%03dZ] "%s %s %s" %d %s %d %d %d %s "%s" "%s" "%s" "%s" "%s" %s %s %s "%s" %s\n' % (
            second, ms, method, path, protocol, status, flags.encode(), rx, tx, duration,
            b"-" if upstream_ms is None else b"%d" % upstream_ms, xff, ua, rid, authority,
            upstream.encode() if upstream else b"-", route.encode() if route else b"-",
            cluster.encode() if cluster else b"-", peer.encode() if peer else b"-", identity,
            trace_id.encode() if trace_id else b"-")

    def _json(self, r: tuple) -> bytes:
        if len(r) != 20:
            r = AccessRecord(*r)
        (start, method, path, protocol, status, flags, rx, tx, duration, upstream_ms, rid, authority,
         upstream, route, cluster, peer, identity, trace_id, ua, xff) = r
        second, ms = self._timestamp(start)
        identity = identity.encode("utf-8", "backslashreplace") if identity else None
        if (0 in b"".join((method, path, protocol, rid or b"", authority or b"", ua or b"", xff or b"",
                           identity or b"")).translate(_TO_NUL)
                or len(path) > MAX_PATH or len(method) > MAX_FIELD or (rid and len(rid) > MAX_FIELD)
                or (authority and len(authority) > MAX_FIELD) or (ua and len(ua) > MAX_FIELD)
                or (xff and len(xff) > MAX_FIELD) or (identity and len(identity) > MAX_FIELD)):
            q = json_string
            path = json_string(path, MAX_PATH)
        else:
            q = b'"%s"'.__mod__
            path = b'"%s"' % path
        method, protocol = q(method), q(protocol)
        rid = q(rid) if rid else b"null"
        authority = q(authority) if authority else b"null"
        ua = q(ua) if ua else b"null"
        xff = q(xff) if xff else b"null"
        identity = q(identity) if identity else b"null"
        # What the proxy made (flags, addresses, config names, hex ids) needs no escaping.
        return (b'{"start_time":"%s.%03dZ","method":%s,"path":%s,"protocol":%s,"status":%d,"response_flags":"%s",'
                b'"bytes_received":%d,"bytes_sent":%d,"duration_ms":%.3f,"upstream_service_time_ms":%s,'
                b'"x_forwarded_for":%s,"user_agent":%s,"request_id":%s,"authority":%s,"upstream_host":%s,'
                b'"route":%s,"cluster":%s,"downstream_peer":%s,"peer_identity":%s,"trace_id":%s}\n' % (
                    second, ms, method, path, protocol, status, flags.encode(), rx, tx, duration,
                    b"null" if upstream_ms is None else b"%.3f" % upstream_ms, xff, ua, rid, authority,
                    _quoted(upstream), _quoted(route), _quoted(cluster), _quoted(peer), identity, _quoted(trace_id)))

    # --- the writer thread

    @property
    def pending_bytes(self) -> int:
        return self._queued_bytes - self._flushed_bytes

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._sleeping = True
            if not queue:
                if self._stopping:
                    return
                self._wake.wait(1.0)
            self._wake.clear()
            self._sleeping = False
            if not self._stopping:
                time.sleep(self._interval)   # let lines gather: one write (and one wake-up) per batch
            self._drain()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch = []
            size = 0
            while queue and size < 65536:
                line = queue.popleft()
                batch.append(line)
                size += len(line)
            self._write(b"".join(batch), len(batch))
            self._flushed_bytes += size

    def _write(self, data: bytes, lines: int) -> None:
        try:
            if self._fd is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            else:
                self._stream.write(data.decode("ascii", "backslashreplace"))
                self._stream.flush()
        except (OSError, ValueError):
            self.write_errors += lines   # stdout closed or broken: the lines are gone, the proxy goes on
            return
        self.written += lines

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (up to ``timeout``) and stop the thread; later ``log`` calls are dropped."""
        self._stopping = True
        self._limit = -1
        self._wake.set()
        self._thread.join(timeout)

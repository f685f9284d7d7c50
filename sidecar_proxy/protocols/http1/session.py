"""The HTTP/1.1 proxy session: one downstream connection, its requests in order.

A :class:`Session` replaces the relay's downstream protocol once a
connection is known to speak HTTP/1 (a ``protocol: http`` listener, or
detection on an ``auto`` one). The request parser calls the session (its
sink); each request becomes an :class:`Exchange` that routes it, takes an
upstream connection from a pool, streams the request body up and the
response down, and gives the connection back.

Invariants:

* Responses go downstream in request order. Only the oldest exchange
  (``active``) talks to an upstream; pipelined requests behind it wait with
  their (bounded) bytes, and downstream reading pauses while they wait.
* Nothing is buffered without a bound: bodies stream chunk by chunk, and
  reading pauses on the side whose bytes cannot be written (upstream write
  buffer full -> downstream reading paused; downstream write buffer full ->
  upstream reading paused). Bytes read while an upstream connection is being
  made are held; reading is paused meanwhile, so that is one read.
* A request the proxy refuses (parse error, head timeout) gets a complete
  local response and the connection closes; the upstream saw none of it,
  because a head is only forwarded after the codec accepted all of it.
* A response whose head already went downstream cannot be replaced by an
  error: if it breaks, the downstream connection is reset so the client
  sees a truncated message, never a wrong-but-complete one.
* An upstream connection goes back to its pool only if both messages ended
  cleanly and the upstream allowed keep-alive.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING

from ...addr import format_addr
from ...transport.original_dst import is_own_listener
from ..events import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_TUNNEL, BODY_UNTIL_CLOSE,
                      FLAG_DIRECT_RESPONSE, FLAG_DOWNSTREAM_CLOSED, FLAG_LOOP, FLAG_NO_ROUTE,
                      FLAG_REQUEST_HEADER_TIMEOUT, FLAG_UPSTREAM_CONNECT_FAILURE, FLAG_UPSTREAM_PROTOCOL_ERROR,
                      FLAG_UPSTREAM_TERMINATED, FLAG_UPSTREAM_TIMEOUT, HttpError, Request, Response)
from . import make_parser
from .serialize import InvalidHeader, chunk, last_chunk, local_response, request_head, response_head

if TYPE_CHECKING:
    from ...transport.listeners import HttpRuntime
    from ...transport.relay import Relay
    from ...upstream.pool import Pool, UpstreamConn

log = logging.getLogger("sidecar_proxy.http")

# Fields that describe one hop, never forwarded (RFC 9110 7.6.1); the codec
# already turned Transfer-Encoding and Content-Length into framing.
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"))
_CHUNKED_FIELD = (b"transfer-encoding", b"chunked")
_CLOSE_FIELD = (b"connection", b"close")
_KEEP_ALIVE_FIELD = (b"connection", b"keep-alive")
_UPGRADE_FIELD = (b"connection", b"upgrade")
_XFP_HTTP = (b"x-forwarded-proto", b"http")
# Request fields the proxy edits or leaves alone instead of adding its own.
_PROXY_FIELDS = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"))

# RFC 9110 9.2.1: a bodiless request with one of these may be sent again.
_SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))

# Connection values that name no other field (the common case: no set to build).
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade", b"Upgrade"))

# Reasons downstream reading is paused; reading resumes when none is left.
_BLOCK_UPSTREAM_FULL = 1   # the upstream's write buffer is over its high mark
_BLOCK_WAITING = 2         # a request is waiting for an earlier one (pipelining) or for a connection
_BLOCK_UPGRADE = 4         # an Upgrade/CONNECT request awaits the upstream's answer

# Seconds a closing connection keeps reading (and dropping) what the client
# still sends, so the kernel does not reset away our last response.
LINGER = 2.0

# How the response body is written downstream.
_OUT_NONE = 0      # no body
_OUT_RAW = 1       # as received (Content-Length, or close-delimited to an HTTP/1.0 client)
_OUT_CHUNKED = 2   # re-chunked (chunked or close-delimited upstream, HTTP/1.1 client)

_STATUS_REASONS = {400: "bad request", 404: "no route", 408: "request header timeout", 414: "URI too long",
                   431: "request header fields too large", 501: "not implemented", 502: "bad gateway",
                   503: "upstream unavailable", 504: "upstream timeout"}


_REFUSED = Request(b"-", b"-", b"-", None, [], keep_alive=False)


class RequestIds:
    """x-request-id values: UUID-shaped (version 4 layout), unique, cheap.

    A random 20-hex-digit prefix per process and a 48-bit counter: unique
    within the process by the counter and across processes by 76 random
    bits. Ids are not secrets, so this is ~10x cheaper than uuid4().
    """

    __slots__ = ("prefix", "counter")

    def __init__(self) -> None:
        h = "%020x" % random.SystemRandom().getrandbits(80)
        self.prefix = f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{'89ab'[int(h[15], 16) & 3]}{h[16:19]}-".encode()
        self.counter = random.getrandbits(40)

    def next(self) -> bytes:
        self.counter = c = (self.counter + 1) & 0xFFFFFFFFFFFF
        return b"%s%012x" % (self.prefix, c)


class Exchange:
    """One request and its response."""

    __slots__ = ("session", "req", "route", "cluster", "pool", "conn", "rparser", "pending", "req_ended",
                 "trailers", "head_sent", "req_sent", "resp_started", "resp_done", "out", "reuse",
                 "close_after", "deadline", "upgrade_rest", "status", "flag", "upstream_addr", "began",
                 "connect_task", "finished", "upstream_paused", "held", "cluster_config", "reused",
                 "answered", "resent", "head_bytes")

    def __init__(self, session: Session, req: Request) -> None:
        self.session = session
        self.req = req
        self.route = None
        self.cluster = ""
        self.pool: Pool | None = None
        self.conn: UpstreamConn | None = None
        self.rparser = None
        self.pending: list[bytes] | None = None   # request body read before the upstream connection
        self.req_ended = False                    # the whole request was read from downstream
        self.trailers = None
        self.head_sent = False                    # the request head was written upstream
        self.req_sent = False                     # ... and all of its body
        self.resp_started = False                 # a response head went downstream
        self.resp_done = False
        self.out = _OUT_NONE
        self.reuse = False                        # the upstream connection may be pooled after this
        self.close_after = False                  # the downstream connection closes after this response
        self.deadline = 0.0                       # loop time the response head is due by; 0: not waiting
        self.upgrade_rest: bytes | None = None
        self.status = 0
        self.flag = "-"
        self.upstream_addr: tuple[str, int] | None = None
        self.began = time.perf_counter()
        self.connect_task: asyncio.Task | None = None
        self.finished = False
        self.upstream_paused = False
        self.held: list[bytes] | None = None      # upstream writes of the read being parsed
        self.cluster_config = None
        self.reused = False                       # sent on a pooled connection
        self.answered = False                     # a byte came back from the upstream
        self.resent = False                       # sent again after a reused connection closed (_resend)
        self.head_bytes: bytes | None = None      # the serialized head, kept for a resend

    # --- request side (called by the session as the parser delivers)

    def request_data(self, data: bytes) -> None:
        if self.resp_done or self.finished or self.flag == FLAG_DIRECT_RESPONSE:
            return  # answered already: the rest of the body is read and dropped
        if self.head_sent:
            if self.conn is not None:
                self.up_write(chunk(data) if self.req.framing == BODY_CHUNKED else data)
        elif self.pending is None:
            self.pending = [data]
        else:
            self.pending.append(data)

    def request_end(self, trailers) -> None:
        self.req_ended = True
        self.trailers = trailers
        if self.head_sent and self.conn is not None:
            self._finish_request()
        elif self.resp_done:
            self.session.exchange_done(self)

    def up_write(self, data: bytes) -> None:
        """Write upstream; while a downstream read is being parsed, after it parsed cleanly.

        So a request whose head and broken body arrive in one read never
        reaches the upstream at all (the smuggling corpus sends exactly that).
        """
        held = self.held
        if held is not None:
            held.append(data)
        elif self.session.feeding:
            self.held = [data]
            self.session.holding.append(self)
        else:
            self.conn.transport.write(data)

    def flush_held(self) -> None:
        held, self.held = self.held, None
        conn = self.conn
        if held and conn is not None:
            if len(held) == 1:
                conn.transport.write(held[0])
            else:
                conn.transport.writelines(held)

    def _finish_request(self) -> None:
        if self.req.framing == BODY_CHUNKED:
            self.up_write(last_chunk(self.trailers))
        self.req_sent = True
        timeout = self.route.timeout if self.route is not None else self.session.rt.default_timeout
        if timeout and not self.resp_started:
            session = self.session
            self.deadline = deadline = session.loop.time() + timeout
            session.watch_deadline(deadline)

    # --- routing and the upstream connection

    def dispatch(self) -> None:
        session = self.session
        rt = session.rt
        req = self.req
        route = rt.table.match(req)
        if route is None:
            if session.relay.orig_dst is None:
                self.local(404, FLAG_NO_ROUTE)
                return
            cluster = rt.passthrough
        else:
            self.route = route
            kind = route.kind
            if kind != "cluster":
                if kind == "direct_response":
                    self.direct(route.direct_status, route.direct_body, route.direct_content_type)
                else:
                    self.direct(route.redirect_status, b"", None,
                                ((b"location", route.redirect_location(req, b"http")),))
                return
            cluster = rt.clusters[route.pick_cluster()]
        self.cluster = cluster.name
        self.cluster_config = cluster
        if cluster.original_destination:
            target = session.relay.orig_dst
            if target is None:
                self.local(503, FLAG_UPSTREAM_CONNECT_FAILURE, "no original destination")
                return
        else:
            target = rt.pickers[cluster.name]()
        if is_own_listener(target, rt.own_ports):
            self.local(508, FLAG_LOOP, "the destination is this proxy's own listener")
            return
        self.upstream_addr = target
        pool = self.pool = rt.pool_for(cluster, target)
        conn = pool.take()
        if conn is not None:
            self.reused = True
            self.attach(conn)
        else:
            session.block(_BLOCK_WAITING)
            self.connect_task = session.loop.create_task(self._connect(pool, cluster, target))

    async def _connect(self, pool: Pool, cluster, target: tuple[str, int]) -> None:
        session = self.session
        rt = session.rt
        began = time.perf_counter()
        conn = pool.new_conn()
        try:
            async with asyncio.timeout(cluster.connect_timeout):
                await session.loop.create_connection(lambda: conn, target[0], target[1])
        except asyncio.CancelledError:
            pool.active -= 1
            conn.abort()
            raise
        except (OSError, TimeoutError) as exc:
            pool.active -= 1
            conn.abort()
            self.connect_task = None
            from ...transport.relay import connect_failure_reason
            reason = connect_failure_reason(exc)
            rt.connect_failures(cluster.name, reason)
            if not self.finished:
                self.local(503, FLAG_UPSTREAM_CONNECT_FAILURE, f"connect to {format_addr(target)}: {reason}")
            return
        self.connect_task = None
        rt.connect_seconds(cluster.name).observe(time.perf_counter() - began)
        if self.finished or session.lost:
            pool.drop(conn)
            return
        limit = rt.buffer_limit
        conn.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        session.unblock(_BLOCK_WAITING)
        self.attach(conn)

    def attach(self, conn: UpstreamConn) -> None:
        self.conn = conn
        conn.owner = self
        conn.requests += 1
        session = self.session
        parser = conn.parser
        if parser is None:
            parser = conn.parser = make_parser(session.rt.codec, "response", self, session.rt.limits)
        else:
            parser.set_sink(self)
        self.rparser = parser
        req = self.req
        parser.expect(req.method)
        try:
            head = self.head_bytes
            if head is None:
                head = self.head_bytes = request_head(req.method, req.target, session.upstream_headers(self))
        except InvalidHeader as exc:
            # A configured value or a codec gap let through a field we will not write.
            self.pool.give_back(conn)
            self.conn = None
            self.local(400, "DPE", f"request field refused at serialisation: {exc}")
            return
        transport = conn.transport
        if session.write_paused:
            # The client is not reading: this response waits until it does.
            self.upstream_paused = True
            transport.pause_reading()
        self.head_sent = True
        pending = self.pending
        if pending:
            self.pending = None
            if req.framing == BODY_CHUNKED:
                pending = [chunk(d) for d in pending]
            if session.feeding:
                self.up_write(head)
                self.held.extend(pending)
            else:
                transport.writelines([head, *pending])
        else:
            self.up_write(head)
        if self.req_ended:
            self._finish_request()

    # --- response side (the response parser's sink and the connection's events)

    def upstream_data(self, data: bytes) -> None:
        session = self.session
        session.relay.http_tx += len(data)
        self.answered = True
        # What one read produces downstream (head, body, last chunk) goes out in one write.
        session.cork = corked = []
        try:
            rest = self.rparser.feed(data)
        except HttpError as exc:
            session.uncork(corked)
            self.upstream_failed(502, FLAG_UPSTREAM_PROTOCOL_ERROR, exc.detail)
            return
        session.uncork(corked)
        if rest is not None:
            if self.conn is not None:
                self.session.tunnel(self, rest)
        elif self.resp_done:
            self._complete()

    def upstream_eof(self) -> None:
        if self.rparser is not None and self.rparser.feed_eof():
            self._complete()  # a close-delimited body ended (on_end ran)
            return
        self.upstream_failed(502, FLAG_UPSTREAM_TERMINATED, "upstream closed before the response ended")

    def _release(self, reuse: bool) -> None:
        """Hand the upstream connection back (or close it) with its flow-control state undone."""
        conn = self.conn
        if conn is None:
            return
        self.conn = None
        if self.upstream_paused:
            self.upstream_paused = False
            conn.transport.resume_reading()
        self.session.unblock(_BLOCK_UPSTREAM_FULL)
        if reuse:
            self.pool.give_back(conn)
        else:
            self.pool.drop(conn)

    def _complete(self) -> None:
        """The response ended; called after the parser returned, so no byte of it is left unparsed."""
        self._release(self.reuse and self.req_sent)
        if self.req_ended:
            self.session.exchange_done(self)
        # else the upstream answered before the request body ended: the rest
        # of the body is read and dropped, then the next request follows.

    def upstream_lost(self, exc: BaseException | None) -> None:
        if self.resp_done:
            self._release(False)
            return
        self.upstream_failed(502, FLAG_UPSTREAM_TERMINATED,
                             f"upstream connection lost: {exc}" if exc else "upstream connection closed")

    def _resendable(self) -> bool:
        """A reused connection closed under a request it never answered (RFC 9112 9.3.1).

        The upstream closed an idle keep-alive connection just as the
        request went out on it: the request was written but, with no byte
        of answer, certainly not processed if the server closed before
        reading it, and safe to repeat anyway when its method is safe and
        it has no body. Sent once more on a fresh connection, never twice.
        """
        return (self.reused and not self.answered and not self.resent and self.req_ended
                and self.req.framing == BODY_NONE and self.req.method in _SAFE_METHODS and not self.finished)

    def _resend(self) -> None:
        self._release(False)
        self.resent = True
        self.reused = False
        self.head_sent = self.req_sent = False
        self.deadline = 0.0
        self.rparser = None
        session = self.session
        session.rt.state.http_resends += 1
        session.block(_BLOCK_WAITING)
        self.connect_task = session.loop.create_task(self._connect(self.pool, self.cluster_config,
                                                                   self.upstream_addr))

    def upstream_pause_writing(self) -> None:
        self.session.block(_BLOCK_UPSTREAM_FULL)

    def upstream_resume_writing(self) -> None:
        self.session.unblock(_BLOCK_UPSTREAM_FULL)

    def upstream_failed(self, status: int, flag: str, detail: str) -> None:
        if flag == FLAG_UPSTREAM_TERMINATED and self._resendable():
            self._resend()
            return
        self._release(False)
        if self.finished:
            return
        if self.resp_done:
            # Garbage after a complete response: the response stands, the connection goes.
            if self.req_ended:
                self.session.exchange_done(self)
            return
        if self.resp_started:
            # Part of the response is downstream; a reset is the only honest end.
            self.flag = flag
            self.session.log_local(self, status, flag, detail)
            self.session.reset()
        else:
            self.local(status, flag, detail)

    def _timed_out(self) -> None:
        self.deadline = 0.0
        if not self.resp_started and not self.finished:
            self.upstream_failed(504, FLAG_UPSTREAM_TIMEOUT, "no response head within the route timeout")

    def on_head(self, resp: Response) -> None:
        status = resp.status
        session = self.session
        req = self.req
        if status < 200:
            if status == 101:
                if req.upgrade is None:
                    raise HttpError(502, "101 Switching Protocols without an Upgrade request",
                                    FLAG_UPSTREAM_PROTOCOL_ERROR)
                self._respond_head(resp, _OUT_NONE, keep_upgrade=True)
                return  # the parser returns the rest: tunnel()
            if req.version == b"1.1":
                session.write(response_head(status, resp.reason, self._response_fields(resp)))
            return
        self.deadline = 0.0
        framing = resp.framing
        if framing == BODY_TUNNEL:
            self._respond_head(resp, _OUT_NONE)
            return
        if framing == BODY_LENGTH or framing == BODY_NONE:
            out = _OUT_RAW if framing == BODY_LENGTH else _OUT_NONE
        elif req.version == b"1.1":
            out = _OUT_CHUNKED
        else:
            out = _OUT_RAW
            self.close_after = True  # an HTTP/1.0 client learns the end from the close
        self.reuse = resp.keep_alive and framing != BODY_UNTIL_CLOSE
        self._respond_head(resp, out)

    def _respond_head(self, resp: Response, out: int, keep_upgrade: bool = False) -> None:
        session = self.session
        req = self.req
        self.status = resp.status
        self.out = out
        fields = self._response_fields(resp, keep_upgrade)
        if out == _OUT_CHUNKED:
            fields.append(_CHUNKED_FIELD)
        elif resp.framing == BODY_NONE and resp.status != 304 and resp.header(b"transfer-encoding") is not None \
                and req.version == b"1.1":
            fields.append(_CHUNKED_FIELD)  # HEAD: say how the body would have come
        if keep_upgrade:
            pass
        elif not req.keep_alive or session.draining or self.close_after:
            self.close_after = True
            fields.append(_CLOSE_FIELD)
        elif req.version == b"1.0":
            fields.append(_KEEP_ALIVE_FIELD)
        try:
            head = response_head(resp.status, resp.reason, fields)
        except InvalidHeader as exc:
            raise HttpError(502, f"response field refused at serialisation: {exc}",
                            FLAG_UPSTREAM_PROTOCOL_ERROR) from None
        self.resp_started = True
        session.write(head)

    def _response_fields(self, resp: Response, keep_upgrade: bool = False) -> list:
        route = self.route
        drop = self.session.rt.response_drop(route)
        connection = resp.header(b"connection") if not keep_upgrade else None
        if connection is not None and connection not in _PLAIN_CONNECTION:
            drop = drop | {t.strip().lower() for t in connection.split(b",")}
        fields = [field for field in resp.headers if field[0] not in drop]
        if keep_upgrade:
            fields.append(_UPGRADE_FIELD)
            upgrade = resp.header(b"upgrade")
            if upgrade is not None:
                fields.append((b"upgrade", upgrade))
        if route is not None:
            if route.response_set:
                fields.extend(route.response_set)
            if route.response_add:
                fields.extend(route.response_add)
        return fields

    def on_data(self, data: bytes) -> None:
        out = self.out
        if out == _OUT_RAW:
            self.session.write(data)
        elif out == _OUT_CHUNKED:
            self.session.write(chunk(data))

    def on_end(self, trailers) -> None:
        if self.out == _OUT_CHUNKED:
            self.session.write(last_chunk(trailers))
        self.resp_done = True  # upstream_data / upstream_eof complete the exchange

    # --- answers the proxy makes itself

    def direct(self, status: int, body: bytes, content_type: bytes | None, extra=()) -> None:
        """A configured answer (direct_response, redirect): not an error, keeps the connection."""
        self.flag = FLAG_DIRECT_RESPONSE
        self.status = status
        self._local_write(status, body, content_type, extra, close=False)

    def local(self, status: int, flag: str, detail: str = "") -> None:
        """An error answer; the connection closes after it unless the request was read whole."""
        self.flag = flag
        self.status = status
        self.session.log_local(self, status, flag, detail)
        # A request whose body is still arriving closes the connection
        # rather than having the proxy read an unbounded body to throw away.
        self._local_write(status, _STATUS_REASONS.get(status, "error").encode() + b"\n", b"text/plain", (),
                          close=not self.req_ended and self.req.framing != BODY_NONE)

    def _local_write(self, status: int, body: bytes, content_type, extra, close: bool) -> None:
        session = self.session
        req = self.req
        self.deadline = 0.0
        close = close or not req.keep_alive or session.draining
        self.close_after = close
        headers = list(extra)
        if body and content_type:
            headers.append((b"content-type", content_type))
        if self.route is not None and self.route.response_add:
            headers.extend(self.route.response_add)
        session.write(local_response(status, body if req.method != b"HEAD" else b"", headers, close=close))
        self.resp_started = True
        self.resp_done = True
        if close:
            session.closing = True
        if self.req_ended or close:
            session.exchange_done(self)

    # --- teardown

    def abort(self) -> None:
        """The downstream went away: release everything, reuse nothing."""
        self.finished = True
        self.drop_upstream()
        if not self.resp_done and self.flag == "-":
            self.flag = FLAG_DOWNSTREAM_CLOSED

    def drop_upstream(self) -> None:
        self.deadline = 0.0
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.conn
        self._release(False)
        if conn is not None:
            conn.abort()


class Session(asyncio.Protocol):
    """The downstream side of an HTTP/1 connection (see the module docstring)."""

    __slots__ = ("relay", "rt", "loop", "transport", "parser", "current", "active", "queue", "blocks",
                 "closing", "done", "lost", "eof_seen", "peer_ip", "head_timer", "held_rest", "requests",
                 "in_head", "refusal", "linger", "timer", "write_paused", "last_seen", "cork", "feeding", "holding",
                 "draining")

    def __init__(self, relay: Relay, rt: HttpRuntime) -> None:
        self.relay = relay
        self.rt = rt
        self.loop = rt.loop
        self.transport: asyncio.Transport = relay.down.transport
        self.parser = make_parser(rt.codec, "request", self, rt.limits)
        self.current: Exchange | None = None   # receiving the parser's events
        self.active: Exchange | None = None    # the oldest unanswered exchange
        self.queue: deque[Exchange] = deque()  # pipelined behind ``active``
        self.blocks = 0
        self.closing = False                   # no new request will be accepted
        self.done = False                      # input is dropped: the connection is closing
        self.lost = False
        self.eof_seen = False
        self.refusal: tuple | None = None      # a refusal waiting for earlier pipelined answers
        self.linger: asyncio.TimerHandle | None = None
        self.timer: asyncio.TimerHandle | None = None  # the response-head deadline check (watch_deadline)
        self.write_paused = False              # the downstream write buffer is over its high mark
        self.last_seen = False                 # a request without keep-alive arrived: it is the last
        self.cork: list | None = None          # downstream writes held until a read is parsed
        self.feeding = False                   # a downstream read is being parsed (see Exchange.up_write)
        self.holding: list[Exchange] = []      # exchanges with upstream writes held for that read
        self.draining = False                  # the proxy is stopping: every response closes
        peer = relay.peer_addr
        self.peer_ip = peer[0].encode() if peer else b""
        self.head_timer: asyncio.TimerHandle | None = None
        self.held_rest: bytes | None = None    # bytes after an Upgrade/CONNECT request
        self.requests = 0
        self.in_head = False                   # bytes of a request head arrived, the head is not complete

    def start(self, early: list[bytes] | None) -> None:
        self.transport.set_protocol(self)
        if early:
            self.data_received(b"".join(early))
        if not self.lost and not self.blocks:
            self.transport.resume_reading()

    # --- downstream transport events

    def data_received(self, data: bytes) -> None:
        self.relay.down.nbytes += len(data)
        if self.done:
            return  # closing: input is read and dropped (see _close)
        if self.current is None and not self.in_head:
            self.in_head = True
        self.feeding = True
        try:
            rest = self.parser.feed(data)
        except HttpError as exc:
            self.feeding = False
            broken = self.current
            for ex in self.holding:
                if ex is broken:
                    ex.held = None  # nothing of the refused request in this read goes upstream
                else:
                    ex.flush_held()  # earlier requests of the read were whole and valid
            self.holding.clear()
            self._refuse(exc.status, exc.flag, exc.detail)
            return
        self.feeding = False
        if self.holding:
            for ex in self.holding:
                ex.flush_held()
            self.holding.clear()
        if rest is not None:
            self.held_rest = rest
            self.block(_BLOCK_UPGRADE)
        if self.in_head and self.head_timer is None and not self.closing:
            # Part of a head is here and the rest is not: the slowloris clock starts.
            self.head_timer = self.loop.call_later(self.rt.header_timeout, self._head_timed_out)

    def eof_received(self) -> bool:
        self.eof_seen = True
        if self.done:
            self._close()
            return False
        self.closing = True
        if self.current is not None or self.in_head:
            # A request was cut short: whatever it started is abandoned.
            self.parser.feed_eof()
            ex, self.current = self.current, None
            if ex is not None:
                if ex is self.active:
                    ex.abort()
                    self._count(ex)
                    self.active = None
                else:
                    try:
                        self.queue.remove(ex)
                    except ValueError:
                        pass
        if self.active is None and not self.queue:
            self._close()
            return False
        return True  # answer what was asked, then close

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        for timer in (self.head_timer, self.linger, self.timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.linger = self.timer = None
        for ex in ([self.active] if self.active else []) + list(self.queue):
            ex.abort()
            if ex.flag == FLAG_DOWNSTREAM_CLOSED:
                self._count(ex)
        self.active = None
        self.queue.clear()
        self.relay.http_lost(exc)

    def watch_deadline(self, deadline: float) -> None:
        """One timer per connection, re-armed lazily: a request costs a clock read, not a timer.

        Only the active exchange waits for a response head, so the timer
        checks that one when it fires and re-arms for its deadline if that
        moved on (a later request on a keep-alive connection).
        """
        timer = self.timer
        if timer is not None:
            if timer.when() <= deadline:
                return
            timer.cancel()
        self.timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self.timer = None
        ex = self.active
        if ex is None or not ex.deadline:
            return
        if self.loop.time() >= ex.deadline:
            ex._timed_out()
        else:
            self.timer = self.loop.call_at(ex.deadline, self._check_deadline)

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.conn is not None and not ex.upstream_paused:
            ex.upstream_paused = True
            ex.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.conn is not None and ex.upstream_paused:
            ex.upstream_paused = False
            ex.conn.transport.resume_reading()

    # --- the request parser's sink

    def on_head(self, req: Request) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.in_head = False
        ex = self.current = Exchange(self, req)
        if self.closing or self.last_seen:
            ex.finished = True  # after a "Connection: close" request, or draining: read and dropped
            return
        if not req.keep_alive:
            self.last_seen = True  # its response closes the connection
        if self.active is None:
            self.active = ex
            ex.dispatch()
        else:
            self.queue.append(ex)
            self.block(_BLOCK_WAITING)

    def on_data(self, data: bytes) -> None:
        self.current.request_data(data)

    def on_end(self, trailers) -> None:
        ex = self.current
        self.current = None
        ex.request_end(trailers)

    # --- flow control of downstream reading

    def block(self, reason: int) -> None:
        if not self.blocks and not self.lost:
            self.transport.pause_reading()
        self.blocks |= reason

    def unblock(self, reason: int) -> None:
        if self.blocks & reason:
            self.blocks &= ~reason
            if not self.blocks and not self.lost:
                self.transport.resume_reading()

    # --- writing downstream

    def write(self, data: bytes) -> None:
        cork = self.cork
        if cork is not None:
            cork.append(data)
        elif not self.lost:
            self.transport.write(data)

    def uncork(self, corked: list) -> None:
        self.cork = None
        if corked and not self.lost:
            if len(corked) == 1:
                self.transport.write(corked[0])
            else:
                self.transport.writelines(corked)

    def upstream_headers(self, ex: Exchange) -> list:
        """The request's fields as forwarded: hop-by-hop gone, proxy fields added, route rewrites applied."""
        rt = self.rt
        req = ex.req
        route = ex.route
        drop = rt.request_drop(route)
        connection = req.header(b"connection")
        if connection is not None and connection not in _PLAIN_CONNECTION:
            drop = drop | {t.strip().lower() for t in connection.split(b",")}
        fields = [field for field in req.headers if field[0] not in drop]
        xff = xfp = rid = False
        host_rewrite = route.host_rewrite if route is not None else None
        if host_rewrite is not None or not _PROXY_FIELDS.isdisjoint([field[0] for field in fields]):
            # The rare path: fields the proxy edits are present.
            for i, (name, value) in enumerate(fields):
                if name == b"x-forwarded-for":
                    if rt.add_xff:
                        fields[i] = (name, value + b", " + self.peer_ip)
                    xff = True
                elif name == b"host":
                    if host_rewrite is not None:
                        fields[i] = (name, host_rewrite)
                elif name == b"x-forwarded-proto":
                    xfp = True
                elif name == b"x-request-id":
                    rid = True
        if req.upgrade is not None:
            fields.append(_UPGRADE_FIELD)
            fields.append((b"upgrade", req.upgrade))
        if req.framing == BODY_CHUNKED:
            fields.append(_CHUNKED_FIELD)
        if rt.add_xff and not xff:
            fields.append((b"x-forwarded-for", self.peer_ip))
        if rt.add_xfp and not xfp:
            fields.append(_XFP_HTTP)
        if rt.add_request_id and not rid:
            fields.append((b"x-request-id", rt.request_ids.next()))
        if route is not None:
            if route.request_set:
                fields.extend(route.request_set)
            if route.request_add:
                fields.extend(route.request_add)
        return fields

    # --- the end of an exchange

    def exchange_done(self, ex: Exchange) -> None:
        if ex.finished:
            return
        ex.finished = True
        ex.deadline = 0.0
        self._count(ex)
        if ex is not self.active:
            return
        self.active = None
        if ex.close_after or (self.closing and not self.queue and self.refusal is None):
            self.closing = True
            self._close()
            return
        rest = self.held_rest
        if rest is not None:
            # An Upgrade the upstream declined: the bytes after it are HTTP again.
            self.held_rest = None
            self.parser = make_parser(self.rt.codec, "request", self, self.rt.limits)
            self.unblock(_BLOCK_UPGRADE)
            if rest:
                self.data_received(rest)
        if self.queue:
            nxt = self.active = self.queue.popleft()
            if not self.queue:
                self.unblock(_BLOCK_WAITING)
            nxt.dispatch()
        elif self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            self._answer_refusal(*refusal)
        elif self.closing:
            self._close()

    def _count(self, ex: Exchange) -> None:
        self.requests += 1
        key = (ex.status // 100, ex.flag)
        counts = self.rt.state.http_requests
        counts[key] = counts.get(key, 0) + 1

    def tunnel(self, ex: Exchange, upstream_rest: bytes) -> None:
        """101 or a 2xx to CONNECT: both connections become a byte relay."""
        conn = ex.conn
        ex.conn = None
        ex.deadline = 0.0
        ex.resp_done = True
        ex.finished = True
        self._count(ex)
        ex.pool.active -= 1
        conn.owner = None
        conn._release_sock()
        self.active = None
        self.closing = True
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        held, self.held_rest = self.held_rest, None
        self.relay.become_tunnel(conn.transport, held or b"", upstream_rest)

    # --- refusals and closing

    def _refuse(self, status: int, flag: str, detail: str) -> None:
        """The client sent what we will not forward: answer (in order) and close."""
        self.closing = True
        self.done = True
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        ex, self.current = self.current, None
        if ex is not None:
            if ex is self.active:
                # Its body broke while streaming: the upstream has a partial
                # request, so that connection must never be reused.
                ex.drop_upstream()
                if ex.resp_started:
                    self.log_local(ex, status, flag, detail)
                    self.reset()
                else:
                    ex.local(status, flag, detail)
                return
            try:
                self.queue.remove(ex)
            except ValueError:
                pass
        if self.active is not None:
            # Earlier pipelined requests are answered first.
            self.refusal = (status, flag, detail)
            return
        self._answer_refusal(status, flag, detail)

    def _answer_refusal(self, status: int, flag: str, detail: str) -> None:
        ex = Exchange(self, _REFUSED)
        ex.req_ended = True
        self.active = ex
        ex.local(status, flag, detail)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.in_head and not self.lost:
            self.in_head = False
            self._refuse(408, FLAG_REQUEST_HEADER_TIMEOUT, f"request head incomplete after {self.rt.header_timeout}s")

    def drain(self) -> None:
        """Stop taking requests: an idle connection closes now, a busy one after its response."""
        self.closing = True
        self.draining = True
        if self.active is None and not self.in_head:
            self._close()

    def _close(self) -> None:
        """Close after what was written; a client that may still be sending gets a lingering close.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the response the client has not read yet (a 400
        for a request whose body is still arriving). So: FIN our side, read
        and drop what still comes, close when the client does or after
        LINGER seconds.
        """
        self.done = True
        transport = self.transport
        if self.lost or transport.is_closing():
            return
        if self.eof_seen:
            transport.close()
            return
        self.blocks = 0
        transport.resume_reading()
        transport.write_eof()
        self.linger = self.loop.call_later(LINGER, transport.close)

    def reset(self) -> None:
        if not self.lost:
            from ...transport.relay import abort_with_rst
            abort_with_rst(self.transport)

    def log_local(self, ex: Exchange | None, status: int, flag: str, detail: str) -> None:
        rt = self.rt
        held = rt.log_throttle.allow(f"{rt.name}/{flag}")
        if held is None:
            return
        req = ex.req if ex is not None else None
        log.log(logging.WARNING if flag[0] == "U" else logging.INFO, "local response", extra={"fields": {
            "listener": rt.name, "status": status, "flags": flag, "detail": detail,
            "method": req.method.decode("latin-1") if req is not None else "-",
            "path": req.path[:256].decode("latin-1") if req is not None else "-",
            "authority": (req.authority or b"").decode("latin-1") if req is not None else "-",
            "cluster": ex.cluster if ex is not None else "", "upstream": format_addr(ex.upstream_addr)
            if ex is not None and ex.upstream_addr else "",
            "downstream": format_addr(self.relay.peer_addr), "similar_not_logged": held}})

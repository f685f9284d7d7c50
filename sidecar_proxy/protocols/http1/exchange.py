"""One request and its response through the proxy: route, upstream connection, both bodies.

An :class:`Exchange` is made by the :mod:`.session` for each request head
the parser delivers. It chooses the route and the upstream, takes a pooled
connection (or connects), writes the request (head, body, trailers) as it
arrives, and is the response parser's sink: it rewrites the response head
for the client, streams the body, and gives the connection back only when
both messages ended cleanly. What it answers itself (errors, direct
responses, redirects) carries a response flag (see ``..events``).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from ...addr import format_addr
from ...policies.rate_limit import rate_limit_headers
from ...transport.relay import connect_failure_reason
from ...tls.reasons import HandshakeFailed
from ...transport.original_dst import is_own_listener
from ..events import (BODY_CHUNKED, BODY_LENGTH, BODY_NONE, BODY_TUNNEL, BODY_UNTIL_CLOSE, FLAG_ACCESS_DENIED,
                      FLAG_DIRECT_RESPONSE,
                      FLAG_DOWNSTREAM_CLOSED, FLAG_DOWNSTREAM_PROTOCOL_ERROR, FLAG_LOOP, FLAG_NO_ROUTE,
                      FLAG_RATE_LIMITED, FLAG_RETRY_LIMIT, FLAG_UPSTREAM_CONNECT_FAILURE, FLAG_UPSTREAM_OVERFLOW,
                      FLAG_UPSTREAM_PROTOCOL_ERROR, FLAG_UPSTREAM_TERMINATED, FLAG_UPSTREAM_TIMEOUT, HttpError, Request,
                      Response)
from . import BLOCK_UPSTREAM_FULL, BLOCK_WAITING, make_parser
from .retries import Retries, RetryState
from .serialize import (CHUNKED_LINE, PLAIN_CONNECTION, UPGRADE_LINE, InvalidHeader, chunk, field_line,
                        forward_response_head, last_chunk, local_response, received_block, without)

if TYPE_CHECKING:
    from ..events import Parser
    from .session import Session
    from ...routing.table import CompiledRoute
    from ...upstream.cluster import Upstream
    from ...upstream.pool import Pool, UpstreamConn

log = logging.getLogger("sidecar_proxy.http")

# Field lines the proxy adds, checked once here (more in serialize).
_CLOSE_LINE = field_line(b"connection", b"close")
_KEEP_ALIVE_LINE = field_line(b"connection", b"keep-alive")

# What a route's rate limit keys its buckets by (HttpRuntime.rate_limits).
RL_ROUTE, RL_CLIENT_IP, RL_HEADER, RL_PEER = 0, 1, 2, 3

# RFC 9110 9.2.1: a bodiless request with one of these may be sent again.
_SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))

# A response the route retries is read to its end so its connection can be
# reused, unless its body is longer than this: then the connection is closed.
DISCARD_LIMIT = 64 << 10


# How the response body is written downstream.
_OUT_NONE = 0      # no body
_OUT_RAW = 1       # as received (Content-Length, or close-delimited to an HTTP/1.0 client)
_OUT_CHUNKED = 2   # re-chunked (chunked or close-delimited upstream, HTTP/1.1 client)

_STATUS_REASONS = {400: "bad request", 404: "no route", 408: "request header timeout", 414: "URI too long",
                   508: "loop detected", 429: "rate limited", 403: "forbidden",
                   431: "request header fields too large", 501: "not implemented", 502: "bad gateway",
                   503: "upstream unavailable", 504: "upstream timeout"}


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

    def next_line(self) -> bytes:
        """``x-request-id: <id>`` CRLF; hex digits and dashes only, so no check is needed."""
        self.counter = c = (self.counter + 1) & 0xFFFFFFFFFFFF
        return b"x-request-id: %s%012x\r\n" % (self.prefix, c)


class Exchange(Retries):
    """One request and its response."""

    __slots__ = ("session", "req", "route", "cluster", "pool", "conn", "rparser", "pending", "req_ended",
                 "trailers", "head_sent", "req_sent", "resp_started", "resp_done", "out", "reuse",
                 "close_after", "deadline", "status", "flag", "upstream_addr",
                 "connect_task", "finished", "upstream_paused", "held", "cluster_config", "reused",
                 "answered", "resent", "head_bytes", "up", "rs", "opening", "began", "sent_at", "head_at", "rx",
                 "tx", "trace", "span", "rid")
    # Typed C fields when compiled (compiled.pxd_text): reached without a lookup.
    session: Session
    req: Request
    route: CompiledRoute | None
    up: Upstream | None
    pool: Pool | None
    conn: UpstreamConn | None
    rparser: Parser | None

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
        self.status = 0
        self.flag = "-"
        self.upstream_addr: tuple[str, int] | None = None
        self.connect_task: asyncio.Task | None = None
        self.finished = False
        self.upstream_paused = False
        self.held: list[bytes] | None = None      # upstream writes of the read being parsed
        self.cluster_config = None
        self.reused = False                       # sent on a pooled connection
        self.answered = False                     # a byte came back from the upstream
        self.resent = False                       # sent again after a reused connection closed (_resend)
        self.head_bytes: bytes | None = None      # the serialized head, kept for a resend or a retry
        self.up: Upstream | None = None           # holds one of the cluster's "requests" breaker slots until settle()
        self.rs: RetryState | None = None         # when the route has a retry policy (see retries.py)
        # Telemetry: perf_counter() at the head (0.0 when no histogram or access log wants times), when
        # the last try's head went upstream and its response head came back; body bytes each way; the
        # trace (tracing on) and the current try's CLIENT span; a generated x-request-id line.
        self.began = time.perf_counter() if session.rt.timing else 0.0
        self.sent_at = self.head_at = 0.0
        self.rx = self.tx = 0
        self.trace = self.span = None
        self.rid: bytes | None = None
        self.opening = False                      # _open took breaker slots that _connect has not taken over yet

    # --- request side (called by the session as the parser delivers)

    def request_data(self, data: bytes) -> None:
        if self.resp_done or self.finished or self.flag == FLAG_DIRECT_RESPONSE:
            return  # answered already: the rest of the body is read and dropped
        self.rx += len(data)
        if self.rs is not None:
            self.rs.keep(data)
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
        if self.resp_started:
            return
        session = self.session
        if self.rs is None:
            timeout = self.route.timeout if self.route is not None else session.rt.default_timeout
            if not timeout:
                return
            deadline = session.loop.time() + timeout
        else:
            # The per-try timeout within the route's, which runs from the first try's request end over
            # every try (inlined: once per request with a retry policy).
            rs = self.rs
            now = session.loop.time()
            deadline = rs.total_deadline
            if not deadline and self.route.timeout:
                deadline = rs.total_deadline = now + self.route.timeout
            per_try = rs.policy.per_try_timeout
            if per_try and (not deadline or now + per_try < deadline):
                deadline = now + per_try
            if not deadline:
                return
        self.deadline = deadline
        timer = session.timer
        if timer is None or timer.when() > deadline:
            session.watch_deadline(deadline)

    # --- routing and the upstream connection

    def dispatch(self) -> None:
        session = self.session
        rt = session.rt
        req = self.req
        tracing = rt.tracing
        if tracing is not None:
            trace = self.trace = tracing.begin(req.headers)
            if trace is not None and trace.sampled:
                trace.request(req.method, req.path, req.authority, req.version, "http", req.header(b"user-agent"),
                              session.peer_ip.decode(), session.relay.peer_id)
        route = rt.table.match(req, session.relay.peer_id)
        if route is None:
            if session.relay.orig_dst is None:
                self.local(404, FLAG_NO_ROUTE)
                return
            up = rt.passthrough
        else:
            self.route = route
            allow = route.allow
            if allow is not None:
                peer = session.relay.peer_id
                if peer is None or not allow.matches(peer):
                    self.local(403, FLAG_ACCESS_DENIED, f"identity {peer or 'none (no mTLS)'} is not allowed "
                                                        f"by route {route.name}")
                    return
            if rt.rate_limits:
                limit = rt.rate_limits.get(route)
                if limit is not None:
                    # (limiter, key kind, header, quota, window); see HttpRuntime.
                    kind = limit[1]
                    key = (None if kind == RL_ROUTE else session.peer_ip if kind == RL_CLIENT_IP
                           else req.header(limit[2]) if kind == RL_HEADER else session.relay.peer_id)
                    wait = limit[0].allow(key)
                    if wait:
                        self._rate_limited(limit, key, wait)
                        return
            kind = route.kind
            if kind != "cluster":
                if kind == "direct_response":
                    self.direct(route.direct_status, route.direct_body, route.direct_content_type)
                else:
                    self.direct(route.redirect_status, b"", None,
                                ((b"location", route.redirect_location(req, b"http")),))
                return
            up = rt.upstreams[route.pick_cluster()]
        self.cluster = up.name
        self.cluster_config = cluster = up.cluster
        state = up.state
        # breakers.try_acquire("requests"), inlined: once per request.
        breakers = state.breakers
        active = breakers.active
        n = active["requests"]
        if n >= breakers.limits["requests"]:
            breakers.overflow["requests"] += 1
            self.local(503, FLAG_UPSTREAM_OVERFLOW, f"circuit breaker: cluster {up.name} is at max_requests")
            return
        active["requests"] = n + 1
        self.up = up  # the slot is released by settle()
        if route is not None and route.retry is not None:
            # self.pending: body read while this request waited behind another.
            self.rs = RetryState(route.retry, req.framing != BODY_NONE, self.pending)
        if cluster.original_destination:
            target = session.relay.orig_dst
            if target is None:
                self.local(503, FLAG_UPSTREAM_CONNECT_FAILURE, "no original destination")
                return
        else:
            det = state.detector
            # Upstream.pick without the call when nothing is ejected.
            target = up.next() if det is None or not det.ejected_now else up.pick()
        self._send_to(target)

    def _send_to(self, target: tuple[str, int]) -> None:
        """Start a try on ``target``: on a pooled connection, or on a new one when the breakers allow."""
        session = self.session
        rt = session.rt
        if is_own_listener(target, rt.own_ports):
            self.local(508, FLAG_LOOP, "the destination is this proxy's own listener")
            return
        self.upstream_addr = target
        up = self.up
        up.state.attempts += 1
        pool = self.pool = rt.pool_for(up.cluster, target)
        conn = pool.take()
        if conn is not None:
            self.reused = True
            self.attach(conn)
        else:
            self._open()

    def _open(self) -> None:
        """Connect to ``upstream_addr`` when the cluster's breakers have room, else 503 UO at once."""
        up = self.up
        breakers = up.state.breakers
        if not breakers.try_acquire("pending"):
            self.local(503, FLAG_UPSTREAM_OVERFLOW, f"circuit breaker: cluster {up.name} is at max_pending_requests")
            return
        if not breakers.try_acquire("connections"):
            breakers.release("pending")
            self.local(503, FLAG_UPSTREAM_OVERFLOW, f"circuit breaker: cluster {up.name} is at max_connections")
            return
        session = self.session
        session.block(BLOCK_WAITING)
        self.opening = True
        self.connect_task = session.loop.create_task(self._connect(self.pool, up, self.upstream_addr, breakers))

    def _rate_limited(self, limit: tuple, key: bytes | None, wait: float) -> None:
        """The route's local rate limit refused the request: 429 with Retry-After and RateLimit-*."""
        limiter, _, _, quota, window = limit
        decision = limiter.refusal(key, wait)
        self.flag = FLAG_RATE_LIMITED
        self.status = 429
        self._local_write(429, b"rate limited\n", b"text/plain", rate_limit_headers(decision, quota, window),
                          close=not self.req_ended and self.req.framing != BODY_NONE)

    async def _connect(self, pool: Pool, up: Upstream, target: tuple[str, int], breakers) -> None:
        """Holds a "pending" and a "connections" breaker slot (taken by _send_to): the first until the
        connect ends, the second for the connection's life (UpstreamConn.connection_lost).

        A cluster with tls.mode mutual connects with mTLS: a failed handshake is a connect failure
        (reason "tls"; the TLS reason is counted per cluster and named in the log).
        """
        self.opening = False  # from here on, this coroutine releases the slots
        session = self.session
        rt = session.rt
        cluster = up.cluster
        began = time.perf_counter()
        conn = pool.new_conn()
        conn.breakers = breakers
        try:
            if up.tls_expected is not None:
                await rt.mesh.connect(session.loop, target[0], target[1], conn, up.tls_expected, opaque=False,
                                      connect_timeout=cluster.connect_timeout, sni=up.tls_sni)
                up.state.tls["ok"] = up.state.tls.get("ok", 0) + 1
            else:
                async with asyncio.timeout(cluster.connect_timeout):
                    await session.loop.create_connection(lambda: conn, target[0], target[1])
        except asyncio.CancelledError:
            breakers.release("pending")
            pool.active -= 1
            conn.abort()
            raise
        except (OSError, TimeoutError, HandshakeFailed) as exc:
            breakers.release("pending")
            pool.active -= 1
            conn.abort()
            self.connect_task = None
            if isinstance(exc, HandshakeFailed):
                reason = "tls"
                up.state.tls[exc.reason] = up.state.tls.get(exc.reason, 0) + 1
                detail = f"mTLS to {format_addr(target)}: {exc.reason} ({exc.detail})"
            else:
                reason = connect_failure_reason(exc)
                detail = f"connect to {format_addr(target)}: {reason}"
            rt.connect_failures(cluster.name, reason)
            if self.finished:
                return
            self._record(None, True)
            if self._retry("connect-failure", ("connect-failure",)):
                return
            if not session.queue:
                session.unblock(BLOCK_WAITING)  # the connection stays usable after the 503
            self.local(503, FLAG_UPSTREAM_CONNECT_FAILURE, detail)
            return
        breakers.release("pending")
        self.connect_task = None
        rt.connect_seconds(cluster.name).observe(time.perf_counter() - began)
        if self.finished or session.lost:
            pool.drop(conn)
            return
        limit = rt.buffer_limit
        conn.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        if not session.queue:
            # Pipelined requests behind this one keep reading paused (see Session.on_head).
            session.unblock(BLOCK_WAITING)
        self.attach(conn)

    def attach(self, conn: UpstreamConn) -> None:
        session = self.session
        req = self.req
        try:
            head = self.head_bytes
            if head is None:
                head = self.head_bytes = session.upstream_head(self)
        except InvalidHeader as exc:
            # A codec gap let through a field we will not write; the connection saw nothing.
            self.pool.give_back(conn)
            self.local(400, FLAG_DOWNSTREAM_PROTOCOL_ERROR, f"request field refused at serialisation: {exc}")
            return
        trace = self.trace
        if trace is not None:
            if trace.sampled:
                # This try's CLIENT span (a retry is a sibling): its context goes upstream.
                target = self.upstream_addr
                self.span, lines = trace.client_attempt(self.cluster, target[0], target[1],
                                                        len(self.rs.tried) if self.rs is not None else 0)
            else:
                lines = trace.lines  # a fresh unsampled context, the same for every try
            head = head[:-2] + lines + b"\r\n"
        if self.began:
            self.sent_at = time.perf_counter()
        self.conn = conn
        conn.owner = self
        parser = conn.parser
        if parser is None:
            parser = conn.parser = make_parser(session.rt.codec, "response", self, session.rt.limits)
        else:
            parser.set_sink(self)
        self.rparser = parser
        parser.expect(req.method)
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
        elif self.rs is not None and self.rs.discarding and not self.reuse:
            # A retried response not worth reading to its end: its connection goes, the retry starts.
            self._release(False)
            self._retry_start()

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
        self.session.unblock(BLOCK_UPSTREAM_FULL)
        if reuse:
            self.pool.give_back(conn)
        else:
            self.pool.drop(conn)

    def _complete(self) -> None:
        """The response ended; called after the parser returned, so no byte of it is left unparsed."""
        self._release(self.reuse and self.req_sent)
        if self.rs is not None and self.rs.discarding:
            self._retry_start()
            return
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
        self.session.rt.state.http_resends += 1
        self._open()

    # --- retries (retries.Retries drives them; these are the exchange's parts)

    def _reset_try(self, pending: list[bytes] | None) -> None:
        """Forget the failed try (its connection is released) and wait, downstream reading paused."""
        self.head_sent = self.req_sent = self.resp_done = False
        self.reused = self.answered = self.resent = self.reuse = False
        self.deadline = 0.0
        self.out = _OUT_NONE
        self.rparser = None
        self.held = None  # nothing written for the failed try may reach the next one
        self.pending = pending
        self.session.block(BLOCK_WAITING)

    def _resume_try(self, target: tuple[str, int]) -> None:
        if not self.session.queue:
            self.session.unblock(BLOCK_WAITING)  # _send_to blocks again if it has to connect
        self._send_to(target)

    def settle(self) -> None:
        """The exchange is over: give the cluster back what it held (once)."""
        up = self.up
        if up is None:
            return
        self.up = None
        breakers = up.state.breakers
        active = breakers.active
        n = active["requests"]  # breakers.release("requests"), inlined: once per request
        if n > 0:
            active["requests"] = n - 1
        else:
            breakers.release_errors += 1
        rs = self.rs
        if rs is not None and (rs.slot or rs.timer is not None):
            self._retry_settle(breakers)

    def upstream_pause_writing(self) -> None:
        self.session.block(BLOCK_UPSTREAM_FULL)

    def upstream_resume_writing(self) -> None:
        self.session.unblock(BLOCK_UPSTREAM_FULL)

    def upstream_failed(self, status: int, flag: str, detail: str) -> None:
        if self.span is not None:
            self.trace.end_attempt(self.span, 0, flag)
            self.span = None
        if flag == FLAG_UPSTREAM_TERMINATED and self._resendable():
            self._resend()
            return
        self._release(False)
        if self.finished:
            return
        if self.rs is not None and self.rs.discarding:
            # The retried response broke off: the retry goes ahead all the same.
            self._retry_start()
            return
        if not self.resp_started and not self.resp_done:
            self._record(status)
            if flag == FLAG_UPSTREAM_TERMINATED and self._retry(
                    "reset", ("reset",) if self.answered else ("reset", "refused-stream")):
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
        rs = self.rs
        if self.resp_started or self.finished or (rs is not None and rs.discarding):
            return
        total = rs.total_deadline if rs is not None else 0.0
        if rs is None or total and self.session.loop.time() >= total:
            self.upstream_failed(504, FLAG_UPSTREAM_TIMEOUT, "no response head within the route timeout")
            return
        # A per-try timeout: that try is abandoned, and may be tried again.
        if self.span is not None:
            self.trace.end_attempt(self.span, 0, FLAG_UPSTREAM_TIMEOUT)
            self.span = None
        self._release(False)
        self._record(504)
        if self._retry("per-try-timeout", ("reset",), 504):
            return
        self.local(504, FLAG_UPSTREAM_TIMEOUT, "no response head within the per-try timeout")

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
                block, added = self._response_parts(resp)
                session.write(forward_response_head(status, resp.reason, block, added))
                if self.rs is not None:
                    self.rs.interim = True
            return
        self.deadline = 0.0
        framing = resp.framing
        if self.began:
            self.head_at = time.perf_counter()
        if self.span is not None:
            self.trace.end_attempt(self.span, status)
            self.span = None
        up = self.up
        if up is not None:
            det = up.state.detector
            # A success changes nothing while no endpoint is in a failure run: no call then.
            if det is not None and (status >= 500 or det.failing):
                det.record(self.upstream_addr, status)
        rs = self.rs
        if rs is not None:
            if status in rs.policy.retry_statuses and self._retry_check("status", resp.header(b"retry-after")):
                # Not for the client: read to its end (or close), then the next try.
                rs.discarding = True
                self.out = _OUT_NONE
                self.reuse = resp.keep_alive and (framing == BODY_NONE or framing == BODY_CHUNKED or (
                    framing == BODY_LENGTH and resp.length <= DISCARD_LIMIT))
                return
            if rs.limited:
                self.flag = FLAG_RETRY_LIMIT
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
        block, added = self._response_parts(resp, keep_upgrade)
        if out == _OUT_CHUNKED:
            added += CHUNKED_LINE
        elif resp.framing == BODY_NONE and resp.status != 304 and resp.header(b"transfer-encoding") is not None \
                and req.version == b"1.1":
            added += CHUNKED_LINE  # HEAD: say how the body would have come
        if keep_upgrade:
            pass
        elif not req.keep_alive or session.draining or self.close_after:
            self.close_after = True
            added += _CLOSE_LINE
        elif req.version == b"1.0":
            added += _KEEP_ALIVE_LINE
        try:
            head = forward_response_head(resp.status, resp.reason, block, added)
        except InvalidHeader as exc:
            raise HttpError(502, f"response field refused at serialisation: {exc}",
                            FLAG_UPSTREAM_PROTOCOL_ERROR) from None
        self.resp_started = True
        session.write(head)

    def _response_parts(self, resp: Response, keep_upgrade: bool = False) -> tuple[bytes, bytes]:
        """The received field lines to forward (minus hop-by-hop and the route's removals) and the
        checked lines to add after them."""
        edits = self.session.rt.edits[self.route]
        drop = edits.response_drop
        connection = resp.header(b"connection") if not keep_upgrade else None
        if connection is not None and connection not in PLAIN_CONNECTION:
            drop = drop | {t.strip().lower() for t in connection.split(b",")}
        block = received_block(resp)
        headers = resp.headers
        if not drop.isdisjoint([field[0] for field in headers]):
            block = without(block, headers, drop)
        added = edits.response_lines
        if keep_upgrade:
            upgrade = resp.header(b"upgrade")
            added = UPGRADE_LINE + (field_line(b"upgrade", upgrade) if upgrade is not None else b"") + added
        return block, added

    def on_data(self, data: bytes) -> None:
        out = self.out
        if out == _OUT_NONE:
            rs = self.rs
            if rs is not None and rs.discarding:
                rs.discarded += len(data)
                if rs.discarded > DISCARD_LIMIT:
                    self.reuse = False  # upstream_data closes the connection when this read is parsed
            return
        self.tx += len(data)
        if out == _OUT_CHUNKED:
            data = chunk(data)
        cork = self.session.cork
        if cork is not None:
            cork.append(data)  # Session.write, inlined: this runs for every body chunk
        else:
            self.session.write(data)

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
        if self.rs is not None and self.rs.limited:
            flag = f"{flag},{FLAG_RETRY_LIMIT}"
            detail = f"{detail} (after {len(self.rs.tried) + 1} tries)"
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
        if req.method != b"HEAD":
            self.tx = len(body)
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
        self.settle()
        if not self.resp_done and self.flag == "-":
            self.flag = FLAG_DOWNSTREAM_CLOSED

    def drop_upstream(self) -> None:
        self.deadline = 0.0
        rs = self.rs
        if rs is not None and rs.timer is not None:
            rs.timer.cancel()
            rs.timer = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
            if self.opening:
                # Cancelled before it ran: a coroutine that never started has no except clause to run.
                self.opening = False
                breakers = self.up.state.breakers
                breakers.release("pending")
                breakers.release("connections")
        conn = self.conn
        self._release(False)
        if conn is not None:
            conn.abort()

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
import time
from collections import deque
from typing import TYPE_CHECKING

from ...addr import format_addr
from ...transport.relay import abort_with_rst
from ..events import BODY_CHUNKED, FLAG_DOWNSTREAM_CLOSED, FLAG_REQUEST_HEADER_TIMEOUT, HttpError, Request, Sink
from . import BLOCK_UPGRADE, BLOCK_WAITING, REFUSED, make_parser
# Only the type from exchange: compiled, this module's code can run before exchange's (see BLOCK_* in
# __init__), and by then the type is defined but exchange's module-level names are not.
from .exchange import Exchange
from .serialize import (CHUNKED_LINE, PLAIN_CONNECTION, PROXY_FIELDS, UPGRADE_LINE, XFP_LINE, field_line,
                        forward_request_head, received_block)

if TYPE_CHECKING:
    from .runtime import HttpRuntime
    from ..events import Parser
    from ...transport.relay import Relay

log = logging.getLogger("sidecar_proxy.http")

# Seconds a closing connection keeps reading (and dropping) what the client
# still sends, so the kernel does not reset away our last response.
LINGER = 2.0


class Session(Sink):
    """The downstream side of an HTTP/1 connection (see the module docstring).

    An asyncio protocol without the ``asyncio.Protocol`` base, so that it can
    be compiled as an extension type (``compiled.EXTENSION_TYPES``); it has
    every protocol method itself.
    """

    __slots__ = ("relay", "rt", "loop", "transport", "parser", "current", "active", "queue", "blocks",
                 "closing", "done", "lost", "eof_seen", "peer_ip", "head_timer", "held_rest", "requests",
                 "in_head", "refusal", "linger", "timer", "write_paused", "xff_line", "last_seen", "cork", "feeding", "holding",
                 "draining", "peer_text")
    # Typed C fields when compiled (compiled.pxd_text): reached without a lookup.
    rt: HttpRuntime
    relay: Relay
    parser: Parser
    current: Exchange | None
    active: Exchange | None

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
        self.peer_text: str | None = None
        peer = relay.peer_addr
        self.peer_ip = peer[0].encode() if peer else b""
        self.xff_line = field_line(b"x-forwarded-for", self.peer_ip)
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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # set_protocol() hands over a connected transport (start)

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
            self.block(BLOCK_UPGRADE)
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
            self.block(BLOCK_WAITING)

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
            # One write: uvloop sends it at once, where writelines would queue
            # the buffers for the end of the loop iteration.
            self.transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def upstream_head(self, ex: Exchange) -> bytes:
        """The request head as forwarded: the received field lines as they came, minus hop-by-hop
        fields and the route's removals, plus the proxy's fields and the route's additions."""
        rt = self.rt
        req = ex.req
        route = ex.route
        headers = req.headers
        edits = rt.edits[route]
        # With a trace, ours replaces the client's trace context fields.
        drop = edits.request_drop if ex.trace is None else edits.request_drop_traced
        connection = req.header(b"connection")
        if connection is not None and connection not in PLAIN_CONNECTION:
            drop = drop | {t.strip().lower() for t in connection.split(b",")}
        block = None  # the received field lines as they came
        names = [field[0] for field in headers]
        host_rewrite = route.host_rewrite if route is not None else None
        xff = xfp = rid = False
        if host_rewrite is not None or not drop.isdisjoint(names) or not PROXY_FIELDS.isdisjoint(names):
            # The rare path: lines to drop or to edit.
            kept = []
            for line, name in zip(received_block(req)[:-2].split(b"\r\n"), names):
                if name in drop:
                    continue
                if name == b"x-forwarded-for":
                    xff = True
                    if rt.add_xff:
                        line = line.rstrip(b" \t") + b", " + self.peer_ip
                elif name == b"host":
                    if host_rewrite is not None:
                        line = line[:line.index(b":")] + b": " + host_rewrite
                elif name == b"x-forwarded-proto":
                    xfp = True
                elif name == b"x-request-id":
                    rid = True
                kept.append(line)
            block = b"\r\n".join(kept) + b"\r\n" if kept else b""
        added = b""
        if req.upgrade is not None:
            added = UPGRADE_LINE + field_line(b"upgrade", req.upgrade)
        if req.framing == BODY_CHUNKED:
            added += CHUNKED_LINE
        if rt.add_xff and not xff:
            added += self.xff_line
        if rt.add_xfp and not xfp:
            added += XFP_LINE
        if rt.add_request_id and not rid:
            line = ex.rid = rt.request_ids.next_line()  # kept for the access log
            added += line
        if block is None:
            raw = req.raw
            if raw is not None:
                eol = raw.find(b"\r\n")
                if eol == len(req.method) + len(req.target) + 10 and raw.startswith(b" HTTP/1.1", eol - 9):
                    # The codec checked this head and its request line is the one forward_request_head
                    # would write (single spaces, HTTP/1.1): forward it as it came, plus our lines.
                    return b"".join((raw[:-2], added, edits.request_lines, b"\r\n"))
            block = received_block(req)
        return forward_request_head(req.method, req.target, block, added + edits.request_lines)

    # --- the end of an exchange

    def exchange_done(self, ex: Exchange) -> None:
        if ex.finished:
            return
        ex.finished = True
        ex.deadline = 0.0
        ex.settle()
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
            self.unblock(BLOCK_UPGRADE)
            if rest:
                self.data_received(rest)
        if self.queue:
            nxt = self.active = self.queue.popleft()
            if not self.queue:
                self.unblock(BLOCK_WAITING)
            nxt.dispatch()
        elif self.refusal is not None:
            refusal, self.refusal = self.refusal, None
            self._answer_refusal(*refusal)
        elif self.closing:
            self._close()

    def _count(self, ex: Exchange) -> None:
        """The exchange ended (answered, given up or tunnelled): count it, and record its telemetry."""
        self.requests += 1
        route = ex.route
        key = (route.name if route is not None else "none", ex.cluster or "none", ex.status // 100, ex.flag)
        counts = self.rt.state.http_requests
        counts[key] = counts.get(key, 0) + 1
        if ex.began or (ex.trace is not None and ex.trace.sampled):
            self._observe(ex)

    def _observe(self, ex: Exchange) -> None:
        """Histograms, the trace's SERVER span and the access-log line of a finished exchange."""
        rt = self.rt
        route = ex.route
        route_name = route.name if route is not None else None
        trace = ex.trace
        if trace is not None and trace.sampled:
            if ex.span is not None:
                trace.end_attempt(ex.span, 0, ex.flag)
                ex.span = None
            trace.finish(ex.status, ex.flag, route_name, ex.cluster or None)
        began = ex.began
        if not began:
            return
        duration = time.perf_counter() - began
        upstream = ex.head_at - ex.sent_at if ex.head_at and ex.sent_at else None
        recorders = rt.recorders
        if recorders is not None:
            recorder = recorders.get(ex.cluster)
            if recorder is not None:
                recorder.record(ex.status, duration, upstream, ex.rx, ex.tx)
        access_log = rt.access_log
        if access_log is not None:
            req = ex.req
            rid = req.header(b"x-request-id") or (ex.rid[14:-2] if ex.rid else None)
            access_log.log((rt.epoch + began, req.method, req.target, b"HTTP/" + req.version, ex.status, ex.flag,
                            ex.rx, ex.tx, duration * 1000.0, upstream * 1000.0 if upstream is not None else None,
                            rid, req.authority, ex.pool.label if ex.pool is not None else None,
                            route_name, ex.cluster or None, self.downstream(), self.relay.peer_id,
                            trace.trace_id if trace is not None else None, req.header(b"user-agent"),
                            req.header(b"x-forwarded-for")))

    def downstream(self) -> str:
        """The client's address as text, made once per connection (for the access log)."""
        text = self.peer_text
        if text is None:
            text = self.peer_text = format_addr(self.relay.peer_addr)
        return text

    def tunnel(self, ex: Exchange, upstream_rest: bytes) -> None:
        """101 or a 2xx to CONNECT: both connections become a byte relay."""
        conn = ex.conn
        ex.conn = None
        ex.deadline = 0.0
        ex.resp_done = True
        ex.finished = True
        self._count(ex)
        ex.settle()
        ex.pool.active -= 1
        conn.owner = None
        conn.free_slot()  # the relay owns the socket now; the breaker counts HTTP connections
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
        ex = Exchange(self, REFUSED)
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
        if not transport.can_write_eof():
            transport.close()  # TLS cannot half-close: close after what was written
            return
        transport.write_eof()
        self.linger = self.loop.call_later(LINGER, transport.close)

    def reset(self) -> None:
        if not self.lost:
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
            "downstream": self.downstream(), "peer_identity": self.relay.peer_id or "",
            "similar_not_logged": held}})

"""The L4 relay: bytes both ways between a downstream and an upstream socket.

Hot path rules: protocol callbacks only (no streams, no per-chunk tasks or
timers); a chunk is handed straight to the other transport; per-chunk
bookkeeping is one int add. Statistics reach Prometheus at
scrape time (see ``ListenerState``), not per chunk.

Flow control: each transport's write buffer has a high watermark
(``listener.buffer_limit``) and a low one (a quarter of it). When the
receiving side's buffer passes the high mark, asyncio calls its
``pause_writing`` and we stop reading from the sender; ``resume_writing``
restarts it. So at most about ``buffer_limit`` plus one read chunk is held per
direction, however slow the reader.

Half-close: a FIN from one side becomes ``write_eof`` (FIN) on the other,
while the other direction keeps flowing; the relay ends when both directions
have ended. A reset on one side aborts the other, so the peer learns of it.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING

from ..addr import format_addr
from ..tls.reasons import HandshakeFailed
from ..tls.mesh import MESH_ALPN, half_close
from .detect import MAX_SNIFF_BYTES, Detection, Proto, sniff
from .original_dst import is_own_listener, original_dst

if TYPE_CHECKING:
    from .listeners import ListenerRuntime

log = logging.getLogger("sidecar_proxy.relay")

_LINGER_RST = struct.pack("ii", 1, 0)

# How many idle checks per idle_timeout: a quiet connection is closed after
# between 1 and 1.25 idle_timeouts, at the cost of 4 timer callbacks per
# idle_timeout per connection instead of a timer reset per received chunk.
# A tick sees activity as a change in the byte counters the relay keeps anyway.
_IDLE_TICKS = 4

# Why a connection ended: the `reason` label of
# sidecar_tcp_connections_closed_total. "normal" is both directions ending.
CLOSE_REASONS = ("normal", "reset", "idle_timeout", "connect_failed", "refused", "drain_timeout")

# Connection states as shown by /connections.
DETECTING = "detecting"
TLS_HANDSHAKE = "tls_handshake"
CONNECTING = "connecting"
ESTABLISHED = "established"
HTTP = "http"          # an HTTP/1 session: requests are routed one by one
CLOSING = "closing"


def connect_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    code = getattr(exc, "errno", None)
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return "unreachable"
    if code in (errno.EMFILE, errno.ENFILE):
        return "fd_limit"  # ours, not the upstream's: raise the proxy's RLIMIT_NOFILE
    if isinstance(exc, socket.gaierror):
        return "resolve"
    return "other"


def abort_with_rst(transport: asyncio.BaseTransport) -> None:
    """Close so the peer sees a reset: the nearest thing to 'refused' once accepted."""
    if transport.is_closing():
        transport.abort()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except (OSError, ValueError):  # ValueError: uvloop's socket is already gone
            pass
    transport.abort()


class _Side:
    """One socket of a relay; forwards what it reads to its peer side.

    An asyncio protocol without the ``asyncio.Protocol`` base, so that it can
    be compiled as an extension type (``compiled.EXTENSION_TYPES``); the
    subclasses add ``connection_made``.
    """

    __slots__ = ("relay", "transport", "peer", "eof", "nbytes", "lost", "tls")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.nbytes = 0  # bytes read from this socket
        self.lost = False
        self.tls = False  # the transport is TLS: no half-close

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        try:
            self.peer.transport.write(data)
        except AttributeError:
            # No upstream yet (see _Downstream.connection_made).
            self.relay.hold_early(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            # Still detecting or connecting: _established() forwards the FIN.
            self.relay.early_eof()
        elif peer.eof:
            self.relay.close()
        elif not peer.transport.is_closing():
            half_close(peer.transport)
        # True keeps our sending direction open (half-close); TLS cannot, and warns if asked.
        return not self.tls

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.relay.side_lost(self, exc)


class _Downstream(_Side):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # uvloop starts reading only after connection_made returns, so this
        # pause does not hold: a client that speaks first gets one chunk read,
        # which hold_early keeps while it pauses for real. After that nothing
        # is read until the upstream is connected, and TCP pushes back.
        transport.pause_reading()
        self.relay.start(transport)


class _Upstream(_Side):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


class Relay:
    """One relayed TCP connection, for the snapshot it was accepted under."""

    __slots__ = ("rt", "down", "up", "peer_addr", "orig_dst", "upstream_addr", "state",
                 "created", "seen_bytes", "quiet_ticks", "timer", "connect_task", "closed",
                 "close_reason", "early", "detection", "detect_timer", "cluster", "session", "http_tx",
                 "peer_id", "tls_version")
    # Typed C fields when compiled (compiled.pxd_text): reached without a lookup.
    down: _Downstream
    up: _Upstream | None

    def __init__(self, rt: ListenerRuntime) -> None:
        self.rt = rt
        self.down = _Downstream(self)
        self.up: _Upstream | None = None
        self.peer_addr: tuple | None = None
        self.orig_dst: tuple[str, int] | None = None
        self.upstream_addr: tuple[str, int] | None = None
        self.state = CONNECTING
        self.created = time.monotonic()
        self.seen_bytes = 0  # both directions' byte counts at the last idle tick
        self.quiet_ticks = 0
        self.timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task | None = None
        self.closed = False
        self.close_reason = "normal"
        # Bytes read from downstream before the upstream existed (see hold_early).
        self.early: list[bytes] | None = None
        self.detection: Detection | None = None
        self.detect_timer: asyncio.TimerHandle | None = None
        self.cluster = None  # the TCP relay's cluster, chosen when relaying starts
        self.session = None  # the HTTP session while the connection speaks HTTP/1
        self.http_tx = 0     # bytes read from upstreams on behalf of the HTTP session
        self.peer_id: str | None = None      # the client's SPIFFE ID, once mTLS was terminated
        self.tls_version: str | None = None

    # --- accept -> destination -> connect

    def start(self, transport: asyncio.Transport) -> None:
        rt = self.rt
        state = rt.state
        state.opened += 1
        state.connections.add(self)
        self.peer_addr = transport.get_extra_info("peername")
        if len(state.connections) > rt.listener.max_connections:
            self.refuse("overflow")
            return
        if rt.listener.tproxy:
            # TPROXY does not rewrite the packet: the accepted socket is
            # bound to the address the client asked for.
            self.orig_dst = transport.get_extra_info("sockname")[:2]
        elif rt.listener.transparent:
            try:
                dst = original_dst(transport.get_extra_info("socket"))
            except OSError:
                self.refuse("original_dst_error")
                return
            # No NAT entry: the client dialled the listener itself.
            self.orig_dst = dst if dst is not None else transport.get_extra_info("sockname")[:2]
        limit = rt.listener.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        protocol = rt.listener.protocol
        tls_mode = rt.tls_mode
        if protocol == "http" and tls_mode == "disable":
            self._start_http()
            return
        if protocol == "auto" or tls_mode != "disable":
            port = self.orig_dst[1] if self.orig_dst else rt.listener.port
            if protocol == "auto" and port in rt.listener.opaque_ports and tls_mode != "strict":
                rt.state.count_detection("opaque_port")
            else:
                # Read the client's first bytes before choosing how to relay.
                self.state = DETECTING
                self.detect_timer = rt.loop.call_later(rt.listener.detection_timeout, self._detection_timed_out)
                transport.resume_reading()
                return
        self._relay_tcp()

    def _relay_tcp(self) -> None:
        """Relay bytes to the listener's TCP route: its cluster, or where the connection was going."""
        route = self.rt.tcp_route
        if route is not None and route.allow is not None and (
                self.peer_id is None or not route.allow.matches(self.peer_id)):
            self.refuse("unauthorized")  # the route's authorization: not one byte reaches the app
            return
        self.cluster, target = self.rt.tcp_target(self.orig_dst)
        if target is None or is_own_listener(target, self.rt.own_ports):
            self.refuse("redirect_loop" if target is not None else "no_route")
            return
        self.upstream_addr = target
        self.state = CONNECTING
        if not self.closed and not self.down.lost:
            self.down.transport.pause_reading()
        self.connect_task = self.rt.loop.create_task(self._connect(target))

    def _start_http(self) -> None:
        from ..protocols.http1.session import Session
        self.state = HTTP
        self.session = Session(self, self.rt.http)
        early, self.early = self.early, None
        self._arm_idle_timer()
        self.session.start(early)

    # --- protocol detection ("auto" listeners)

    def _sniff(self, final: bool, outcome: str | None = None) -> None:
        data = b"".join(self.early) if self.early else b""
        found = sniff(data[:MAX_SNIFF_BYTES]) if data else None
        if found is None and not final and len(data) < MAX_SNIFF_BYTES:
            return
        if found is None:
            found = Detection(Proto.OPAQUE, detail="no decision from the bytes received")
        self.detection = found
        if self.detect_timer is not None:
            self.detect_timer.cancel()
            self.detect_timer = None
        rt = self.rt
        rt.state.count_detection(outcome or found.proto.value)
        if self.closed or self.down.lost:
            return
        if self.peer_id is None and rt.tls_mode != "disable":
            if found.proto is Proto.TLS and (rt.tls_mode == "strict" or MESH_ALPN in found.alpn):
                self._start_tls()
                return
            if rt.tls_mode == "strict":
                rt.state.count_tls("plaintext")
                self.refuse("plaintext")  # strict mTLS: nothing else reaches the app
                return
        if rt.listener.protocol == "http" or (found.proto is Proto.HTTP1 and rt.http is not None):
            self._start_http()
            return
        # Other TLS (an application's own, or any on a listener without mTLS) and HTTP/2 are relayed as TCP.
        self._relay_tcp()

    # --- mTLS termination (listener tls.mode permissive / strict)

    def _start_tls(self) -> None:
        rt = self.rt
        contexts = rt.mesh.source.current() if rt.mesh is not None else None
        if contexts is None:
            rt.state.count_tls("no_local_identity")
            self.refuse("no_local_identity")  # the workload certificate expired and nothing replaced it
            return
        self.state = TLS_HANDSHAKE
        early, self.early = self.early, None
        self.connect_task = rt.loop.create_task(self._handshake(contexts.server, b"".join(early) if early else b""))

    async def _handshake(self, ctx, early: bytes) -> None:
        from ..tls.handshake import server_handshake  # cryptography is loaded only where mTLS is configured
        rt = self.rt
        try:
            est = await server_handshake(rt.loop, self.down.transport, self.down, ctx,
                                         timeout=rt.mesh.handshake_timeout, early=early)
        except HandshakeFailed as exc:
            # The connection is aborted already and its events went to the handshake, not to us.
            rt.state.count_tls(exc.reason)
            rt.state.count_refused("tls_handshake")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("tls handshake refused", extra={"fields": {
                    "listener": rt.listener.name, "reason": exc.reason, "detail": exc.detail,
                    "downstream": format_addr(self.peer_addr)}})
            self.close_reason = "refused"
            if not self.down.lost:  # else side_lost finished it (the client left before the handshake began)
                self._finish()
            return
        except asyncio.CancelledError:
            if not self.down.lost:
                self._finish()
            raise
        finally:
            self.connect_task = None
        rt.state.count_tls("ok")
        down = self.down
        down.transport = transport = est.transport
        down.tls = True
        self.peer_id = est.peer.spiffe_id
        self.tls_version = est.version
        # What arrived with the handshake's last flight is handed to `down` in the next callback (it
        # lands in self.early, reading paused): let that happen before choosing the next protocol.
        await asyncio.sleep(0)
        if self.closed or down.lost:
            if not transport.is_closing():
                transport.abort()
            return
        limit = rt.listener.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        protocol = rt.listener.protocol
        if rt.http is not None and (protocol == "http" or est.alpn == "http/1.1"):
            self._start_http()
        elif protocol == "tcp" or rt.http is None:
            self._relay_tcp()
        else:
            # Opaque bytes inside (a peer's TCP relay): sniff what the decrypted stream starts with.
            self.state = DETECTING
            self.detect_timer = rt.loop.call_later(rt.listener.detection_timeout, self._detection_timed_out)
            if self.early:
                self._sniff(final=False)  # bytes that came with the handshake's last flight
                if self.state != DETECTING:
                    return
            transport.resume_reading()

    def _detection_timed_out(self) -> None:
        self.detect_timer = None
        if self.state == DETECTING and not self.closed:
            # A server-speaks-first protocol on a port not declared opaque.
            self._sniff(final=True, outcome="timeout")

    def early_eof(self) -> None:
        if self.state == DETECTING and not self.closed:
            self._sniff(final=True)

    def refuse(self, reason: str) -> None:
        self.rt.state.count_refused(reason)
        self.close_reason = "refused"
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection refused", extra={"fields": {
                "listener": self.rt.listener.name, "reason": reason,
                "downstream": format_addr(self.peer_addr), "original_destination": format_addr(self.orig_dst)}})
        self.closed = True
        self.state = CLOSING
        abort_with_rst(self.down.transport)

    async def _connect(self, target: tuple[str, int]) -> None:
        rt = self.rt
        loop = rt.loop
        # perf_counter, not loop.time(): uvloop's clock ticks in milliseconds.
        began = time.perf_counter()
        up = rt.upstreams.get(self.cluster.name)  # None for transparent passthrough
        try:
            if up is not None and up.tls_expected is not None:
                # mTLS origination; the peer's listener sniffs the decrypted bytes (opaque ALPN).
                side = _Upstream(self)
                side.tls = True
                await rt.mesh.connect(loop, target[0], target[1], side, up.tls_expected,
                                      opaque=True, connect_timeout=self.cluster.connect_timeout, sni=up.tls_sni)
                self._link(side)
                up.state.tls["ok"] = up.state.tls.get("ok", 0) + 1
            else:
                async with asyncio.timeout(self.cluster.connect_timeout):
                    await loop.create_connection(self._make_upstream, target[0], target[1])
        except asyncio.CancelledError:
            self.closed = True
            if self.up is not None and self.up.transport is not None:
                self.up.transport.abort()
            abort_with_rst(self.down.transport)
            raise
        except (OSError, TimeoutError, HandshakeFailed) as exc:
            if isinstance(exc, HandshakeFailed):
                reason = "tls"
                up.state.tls[exc.reason] = up.state.tls.get(exc.reason, 0) + 1
            else:
                reason = connect_failure_reason(exc)
            rt.connect_failures(self.cluster.name, reason)
            self.close_reason = "connect_failed"
            held = rt.log_throttle.allow(self.cluster.name)
            if held is not None:
                log.warning("upstream connect failed", extra={"fields": {
                    "listener": rt.listener.name, "cluster": self.cluster.name, "upstream": format_addr(target),
                    "reason": reason, "error": str(exc) or type(exc).__name__, "similar_not_logged": held}})
            self.closed = True
            self.state = CLOSING
            abort_with_rst(self.down.transport)
            return
        finally:
            self.connect_task = None
        rt.connect_seconds(self.cluster.name).observe(time.perf_counter() - began)
        self._established()

    def hold_early(self, data: bytes) -> None:
        """Keep bytes that arrived before the upstream: one read chunk, as reading pauses here.

        While detecting, reading goes on until the sniffer decides, at most
        MAX_SNIFF_BYTES.
        """
        if self.early is None:
            self.early = []
        self.early.append(data)
        if self.state == DETECTING:
            self._sniff(final=False)
        elif not self.closed:
            self.down.transport.pause_reading()

    def _make_upstream(self) -> _Upstream:
        return self._link(_Upstream(self))

    def _link(self, up: _Upstream) -> _Upstream:
        """The upstream side joins the relay once connected (until then downstream bytes are held)."""
        up.peer = self.down
        self.down.peer = up
        self.up = up
        return up

    def _established(self) -> None:
        up, down = self.up, self.down
        if self.closed or down.lost:
            up.transport.close()
            return
        limit = self.rt.listener.buffer_limit
        up.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.state = ESTABLISHED
        if self.early is not None:
            up.transport.writelines(self.early)
            self.early = None
        if down.eof:
            half_close(up.transport)
        else:
            down.transport.resume_reading()
        self._arm_idle_timer()

    # --- idle timeout

    def _arm_idle_timer(self) -> None:
        self.timer = self.rt.loop.call_later(self.rt.listener.idle_timeout / _IDLE_TICKS, self._idle_tick)

    def _idle_tick(self) -> None:
        if self.closed:
            return
        moved = self.down.nbytes + (self.up.nbytes if self.up is not None else 0) + self.http_tx
        if moved != self.seen_bytes:
            self.seen_bytes = moved
            self.quiet_ticks = 0
        else:
            self.quiet_ticks += 1
            if self.quiet_ticks >= _IDLE_TICKS:
                self.close_reason = "idle_timeout"
                self.close()
                return
        self._arm_idle_timer()

    # --- teardown

    def close(self) -> None:
        """Graceful: each side flushes what it holds, then closes."""
        if self.closed:
            return
        self.closed = True
        self.state = CLOSING
        if self.connect_task is not None:
            self.connect_task.cancel()
        for side in (self.down, self.up):
            if side is not None and side.transport is not None:
                side.transport.close()

    def abort(self, reason: str) -> None:
        """Immediate, with a reset both ways (drain deadline, shutdown)."""
        if self.close_reason == "normal":
            self.close_reason = reason
        self.closed = True
        self.state = CLOSING
        if self.connect_task is not None:
            self.connect_task.cancel()
        for side in (self.down, self.up):
            if side is not None and side.transport is not None and not side.lost:
                abort_with_rst(side.transport)

    def side_lost(self, side: _Side, exc: BaseException | None) -> None:
        other = side.peer
        if other is not None and not other.lost and other.transport is not None:
            if exc is not None:
                # A reset (or error) on one side: pass it on rather than
                # letting the other side believe the stream ended cleanly.
                if self.close_reason == "normal":
                    self.close_reason = "reset"
                abort_with_rst(other.transport)
            else:
                other.transport.close()
            self.closed = True
            self.state = CLOSING
            return
        if self.connect_task is not None and not self.connect_task.done():
            # The client went away while we were still connecting upstream.
            self.connect_task.cancel()
        self._finish()

    def _finish(self) -> None:
        self.closed = True
        for timer in (self.timer, self.detect_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.detect_timer = None
        state = self.rt.state
        state.connections.discard(self)
        state.closed[self.close_reason] = state.closed.get(self.close_reason, 0) + 1
        state.closed_rx += self.down.nbytes
        state.closed_tx += (self.up.nbytes if self.up is not None else 0) + self.http_tx

    # --- the HTTP session's hooks

    def http_lost(self, exc: BaseException | None) -> None:
        """The downstream of an HTTP session closed (the session cleaned up its upstreams)."""
        if exc is not None and self.close_reason == "normal":
            self.close_reason = "reset"
        self.session = None
        self._finish()

    def become_tunnel(self, upstream: asyncio.Transport, to_upstream: bytes, to_downstream: bytes) -> None:
        """After a 101 or a 2xx to CONNECT: relay bytes between the session's two connections."""
        self.session = None
        self.state = ESTABLISHED
        up = _Upstream(self)
        up.transport = upstream
        up.tls = upstream.get_extra_info("ssl_object") is not None
        up.peer = self.down
        self.down.peer = up
        self.up = up
        upstream.set_protocol(up)
        self.down.transport.set_protocol(self.down)
        limit = self.rt.listener.buffer_limit
        upstream.set_write_buffer_limits(high=limit, low=limit // 4)
        if to_downstream:
            up.nbytes += len(to_downstream)
            self.down.transport.write(to_downstream)
        if to_upstream:
            upstream.write(to_upstream)
        upstream.resume_reading()
        self.down.transport.resume_reading()

    def drain(self) -> None:
        """Graceful stop: an HTTP connection closes after its current response; TCP is left to finish."""
        if self.session is not None:
            self.session.drain()

    # --- introspection (admin, metrics)

    def buffered(self) -> int:
        total = 0
        for side in (self.down, self.up):
            if side is not None and side.transport is not None and not side.lost:
                total += side.transport.get_write_buffer_size()
        return total

    def describe(self, now: float) -> dict:
        return {
            "listener": self.rt.listener.name,
            "downstream": format_addr(self.peer_addr),
            "original_destination": format_addr(self.orig_dst),
            "upstream": format_addr(self.upstream_addr),
            "cluster": self.cluster.name if self.cluster is not None else None,
            "state": self.state,
            "http_requests": self.session.requests if self.session is not None else None,
            "protocol": self.detection.proto.value if self.detection else None,
            "sni": self.detection.sni if self.detection else None,
            "tls": self.tls_version,
            "peer_identity": self.peer_id,
            "rx_bytes": self.down.nbytes,
            "tx_bytes": self.up.nbytes if self.up is not None else 0,
            "buffered_bytes": self.buffered(),
            "age_s": round(now - self.created, 3),
            "snapshot_version": self.rt.snapshot_version,
        }

"""Keep-alive connections to upstream endpoints, reused across requests.

One :class:`Pool` per (cluster, endpoint); pools outlive snapshots so a
config reload does not throw away warm connections. A connection is either
owned by one exchange (an in-flight request) or idle in its pool, never
both. Idle connections are kept most-recently-used first (LIFO), so under
low load the same few stay warm and the rest age out.

The "503 after idle" race: an upstream closes an idle keep-alive connection
just as the proxy sends a request on it. Three defences, none of which
costs anything on the busy path:

* the pool's ``idle_timeout`` (default 4 s) is shorter than common server
  keep-alive timeouts, so the proxy is usually the side that closes;
* a connection whose FIN or data arrived while idle is dropped at once
  (``eof_received``/``data_received`` while not owned);
* a connection that sat idle for more than ``PEEK_AFTER`` seconds is probed
  with a non-blocking ``MSG_PEEK`` before it is handed out, which catches a
  FIN that the kernel holds but the event loop has not dispatched yet.

A connection found dead here was never written to, so the request simply
goes on a fresh connection.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable

from ..addr import format_addr

if TYPE_CHECKING:
    from ..protocols.events import Parser

log = logging.getLogger("sidecar_proxy.pool")

# Idle longer than this and a connection is probed before reuse. Upstreams
# close idle connections after seconds, never within a fraction of one, so
# connections reused back to back (every connection under load) skip it.
PEEK_AFTER = 0.25


class UpstreamConn:
    """One upstream TCP connection; forwards events to the exchange that owns it.

    An asyncio protocol without the ``asyncio.Protocol`` base, so that it can
    be compiled as an extension type (``compiled.EXTENSION_TYPES``); it has
    every protocol method itself.
    """

    __slots__ = ("pool", "transport", "owner", "dead", "idle_since", "sock", "parser", "breakers")
    # Typed C fields when compiled (compiled.pxd_text): reached without a lookup.
    pool: Pool
    parser: Parser | None

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.owner = None  # the exchange using it, None while idle
        self.dead = False
        self.idle_since = 0.0
        self.sock: socket.socket | None = None  # a view of the fd for MSG_PEEK, made on first probe
        self.parser = None  # the response parser, kept for the connection's life
        self.breakers = None  # the cluster's CircuitBreakers: one "connections" slot held until the connection ends

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_data(data)
        else:
            # Bytes with no request outstanding: the framing is broken.
            self.discard()

    def eof_received(self) -> bool:
        owner = self.owner
        if owner is not None:
            owner.upstream_eof()
        else:
            self.discard()
        return False  # close our side too

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_pause_writing()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.dead = True
        self.free_slot()
        self._release_sock()
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.upstream_lost(exc)
        self.pool.forget(self)

    def discard(self) -> None:
        """Close without reuse (also what an exchange does after a broken response)."""
        self.dead = True
        self.owner = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.dead = True
        self.owner = None
        if self.transport is not None:
            self.transport.abort()
        else:
            self.free_slot()  # never connected: no connection_lost will come

    def free_slot(self) -> None:
        """Give the circuit breaker's "connections" slot back (once)."""
        breakers = self.breakers
        if breakers is not None:
            self.breakers = None
            breakers.release("connections")

    def alive_after_idle(self) -> bool:
        """True unless the kernel already holds a FIN, a reset or stray bytes for us."""
        try:
            if self.sock is None:
                fd = self.transport.get_extra_info("socket").fileno()
                self.sock = socket.socket(fileno=fd)
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # b"" (FIN) or unexpected bytes

    def _release_sock(self) -> None:
        # The fd belongs to the transport: detach so closing our view never closes it.
        if self.sock is not None:
            self.sock.detach()
            self.sock = None


class Pool:
    """Idle connections to one endpoint of one cluster."""

    __slots__ = ("key", "address", "loop", "idle", "max_idle", "idle_timeout", "sweep_handle",
                 "opened", "reused", "on_empty", "active", "label")

    def __init__(self, key: tuple, address: tuple[str, int], loop: asyncio.AbstractEventLoop,
                 max_idle: int, idle_timeout: float, on_empty: Callable[[Pool], None]) -> None:
        self.key = key
        self.address = address
        self.label = format_addr(address)  # "host:port" for logs
        self.loop = loop
        self.idle: list[UpstreamConn] = []
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.sweep_handle: asyncio.TimerHandle | None = None
        self.opened = 0   # connections made
        self.reused = 0   # requests sent on a connection taken from the pool
        self.active = 0   # connections owned by an exchange now
        self.on_empty = on_empty

    def take(self) -> UpstreamConn | None:
        """The most recently used live idle connection, or None."""
        idle = self.idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.dead or conn.transport.is_closing():
                continue
            quiet = now - conn.idle_since
            if quiet >= self.idle_timeout or (quiet > PEEK_AFTER and not conn.alive_after_idle()):
                conn.discard()
                continue
            self.reused += 1
            self.active += 1
            return conn
        return None

    def new_conn(self) -> UpstreamConn:
        self.opened += 1
        self.active += 1
        return UpstreamConn(self)

    def give_back(self, conn: UpstreamConn) -> None:
        """An exchange is done with a connection whose framing ended cleanly."""
        self.active -= 1
        conn.owner = None
        if conn.parser is not None:
            conn.parser.set_sink(None)  # no reference from the pool to a finished exchange
        if conn.dead or len(self.idle) >= self.max_idle or conn.transport.is_closing():
            conn.discard()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self.sweep_handle is None:
            self.sweep_handle = self.loop.call_later(self.idle_timeout, self._sweep)

    def drop(self, conn: UpstreamConn) -> None:
        """An exchange is done with a connection that must not be reused."""
        self.active -= 1
        conn.discard()

    def forget(self, conn: UpstreamConn) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def _sweep(self) -> None:
        self.sweep_handle = None
        cutoff = time.monotonic() - self.idle_timeout
        keep = []
        for conn in self.idle:
            if conn.dead:
                continue
            if conn.idle_since <= cutoff:
                conn.discard()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            self.sweep_handle = self.loop.call_later(max(0.01, oldest + self.idle_timeout - time.monotonic()),
                                                     self._sweep)
        elif self.active == 0:
            self.on_empty(self)

    def close(self) -> None:
        if self.sweep_handle is not None:
            self.sweep_handle.cancel()
            self.sweep_handle = None
        for conn in self.idle:
            conn.discard()
        self.idle = []


class PoolManager:
    """Every pool of the process, keyed by (cluster name, host, port)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pools: dict[tuple, Pool] = {}

    def pool(self, cluster: str, address: tuple[str, int], max_idle: int, idle_timeout: float) -> Pool:
        key = (cluster, address[0], address[1])
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(key, address, self.loop, max_idle, idle_timeout, self._empty)
        else:
            # Options follow the latest snapshot that uses the pool.
            pool.max_idle = max_idle
            pool.idle_timeout = idle_timeout
        return pool

    def _empty(self, pool: Pool) -> None:
        if self.pools.get(pool.key) is pool and not pool.idle and pool.active == 0:
            del self.pools[pool.key]

    def close_idle(self) -> None:
        for pool in list(self.pools.values()):
            pool.close()

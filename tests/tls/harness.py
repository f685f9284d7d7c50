"""A uvloop TLS terminator in a thread, shaped like the proxy's inbound path, and blocking clients.

The server accepts plain TCP, reads the client's first bytes until the real
sniffer (``sidecar_proxy.transport.detect.sniff``) decides, then upgrades
with :func:`server_handshake`, passing the bytes it read as ``early``. Every
outcome is recorded (an accepted peer or a refusal reason) and counted by
reason. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import collections
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

import uvloop

from sidecar_proxy.tls.handshake import HandshakeFailed, server_handshake
from sidecar_proxy.transport.detect import MAX_SNIFF_BYTES, Proto, sniff

WAIT_S = 5.0


@dataclass
class Outcome:
    reason: str | None           # None: accepted
    spiffe_id: str | None = None
    alpn: str | None = None
    version: str | None = None
    early_bytes: int = 0


class _Echo(asyncio.Protocol):
    """The decrypted stream: echo, and answer b"who" with the peer's SPIFFE ID and our generation."""

    def __init__(self, server: "TLSServer") -> None:
        self.server = server
        self.transport = None
        self.info = b""

    # server_handshake promises: no callback before it has returned, none at all for a refused peer.
    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self.server.stray.append(("data", data))
            return
        self.server.received.append(data)
        self.transport.write(self.info if data == b"who" else data)

    def attach(self, transport, info: bytes) -> None:
        self.transport = transport
        self.info = info

    def eof_received(self):
        if self.transport is None:
            self.server.stray.append(("eof", None))
        return False

    def connection_lost(self, exc) -> None:
        if self.transport is None:
            self.server.stray.append(("lost", exc))



class _Sniff(asyncio.Protocol):
    def __init__(self, server: "TLSServer") -> None:
        self.server = server
        self.buf = b""
        self.transport = None
        self.decided = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.decided:
            return
        self.buf += data
        if self.server.early_limit is not None:
            # Upgrade after this many bytes, whatever they are: the rest must come from the socket.
            if len(self.buf) < self.server.early_limit:
                return
            tls = True
        else:
            found = sniff(self.buf[:MAX_SNIFF_BYTES])
            if found is None and len(self.buf) < MAX_SNIFF_BYTES:
                return
            tls = found is not None and found.proto is Proto.TLS
        self.decided = True
        self.transport.pause_reading()
        if not tls:
            self.server.record(Outcome("plaintext"))
            self.transport.abort()
            return
        asyncio.get_running_loop().create_task(self.server.upgrade(self.transport, self.buf))

    def eof_received(self):
        return False


class TLSServer:
    """``contexts()`` returns the SSLContext for a new handshake, or None (refused: no_local_identity).

    ``early_limit``: upgrade after exactly the first read(s) reaching this many
    bytes instead of asking the sniffer; ``expected``: the clients' allowed
    SPIFFE IDs; ``use_uvloop=False`` runs the stdlib asyncio loop instead.
    """

    def __init__(self, contexts: Callable[[], ssl.SSLContext | None], *, timeout: float = 2.0,
                 now: Callable[[], float] = time.time, info: Callable[[], bytes] = lambda: b"",
                 early_limit: int | None = None, expected=None, use_uvloop: bool = True) -> None:
        self.contexts = contexts
        self.use_uvloop = use_uvloop
        self.early_limit = early_limit
        self.expected = expected
        self.timeout = timeout
        self.now = now
        self.info = info
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        self.counts: collections.Counter = collections.Counter()
        self.stray: list = []      # protocol callbacks that came before server_handshake returned, or after a refusal
        self.received: list = []   # application data, as the protocol got it
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._thread: threading.Thread | None = None
        self._server = None
        self._tasks: set = set()

    def record(self, outcome: Outcome) -> None:
        self.counts[outcome.reason or "accepted"] += 1
        self.outcomes.put(outcome)

    async def upgrade(self, transport, early: bytes) -> None:
        ctx = self.contexts()
        if ctx is None:
            self.record(Outcome("no_local_identity"))
            transport.abort()
            return
        echo = _Echo(self)
        try:
            est = await server_handshake(self.loop, transport, echo, ctx, timeout=self.timeout, early=early,
                                         expected=self.expected, now=self.now)
        except HandshakeFailed as exc:
            self.record(Outcome(exc.reason))
            return
        echo.attach(est.transport, est.peer.spiffe_id.encode() + b" " + self.info())
        self.record(Outcome(None, est.peer.spiffe_id, est.alpn, est.version, len(early)))

    # --- lifecycle

    def __enter__(self) -> "TLSServer":
        started = threading.Event()

        def run() -> None:
            async def main() -> None:
                self.loop = asyncio.get_running_loop()
                self._server = await self.loop.create_server(lambda: _Sniff(self), "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                self._stop = asyncio.Event()
                started.set()
                await self._stop.wait()
                self._server.close()

            if self.use_uvloop:
                uvloop.run(main())
            else:
                asyncio.run(main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(WAIT_S), "TLS test server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(WAIT_S)

    def next_outcome(self) -> Outcome:
        return self.outcomes.get(timeout=WAIT_S)

    def drain(self) -> None:
        while not self.outcomes.empty():
            self.outcomes.get_nowait()


async def _call(fn, *args):
    return fn(*args)


def tls_client(port: int, ctx: ssl.SSLContext, payload: bytes = b"ping") -> bytes | Exception:
    """Handshake, send ``payload``, return what came back (or the exception: a refused client)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as raw:
            raw.settimeout(WAIT_S)
            with ctx.wrap_socket(raw) as s:
                s.sendall(payload)
                return s.recv(4096)
    except (OSError, ssl.SSLError) as exc:
        return exc


class KeptConnection:
    """A TLS connection kept open across a rotation."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        raw.settimeout(WAIT_S)
        self.sock = ctx.wrap_socket(raw)

    def roundtrip(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        return self.sock.recv(4096)

    def peer_cert(self):
        return self.sock.getpeercert(True)

    def close(self) -> None:
        self.sock.close()

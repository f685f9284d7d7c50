"""TLS handshakes on the event loop: terminate an accepted connection, originate to an upstream.

Server side, the problem is that the proxy has already *read* the start of
the client's stream (the sniffer needs the ClientHello to tell TLS from
HTTP/1 and plaintext), so those bytes are no longer in the socket when TLS
takes over. ``loop.start_tls()`` (uvloop's and asyncio's) has no parameter
for them. Options weighed:

1. ``MSG_PEEK`` in the sniffer, so nothing is consumed: the sniffer reads
   through the transport (uvloop owns the socket's reads), and a peek loop
   would need its own readiness polling. Not ours to change either.
2. An own TLS transport over ``ssl.SSLObject`` + ``MemoryBIO`` fed with the
   early bytes: full control, but a second TLS record pump in pure Python on
   every byte of every connection, where uvloop's is compiled.
3. ``start_tls()`` plus injecting the early bytes into the SSL protocol it
   installs, **before its handshake starts** (chosen). ``start_tls`` runs
   synchronously up to its first suspension: it pauses reading, installs its
   SSLProtocol as the transport's protocol, and *schedules*
   ``connection_made`` (which wraps the incoming MemoryBIO and starts the
   handshake) and ``resume_reading``. We drive that first step ourselves
   (:func:`_await_after_first_step`, a faithful ``await`` with a hook), and
   in the hook hand the early bytes to the SSLProtocol through the public
   BufferedProtocol interface (``get_buffer``/``buffer_updated``); in the
   UNWRAPPED state both loops' SSLProtocols only append them to the incoming
   BIO. When ``connection_made`` runs, the ClientHello is already there, and
   nothing from the socket can overtake it because reading resumes only
   after that. The encrypted data path stays uvloop's. This leans on how
   ``start_tls`` is written (the same in uvloop 0.17-0.23 and CPython
   3.11+); tests/tls runs it on both loops with early prefixes of 1, 5 and 40
   bytes and with the rest racing in, so a change there shows as a failure.

   Measured (``benchmarks/tls_bench.py``, ECDSA P-256, TLS 1.3, full mutual
   handshakes, 2-core VM): about 1.18 ms of server CPU per connection
   (accept, sniff, handshake, SPIFFE checks, close), against about 1.10 ms
   for uvloop's own ``create_server(ssl=...)``, which can neither sniff nor
   check SPIFFE IDs; OpenSSL's part alone is about 0.59 ms. The injection
   itself saves a ``do_handshake`` round: the first one already has the
   ClientHello.

Client side, :func:`client_handshake` connects in plaintext first and then
upgrades with the same machinery, so a TCP connect failure (an upstream
problem, counted as such) is told apart from a TLS failure (a
:class:`HandshakeFailed` with a reason).

After either handshake, :func:`.identity.check_peer` runs before the caller's
protocol is attached: until then the TLS transport's protocol is a
:class:`_Held` stand-in that keeps whatever arrives (stdlib asyncio
delivers the first application data in the same call that completes the
handshake; uvloop one callback later). A refused peer is aborted with not one
byte, EOF or ``connection_lost`` reaching the caller's protocol; an accepted
one gets the held events replayed in order.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Iterable, NamedTuple

from .contexts import reason_for_error
from .identity import CLIENT, SERVER, PeerIdentity, check_peer
from .reasons import HandshakeFailed, TLSRejected
from .spiffe import IdentityMatcher

__all__ = ["HandshakeFailed", "Established", "server_handshake", "client_upgrade", "client_handshake"]

# uvloop's own handshake timer, a backstop behind ours (asyncio.timeout).
_BACKSTOP_S = 1.0


class Established(NamedTuple):
    transport: asyncio.Transport  # the TLS transport: write/pause/close here, not on the raw one
    peer: PeerIdentity
    alpn: str | None              # the negotiated ALPN protocol, None if none
    version: str                  # "TLSv1.3" / "TLSv1.2"
    cipher: str


class _Resume:
    """Yield one object to the running task and return what the task sends back."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __await__(self):
        return (yield self.obj)


async def _await_after_first_step(awaitable: Awaitable, hook: Callable[[], None]) -> Any:
    """``await awaitable``, calling ``hook()`` right after its first synchronous step.

    The same delegation ``await`` does (values sent and exceptions thrown by
    the task are passed through to the inner awaitable, including
    cancellation), with one difference: the hook runs after the awaitable has
    run up to its first suspension and before control returns to the loop.
    """
    it = awaitable.__await__()
    try:
        pending = it.send(None)
    except StopIteration as stop:
        hook()
        return stop.value
    try:
        hook()
    except BaseException:
        it.close()
        raise
    while True:
        try:
            sent = await _Resume(pending)
        except BaseException as exc:  # the task threw in (e.g. CancelledError): hand it on
            try:
                pending = it.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = it.send(sent)
            except StopIteration as stop:
                return stop.value


def _inject(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand bytes already read from the socket to the (not yet started) SSL protocol."""
    if not data:
        return
    if hasattr(protocol, "get_buffer"):
        view = memoryview(data)
        while view:
            buf = protocol.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(bytes(data))


class _Held(asyncio.Protocol):
    """The TLS transport's protocol until the peer passed its checks; then hands over in order."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", bytes(data)))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return True  # the caller's protocol decides when it is replayed

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(("lost", exc))

    def pause_writing(self) -> None:
        self.events.append(("pause", None))

    def resume_writing(self) -> None:
        self.events.append(("resume", None))

    def hand_over(self, loop: asyncio.AbstractEventLoop, tls: asyncio.Transport,
                  protocol: asyncio.BaseProtocol) -> None:
        if not self.events:
            tls.set_protocol(protocol)  # the usual case: nothing arrived yet, attach now
            return
        # Replay from the next callback, so the caller holds the transport first;
        # anything arriving until then queues behind what is held.
        loop.call_soon(self._replay, tls, protocol)

    def _replay(self, tls: asyncio.Transport, protocol: asyncio.BaseProtocol) -> None:
        while self.events:
            events, self.events = self.events, []
            for kind, arg in events:
                if kind == "data":
                    _inject(protocol, arg)
                elif kind == "eof":
                    if not protocol.eof_received():
                        tls.close()
                elif kind == "lost":
                    protocol.connection_lost(arg)
                    return
                elif kind == "pause":
                    protocol.pause_writing()
                else:
                    protocol.resume_writing()
        tls.set_protocol(protocol)


def _matcher(expected: IdentityMatcher | str | Iterable[str] | None) -> IdentityMatcher | None:
    if expected is None or isinstance(expected, IdentityMatcher):
        return expected
    return IdentityMatcher((expected,) if isinstance(expected, str) else expected)


async def _handshake(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, protocol: asyncio.BaseProtocol,
                     ctx, *, server_side: bool, timeout: float, early: bytes, sni: str | None,
                     expected: IdentityMatcher | None, now: Callable[[], float]) -> Established:
    held = _Held()
    start = loop.start_tls(transport, held, ctx, server_side=server_side,
                           server_hostname=None if server_side else sni,
                           ssl_handshake_timeout=timeout + _BACKSTOP_S)
    try:
        async with asyncio.timeout(timeout):
            tls = await _await_after_first_step(start, lambda: _inject(transport.get_protocol(), early))
    except asyncio.CancelledError:
        transport.abort()
        raise
    except Exception as exc:
        transport.abort()  # start_tls closed its side; make sure the socket goes too
        raise HandshakeFailed(reason_for_error(exc), str(exc) or type(exc).__name__) from None

    sslobj = tls.get_extra_info("ssl_object")
    try:
        peer = check_peer(sslobj.getpeercert(True), now(), CLIENT if server_side else SERVER)
        if expected is not None and not expected.matches(peer.spiffe_id):
            raise TLSRejected("identity_mismatch", f"peer {peer.spiffe_id} is not {', '.join(expected.patterns)}")
    except TLSRejected as exc:
        tls.abort()
        raise HandshakeFailed(exc.reason, exc.detail) from None
    held.hand_over(loop, tls, protocol)
    cipher = sslobj.cipher()
    return Established(tls, peer, sslobj.selected_alpn_protocol(), sslobj.version(), cipher[0] if cipher else "")


async def server_handshake(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                           protocol: asyncio.BaseProtocol, ctx, *, timeout: float, early: bytes = b"",
                           expected: IdentityMatcher | str | Iterable[str] | None = None,
                           now: Callable[[], float] = time.time) -> Established:
    """Terminate TLS on an accepted plain TCP transport, whose first bytes ``early`` were already read.

    ``protocol`` receives the decrypted stream (``data_received`` or the
    buffered interface; not ``connection_made``: use the returned transport)
    from the first loop callback after this returns; it sees nothing at all
    when the handshake fails. ``ctx`` is a server context from
    :mod:`.contexts` (client certificate required). ``expected`` optionally
    restricts the client's SPIFFE ID for the whole connection (per-request
    checks belong to routes). Raises :class:`HandshakeFailed`; the transport
    is aborted then.
    """
    return await _handshake(loop, transport, protocol, ctx, server_side=True, timeout=timeout, early=early,
                            sni=None, expected=_matcher(expected), now=now)


async def client_upgrade(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                         protocol: asyncio.BaseProtocol, ctx, *,
                         expected: IdentityMatcher | str | Iterable[str], timeout: float, sni: str | None = None,
                         now: Callable[[], float] = time.time) -> Established:
    """Originate TLS on a connected plain transport and check the server is ``expected`` (SPIFFE patterns).

    ``sni`` is sent as server_name if given (useful to the peer's sniffer);
    it is not verified: the SPIFFE ID is. With TLS 1.3 the server judges our
    certificate after our side of the handshake is done, so a refusal of
    *our* certificate shows as the connection closing at the first read.
    """
    return await _handshake(loop, transport, protocol, ctx, server_side=False, timeout=timeout, early=b"",
                            sni=sni, expected=_matcher(expected), now=now)


class _Connecting(asyncio.Protocol):
    """Holds the plain connection until start_tls replaces it.

    A TLS server sends nothing first, so any byte that arrives here means the
    peer is not speaking TLS. uvloop starts reading *after* ``connection_made``
    even if it paused there, so such bytes can arrive before
    :func:`client_handshake` pauses the transport; they are remembered rather
    than silently dropped (dropping them left the handshake waiting for a
    ServerHello until its timeout).
    """

    early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.early += data[:64]


async def client_handshake(loop: asyncio.AbstractEventLoop, host: str, port: int, protocol: asyncio.BaseProtocol,
                           ctx, *, expected: IdentityMatcher | str | Iterable[str], timeout: float,
                           connect_timeout: float | None = None, sni: str | None = None,
                           now: Callable[[], float] = time.time) -> Established:
    """Connect to ``(host, port)`` and originate mTLS; see :func:`client_upgrade`.

    A TCP connect failure raises ``OSError`` or ``TimeoutError`` as
    ``loop.create_connection`` does (an upstream connect failure, not a TLS
    one); the handshake raises :class:`HandshakeFailed`.
    """
    async with asyncio.timeout(connect_timeout if connect_timeout is not None else timeout):
        transport, connecting = await loop.create_connection(_Connecting, host, port)
    transport.pause_reading()
    if connecting.early:
        transport.abort()
        raise HandshakeFailed("protocol_error", f"the server spoke first, not TLS: {connecting.early[:16]!r}")
    return await client_upgrade(loop, transport, protocol, ctx, expected=expected, timeout=timeout, sni=sni, now=now)

"""How the proxy uses mTLS: one rotating workload identity per ``tls:`` section, a mesh ALPN marker,
and mutual-TLS origination to upstreams.

Telling mesh mTLS from an application's own TLS: a sidecar originating
mTLS always offers the ALPN protocol :data:`MESH_ALPN` (besides
``http/1.1`` when it carries HTTP/1.1, alone when it carries opaque bytes).
An inbound listener in ``permissive`` mode terminates only ClientHellos
that offer it and relays any other TLS untouched, so a client doing its own
TLS end to end with the application keeps working; ``strict`` terminates
every ClientHello and refuses everything else. HTTP/2 is not offered: the
proxy does not speak it yet.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from typing import TYPE_CHECKING

from ..config.model import TlsIdentity
from .reasons import HandshakeFailed

if TYPE_CHECKING:
    from .handshake import Established
    from .spiffe import IdentityMatcher

# The handshake and rotation modules (and cryptography under them) are imported by MeshTls, which
# exists only when a config has a tls section: a proxy without mTLS does not carry them (~15 MiB).

log = logging.getLogger("sidecar_proxy.tls")

MESH_ALPN = "sidecar-mesh"
SERVER_ALPN = ("http/1.1", MESH_ALPN)        # the server's preference: HTTP/1.1 when the client offers it
CLIENT_HTTP_ALPN = ("http/1.1", MESH_ALPN)   # an HTTP/1.1 upstream connection
CLIENT_OPAQUE_ALPN = (MESH_ALPN,)            # relayed TCP: the peer sniffs what is inside


class MeshTls:
    """The workload identity of one ``tls:`` section, re-read when its files change."""

    def __init__(self, settings: TlsIdentity, clock: Callable[[], float] = time.time) -> None:
        from .rotation import IdentitySource
        self.settings = settings
        self.handshake_timeout = settings.handshake_timeout
        self.source = IdentitySource(settings.cert_chain, settings.private_key, settings.trust_bundle,
                                     poll_interval=settings.poll_interval, clock=clock, server_alpn=SERVER_ALPN,
                                     client_alpn=CLIENT_HTTP_ALPN, opaque_alpn=CLIENT_OPAQUE_ALPN)
        self._task: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._task = loop.create_task(self.source.watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def status(self) -> dict:
        """What the admin endpoint shows: the identity in use, its expiry, rotations."""
        source = self.source
        identity = source.identity
        now = time.time()
        return {
            "files": {"cert_chain": self.settings.cert_chain, "private_key": self.settings.private_key,
                      "trust_bundle": self.settings.trust_bundle},
            "spiffe_id": identity.spiffe_id if identity else None,
            "serial": f"{identity.leaf.serial_number:x}" if identity else None,
            "not_after": _iso(identity.not_after) if identity else None,
            "expires_in_s": round(identity.not_after - now) if identity else None,
            "expired": identity.expired(now) if identity else None,
            "trust_bundle_not_after": _iso(identity.bundle_not_after) if identity else None,
            "generation": source.generation, "reloads": source.reloads, "refused": dict(source.rejected),
            "expired_refusals": source.expired_refusals,
        }

    async def connect(self, loop: asyncio.AbstractEventLoop, host: str, port: int, protocol: asyncio.BaseProtocol,
                      expected: IdentityMatcher, *, opaque: bool, connect_timeout: float,
                      sni: str | None = None) -> Established:
        """Connect and originate mTLS; ``protocol.connection_made`` is called with the TLS transport.

        Raises OSError / TimeoutError for the TCP connect (an upstream
        failure) and HandshakeFailed for TLS (``no_local_identity`` when the
        workload certificate has expired and nothing replaced it).
        """
        from .handshake import client_handshake
        contexts = self.source.current()
        if contexts is None:
            raise HandshakeFailed("no_local_identity", "no valid workload certificate")
        ctx = contexts.client_opaque if opaque else contexts.client
        est = await client_handshake(loop, host, port, protocol, ctx, expected=expected,
                                     timeout=self.handshake_timeout, connect_timeout=connect_timeout, sni=sni)
        protocol.connection_made(est.transport)
        return est


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def half_close(transport: asyncio.Transport) -> None:
    """Send a FIN where the transport can (plain TCP); a TLS transport cannot half-close, so it closes
    after flushing what it holds."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()

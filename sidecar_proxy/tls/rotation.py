"""Certificate rotation without restart: watch the identity files, hand out contexts for new handshakes.

SPIRE agents, cert-manager's CSI driver and Kubernetes secret volumes all
rotate a workload's certificate by rewriting files (atomically, by renaming
a symlinked directory, or not atomically at all). :class:`IdentitySource`
polls them and builds fresh ``SSLContext``\\ s when their *content* changed:

- every ``poll_interval`` (1 s) it ``stat``\\ s the three files; only when
  mtime, size or inode moved does it read them, and only when the SHA-256 of
  the bytes differs from the live identity does it validate and rebuild;
- a set that fails :meth:`.identity.WorkloadIdentity.from_pem` (half-written
  PEM, a key that is not the certificate's, expired, not chaining to the
  bundle, ...) is refused: the live identity stays, the refusal is logged
  once per distinct content and counted by reason. The same bytes are not
  validated again until a file changes, except a not-yet-valid certificate,
  which is retried once its notBefore has passed. Every
  ``REREAD_EVERY_POLLS`` polls the files are read and hashed even if their
  metadata did not move (an in-place rewrite of equal size within one mtime
  tick would otherwise go unseen);
- new contexts are *swapped in*: :meth:`current` returns them for
  handshakes that start afterwards, while established connections keep the
  SSL objects of the contexts they were made with (Python keeps a context
  alive as long as a connection uses it). A new context is a new OpenSSL
  ``SSL_CTX``, so its empty session cache cannot resume a session of the
  previous trust bundle;
- the live certificate is never used past its notAfter: :meth:`current`
  compares it with the clock on every call and returns None once it has
  expired (callers refuse the handshake: ``no_local_identity``), counting it
  in :attr:`expired_refusals`, until a valid replacement is loaded.

Metrics are left to the caller: plain attributes (:attr:`not_after`,
:attr:`bundle_not_after`, :attr:`reloads`, :attr:`rejected`,
:attr:`expired_refusals`) are read at scrape time, like the relay's counters.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .contexts import CLIENT_ALPN, SERVER_ALPN, client_context, server_context
from .identity import IdentityError, WorkloadIdentity

__all__ = ["TLSContexts", "IdentitySource", "DEFAULT_POLL_INTERVAL"]

log = logging.getLogger("sidecar_proxy.tls")

DEFAULT_POLL_INTERVAL = 1.0
REREAD_EVERY_POLLS = 60


@dataclass(frozen=True, eq=False)
class TLSContexts:
    """One generation of contexts, all built from one validated identity."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    identity: WorkloadIdentity
    generation: int  # 1 for the first identity loaded, +1 per applied rotation
    client_opaque: ssl.SSLContext | None = None  # a client context offering opaque_alpn (TCP origination)


_StatKey = tuple  # per file: (st_ino, st_size, st_mtime_ns) or the errno it failed with


class IdentitySource:
    """The workload identity from ``cert``/``key``/``bundle`` files, re-read when they change.

    ``clock`` returns seconds since the epoch (injected for tests). Call
    :meth:`load` once at start (raises :class:`.identity.IdentityError` when
    there is nothing valid to serve), then run :meth:`watch` as a task, or
    call :meth:`poll` yourself.
    """

    def __init__(self, cert_path: str | Path, key_path: str | Path, bundle_path: str | Path, *,
                 poll_interval: float = DEFAULT_POLL_INTERVAL, clock: Callable[[], float] = time.time,
                 server_alpn: Sequence[str] = SERVER_ALPN, client_alpn: Sequence[str] = CLIENT_ALPN,
                 opaque_alpn: Sequence[str] | None = None) -> None:
        self.paths = (Path(cert_path), Path(key_path), Path(bundle_path))
        self.poll_interval = poll_interval
        self.clock = clock
        self.server_alpn = tuple(server_alpn)
        self.client_alpn = tuple(client_alpn)
        self.opaque_alpn = tuple(opaque_alpn) if opaque_alpn is not None else None
        self._live: TLSContexts | None = None
        self._stat: _StatKey | None = None
        self._refused_digest: str | None = None
        self._retry_at = float("inf")  # a refused not-yet-valid certificate is retried from here
        self._polls_since_read = 0
        # Counters for metrics (monotonic, read at scrape time).
        self.reloads = 0                    # identities applied after the first
        self.rejected: dict[str, int] = {}  # refused file contents, by IdentityError reason
        self.expired_refusals = 0           # current() calls answered None because the live cert expired

    # --- what callers use

    def current(self) -> TLSContexts | None:
        """The contexts for a handshake starting now, or None: no certificate valid now (refuse TLS)."""
        live = self._live
        if live is None:
            return None
        if self.clock() > live.identity.not_after:
            self.expired_refusals += 1
            return None
        return live

    @property
    def identity(self) -> WorkloadIdentity | None:
        """The last identity loaded, even if it has expired since (for status pages)."""
        return self._live.identity if self._live is not None else None

    @property
    def not_after(self) -> float | None:
        """The live certificate's notAfter (seconds since the epoch): the expiry metric."""
        return self._live.identity.not_after if self._live is not None else None

    @property
    def bundle_not_after(self) -> float | None:
        """The earliest notAfter in the live trust bundle."""
        return self._live.identity.bundle_not_after if self._live is not None else None

    @property
    def generation(self) -> int:
        return self._live.generation if self._live is not None else 0

    # --- loading

    def load(self) -> TLSContexts:
        """Load the files now (at start). Raises IdentityError; a later poll may still succeed."""
        stat = self._stat_files()
        identity = WorkloadIdentity.load(*self.paths, now=self.clock())
        self._stat = stat
        return self._apply(identity)

    def poll(self) -> bool:
        """Check the files once; True if a new identity was applied. Never raises for file problems."""
        stat = self._stat_files()
        now = self.clock()
        self._polls_since_read += 1
        if (stat == self._stat and self._polls_since_read < REREAD_EVERY_POLLS
                and not (self._refused_digest is not None and now >= self._retry_at)):
            return False
        self._stat = stat
        self._polls_since_read = 0
        try:
            parts = [p.read_bytes() for p in self.paths]
        except OSError as exc:
            return self._refuse(IdentityError("unreadable", f"{exc.filename}: {exc.strerror or exc}"), None)
        digest = _digest(parts)
        live = self._live
        if live is not None and digest == live.identity.digest:
            self._refused_digest = None
            return False  # touched, or rewritten with the same bytes
        if digest == self._refused_digest and now < self._retry_at:
            return False
        try:
            identity = WorkloadIdentity.from_pem(*parts, now=now)
        except IdentityError as exc:
            return self._refuse(exc, digest)
        try:
            self._apply(identity)
        except (ssl.SSLError, ValueError, OSError) as exc:
            # OpenSSL refused what cryptography accepted (e.g. a key it cannot use).
            return self._refuse(IdentityError("unreadable", f"building TLS contexts: {exc}"), digest)
        return True

    async def watch(self) -> None:
        """Poll every ``poll_interval`` until cancelled."""
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.poll()
            except Exception:  # a bug must not stop rotation for good
                log.exception("tls identity poll failed")

    # --- internals

    def _stat_files(self) -> _StatKey:
        key = []
        for p in self.paths:
            try:
                st = os.stat(p)  # follows symlinks: a swapped ..data directory changes the inode
            except OSError as exc:
                key.append(exc.errno)
            else:
                key.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(key)

    def _apply(self, identity: WorkloadIdentity) -> TLSContexts:
        live = self._live
        contexts = TLSContexts(server_context(identity, self.server_alpn), client_context(identity, self.client_alpn),
                               identity, live.generation + 1 if live is not None else 1,
                               client_context(identity, self.opaque_alpn) if self.opaque_alpn is not None else None)
        self._live = contexts
        self._refused_digest = None
        self._retry_at = float("inf")
        if live is not None:
            self.reloads += 1
        log.info("tls identity loaded", extra={"fields": {
            "spiffe_id": identity.spiffe_id, "generation": contexts.generation,
            "not_after": _iso(identity.not_after), "serial": f"{identity.leaf.serial_number:x}"}})
        return contexts

    def _refuse(self, exc: IdentityError, digest: str | None) -> bool:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        self._refused_digest = digest
        # Time cures "not yet valid": look again once the certificate's notBefore has passed.
        self._retry_at = exc.not_before if exc.not_before is not None else float("inf")
        log.warning("tls identity files refused, keeping the previous identity", extra={"fields": {
            "reason": exc.reason, "error": exc.detail, "files": ",".join(map(str, self.paths)),
            "live_not_after": _iso(self.not_after) if self.not_after else "none"}})
        return False


def _digest(parts: list[bytes]) -> str:
    # The same framing as WorkloadIdentity.digest, so the two compare.
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

"""The control client: long-polls the control server per resource type and applies what it gets.

Per type, one loop: ask (with the version it runs, the nonce it answers and
its verdict on it), wait for a response, decide, ask again. A decision is
always about the whole config: the new response merged with the accepted
resources of the other types and the bootstrap file's static part,
validated, then swapped in all or nothing. So an update that references a
cluster not yet received is NACKed, kept, and retried whenever another type
changes; if it then fits, it is applied and the type's loop sends a late ACK.

At start, the first decision waits until every type has answered once. If
the server cannot be reached, or has not answered within
``initial_fetch_timeout``, the cached last good config is applied instead;
the loops keep trying the server with jittered exponential backoff, and the
proxy keeps running on what it has while the server is away.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config.snapshot import UpdateRejected
from ..logs import Throttle
from . import cache, protocol
from .http import HttpConnection, Unavailable

if TYPE_CHECKING:
    from ..app import App
    from ..config.model import Control
    from ..config.snapshot import Snapshot

log = logging.getLogger("sidecar_proxy.control")

BACKOFF_BASE_S = 0.1
# Longer than any server's hold (the bundled server holds 30 s by default).
POLL_TIMEOUT_S = 65.0
MAX_ERROR_DETAIL = 4096


@dataclass
class _TypeState:
    accepted: protocol.DiscoveryResponse | None = None
    candidate: protocol.DiscoveryResponse | None = None  # newest not (yet) accepted
    answered: bool = False  # the candidate was NACKed already
    last_nonce: str = ""
    last_error: str | None = None
    last_nack: dict | None = None
    connected: bool = False
    kick: asyncio.Event = field(default_factory=asyncio.Event)


class ControlClient:
    def __init__(self, app: App, control: Control, node_id: str, base_doc: dict) -> None:
        self.app = app
        self.control = control
        self.node_id = node_id
        self.base_doc = base_doc
        self.types = {t: _TypeState() for t in protocol.TYPES}
        self.source: str | None = None  # "control" or "cache" once a dynamic config is live
        self.cache_error: str | None = None
        self._http = {t: HttpConnection(control.host, control.port) for t in protocol.TYPES}
        self._lock = asyncio.Lock()
        self._all_seen = asyncio.Event()
        self._unreachable = asyncio.Event()
        self._first_config = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._log_throttle = Throttle(5.0)
        self._last_error_text = ""
        m = app.metrics
        self._m_connected = m.control_connected
        self._m_updates = {(t, r): m.control_updates.labels(type=t, result=r)
                           for t in protocol.TYPES for r in ("ack", "nack")}
        self._m_errors = {t: m.control_errors.labels(type=t) for t in protocol.TYPES}

    # --- lifecycle

    def start(self) -> None:
        self._tasks = [asyncio.get_running_loop().create_task(self._loop(t), name=f"control-{t}")
                       for t in protocol.TYPES]
        self._tasks.append(asyncio.get_running_loop().create_task(self._fallback(), name="control-fallback"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._http.values():
            conn.close()

    @property
    def ready(self) -> bool:
        return self._first_config.is_set()

    def waiting_reason(self) -> str:
        if self.cache_error:
            return f"waiting for the control server ({self.control.server}); cache unusable: {self.cache_error}"
        return f"waiting for the first config from the control server ({self.control.server}) or the cache"

    # --- the per-type loop

    async def _loop(self, kind: str) -> None:
        st = self.types[kind]
        path = protocol.DISCOVERY_PATH.format(kind)
        attempt = 0
        while True:
            request = protocol.DiscoveryRequest(kind, self.node_id,
                                                st.accepted.version_info if st.accepted else "",
                                                st.last_nonce, st.last_error)
            body = json.dumps(request.to_json()).encode()
            poll = asyncio.ensure_future(self._http[kind].post(
                path, body, POLL_TIMEOUT_S, on_sent=lambda: self._set_connected(kind, True)))
            kick = asyncio.ensure_future(st.kick.wait())
            try:
                done, _ = await asyncio.wait({poll, kick}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Also when this loop is cancelled: wait() leaves its children
                # running, and a poll that failed just then has an error that
                # nobody else will read.
                kick.cancel()
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)
            if poll not in done:
                # A NACKed update became valid: say so now instead of after the hold.
                st.kick.clear()
                continue
            try:
                status, payload = poll.result()
                response = self._parse(kind, status, payload)
            except (Unavailable, protocol.ProtocolError) as exc:
                self._set_connected(kind, False)
                self._m_errors[kind].inc()
                self._unreachable.set()
                delay = random.uniform(0, min(self.control.backoff_max, BACKOFF_BASE_S * 2 ** attempt))
                attempt += 1
                held = self._log_throttle.allow(kind)
                if held is not None:
                    log.warning("control server request failed; retrying", extra={"fields": {
                        "type": kind, "server": self.control.server, "error": str(exc),
                        "retry_in_s": round(delay, 2), "similar_not_logged": held}})
                await asyncio.sleep(delay)
                continue
            attempt = 0
            if response is None:
                continue  # 304: nothing changed during the hold
            verdict = await self._decide(kind, response)
            st.last_nonce, st.last_error = response.nonce, verdict

    @staticmethod
    def _parse(kind: str, status: int, payload: bytes) -> protocol.DiscoveryResponse | None:
        if status == 304:
            return None
        if status != 200:
            raise protocol.ProtocolError(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
        try:
            doc = json.loads(payload)
        except ValueError as exc:
            raise protocol.ProtocolError(f"the response is not JSON: {exc}") from None
        return protocol.DiscoveryResponse.from_json(kind, doc)

    def _set_connected(self, kind: str, connected: bool) -> None:
        self.types[kind].connected = connected
        self._m_connected.set(1 if all(st.connected for st in self.types.values()) else 0)

    # --- decisions

    async def _decide(self, kind: str, response: protocol.DiscoveryResponse) -> str | None:
        """None to ACK ``response``, else the NACK's error detail."""
        st = self.types[kind]
        st.candidate, st.answered = response, False
        if all(s.accepted or s.candidate for s in self.types.values()):
            self._all_seen.set()
        await self._all_seen.wait()
        async with self._lock:
            if st.candidate is response and not st.answered:
                await self._evaluate()
        if st.accepted is response:
            self._m_updates[(kind, "ack")].inc()
            return None
        self._m_updates[(kind, "nack")].inc()
        return self._last_error_text

    async def _evaluate(self) -> None:
        chosen = {t: st.candidate or st.accepted for t, st in self.types.items()}
        resources = {t: r.resources for t, r in chosen.items()}
        versions = {t: r.version_info for t, r in chosen.items()}
        try:
            await self._apply(resources, versions, "control")
        except UpdateRejected as exc:
            text = "; ".join(f"{p}: {m}" if p else m for p, m in exc.errors)[:MAX_ERROR_DETAIL]
            self._last_error_text = text
            for t, st in self.types.items():
                if st.candidate is not None and not st.answered:
                    st.answered = True
                    st.last_nack = {"version": st.candidate.version_info, "error": text, "at": time.time()}
            return
        for st in self.types.values():
            if st.candidate is not None:
                late = st.answered
                st.accepted, st.candidate, st.answered = st.candidate, None, False
                if late:
                    st.last_error = None
                    st.kick.set()
        self._save_cache(resources, versions)

    async def _apply(self, resources: dict[str, list[dict]], versions: dict[str, str], source: str,
                     base: dict | None = None) -> Snapshot:
        doc, problems = protocol.merge(self.base_doc if base is None else base, resources)
        if problems:
            self.app.record_rejection(source, problems)
            raise UpdateRejected(problems)
        snapshot = await self.app.apply_document(doc, source, versions)
        self.source = source
        self._first_config.set()
        return snapshot

    async def rebase(self, doc: dict, source: str) -> Snapshot:
        """A new bootstrap (SIGHUP, POST /config): merge the live resources onto it."""
        if doc.get("control") != self.base_doc.get("control"):
            errors = [("control", "changing the control section needs a restart")]
            self.app.record_rejection(source, errors)
            raise UpdateRejected(errors)
        async with self._lock:
            if all(st.accepted for st in self.types.values()):
                snapshot = await self._apply({t: st.accepted.resources for t, st in self.types.items()},
                                             {t: st.accepted.version_info for t, st in self.types.items()},
                                             source, base=doc)
            else:
                snapshot = await self.app.apply_document(doc, source)
            self.base_doc = doc
            return snapshot

    def _save_cache(self, resources: dict, versions: dict) -> None:
        if not self.control.cache:
            return
        try:
            cache.save(self.control.cache, versions, resources)
        except OSError as exc:
            log.warning("cannot write the config cache", extra={"fields": {
                "path": self.control.cache, "error": exc.strerror or str(exc)}})

    # --- start-up fallback to the cache

    async def _fallback(self) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self._first_config, self._unreachable)]
        await asyncio.wait(waits, timeout=self.control.initial_fetch_timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        if self._first_config.is_set() or not self.control.cache:
            return
        try:
            cached = cache.load(self.control.cache)
        except cache.CacheError as exc:
            self.cache_error = str(exc)
            log.error("the config cache is unusable", extra={"fields": {"error": str(exc)}})
            return
        if cached is None:
            self.cache_error = f"no cache at {self.control.cache}"
            return
        versions, resources, saved_at = cached
        async with self._lock:
            if self._first_config.is_set():
                return  # the server answered meanwhile
            try:
                await self._apply(resources, versions, "cache")
            except UpdateRejected as exc:
                self.cache_error = "; ".join(f"{p}: {m}" for p, m in exc.errors)[:MAX_ERROR_DETAIL]
                return
            for t, st in self.types.items():
                if st.accepted is None:
                    st.accepted = protocol.DiscoveryResponse(t, versions[t], resources[t], nonce="")
            self._all_seen.set()
        log.warning("serving the cached config: the control server is not answering", extra={"fields": {
            "server": self.control.server, "cache": self.control.cache,
            "cache_age_s": round(time.time() - saved_at, 1)}})

    # --- introspection

    def status(self) -> dict:
        return {
            "server": self.control.server,
            "connected": all(st.connected for st in self.types.values()),
            "source": self.source,
            "cache": self.control.cache,
            "cache_error": self.cache_error,
            "types": {t: {"version": st.accepted.version_info if st.accepted else None,
                          "pending_version": st.candidate.version_info if st.candidate else None,
                          "connected": st.connected,
                          "last_nack": st.last_nack}
                      for t, st in self.types.items()},
        }

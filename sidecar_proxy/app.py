"""The daemon: startup -> serve -> drain -> shutdown.

Signals: SIGHUP reloads the config file; SIGTERM and SIGINT drain then exit
0. Draining fails readiness first, then closes the listening sockets, then
waits for in-flight connections up to the drain time and resets what is
left. Config updates (file, SIGHUP, POST /config) are serialised by one
lock so snapshot versions follow the order in which they went live.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from pathlib import Path

from . import compiled
from .config import load
from .config.model import Config
from .config.snapshot import Snapshot, SnapshotStore, UpdateRejected
from .control.client import ControlClient
from .limits import raise_fd_limit
from .telemetry.metrics import Metrics
from .transport.listeners import ListenerManager

log = logging.getLogger("sidecar_proxy.app")

# How often the drain loop looks at the connection count.
_DRAIN_POLL_S = 0.05


class App:
    def __init__(self, *, config_path: Path | None, drain_time: float) -> None:
        self.config_path = config_path
        self.drain_time = drain_time
        self.metrics = Metrics()
        self.store = SnapshotStore()
        self.loop = asyncio.get_running_loop()
        self.listeners = ListenerManager(self.loop, self.metrics)
        self.store.add_participant(self.listeners)
        self.store.watch(self.metrics.snapshot_applied)
        self.metrics.watch_tcp(lambda: list(self.listeners.states.values()))
        self.metrics.watch_clusters(lambda: list(self.listeners.cluster_states.states.values()))
        self.metrics.watch_identity(lambda: self.listeners.mesh)
        self.draining = False
        self.started_at = time.time()
        self._update_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._drain_task: asyncio.Task | None = None
        self.last_reload_error: dict | None = None
        self.control: ControlClient | None = None
        # Computed at scrape time: a stored copy went stale when readiness
        # changed without an apply (the control server's first config).
        self.metrics.ready.set_function(lambda: 1.0 if self.is_ready()[0] else 0.0)
        self.metrics.loop_tasks.set_function(lambda: len(asyncio.all_tasks(self.loop)))
        self.metrics.config_age.set_function(
            lambda: time.time() - self.store.current.loaded_at if self.store.current else 0.0)

    # --- config

    async def apply(self, config: Config, source: str, versions: dict[str, str] | None = None) -> Snapshot:
        """Make ``config`` live or raise UpdateRejected; the old one stays on failure."""
        async with self._update_lock:
            try:
                snapshot = await self.store.apply(config, source, versions)
            except UpdateRejected as exc:
                self.record_rejection(source, exc.errors)
                raise
        self.metrics.config_reloads.labels(source=source, result="applied").inc()
        log.info("config applied", extra={"fields": {
            "version": snapshot.version, "digest": snapshot.digest[:12], "source": source,
            "listeners": len(config.listeners), "clusters": len(config.clusters)}})
        return snapshot

    def record_rejection(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.metrics.config_reloads.labels(source=source, result="rejected").inc()
        self.last_reload_error = {"source": source, "at": time.time(),
                                  "errors": [{"path": p, "error": m} for p, m in errors]}
        log.error("config rejected; the live config is unchanged", extra={"fields": {
            "source": source, "errors": "; ".join(f"{p}: {m}" if p else m for p, m in errors)}})

    def _rejection(self, source: str, exc: load.ConfigError) -> UpdateRejected:
        self.record_rejection(source, exc.errors)
        return UpdateRejected(exc.errors)

    async def apply_document(self, doc: dict, source: str, versions: dict[str, str] | None = None) -> Snapshot:
        try:
            config = load.build(doc)
        except load.ConfigError as exc:
            raise self._rejection(source, exc) from None
        return await self.apply(config, source, versions)

    async def apply_text(self, text: bytes | str, source: str) -> Snapshot:
        """A new config file or POST /config body.

        With a control server it replaces the bootstrap: the resources from
        the server are merged onto it again.
        """
        try:
            doc = load.parse_text(text)
        except load.ConfigError as exc:
            raise self._rejection(source, exc) from None
        if self.control is not None:
            return await self.control.rebase(doc, source)
        return await self.apply_document(doc, source)

    async def reload_file(self, source: str = "sighup") -> None:
        path = self.config_path or load.default_config_path()
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.record_rejection(source, [("", f"cannot read {path}: {exc.strerror or exc}")])
            return
        try:
            await self.apply_text(data, source)
        except UpdateRejected:
            pass  # logged and counted by apply_text / apply

    # --- readiness, drain, stop

    def is_ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.store.current is None:
            return False, "no config loaded yet"
        if self.control is not None and not self.control.ready:
            return False, self.control.waiting_reason()
        missing = set(self.store.current.config.listeners) - set(self.listeners.bound_addresses())
        if missing:
            return False, f"listeners not bound: {', '.join(sorted(missing))}"
        return True, "ready"

    def begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        self.draining = True
        self.metrics.draining.set(1)
        self.listeners.stop_accepting()
        active = self.listeners.active_count()
        log.info("draining", extra={"fields": {"active_connections": active, "drain_time_s": self.drain_time}})
        deadline = self.loop.time() + self.drain_time
        while self.listeners.active_count() and self.loop.time() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        left = self.listeners.active_count()
        if left:
            self.listeners.abort_all("drain_timeout")
            log.warning("drain time over; reset the remaining connections",
                        extra={"fields": {"connections": left}})
        else:
            log.info("drained", extra={"fields": {"active_connections": 0}})

    def request_stop(self) -> None:
        """Drain, then leave run() with exit code 0."""
        self.begin_drain()
        self._stop.set()

    async def run(self, initial: Config, admin_server) -> int:
        fd_limit = raise_fd_limit()
        # First thing: a SIGTERM during start-up must still end in a clean exit.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self.loop.create_task(self.reload_file()))
        try:
            await admin_server.start(initial.admin.address, initial.admin.port)
        except OSError as exc:
            log.error("cannot bind the admin endpoint", extra={"fields": {
                "address": f"{initial.admin.address}:{initial.admin.port}", "error": exc.strerror or str(exc)}})
            return 1
        try:
            await self.apply(initial, "file" if self.config_path else "default")
        except UpdateRejected:
            admin_server.close()
            if self._stop.is_set():
                # SIGTERM during start-up: the drain refused the config; a clean stop.
                await self._drain_task
                return 0
            return 1
        if initial.control is not None:
            # The file is the bootstrap; the server's resources are merged onto it.
            self.control = ControlClient(self, initial.control, initial.node.id, dict(initial.source_document))
            self.control.start()
        # Start-up objects (modules, config, compiled routes) live for the
        # whole run: moved out of the collector's sight, a full collection
        # no longer walks them on the request path.
        gc.collect()
        gc.freeze()
        log.info("ready", extra={"fields": {"admin": f"{initial.admin.address}:{initial.admin.port}",
                                            "fd_limit": fd_limit, "data_path": compiled.status()["data_path"]}})
        await self._stop.wait()
        if self.control is not None:
            await self.control.stop()
        await self._drain_task
        await self.listeners.telemetry.close()  # flush spans and access-log lines (bounded)
        admin_server.close()
        log.info("exiting", extra={"fields": {"uptime_s": round(time.time() - self.started_at, 1)}})
        return 0

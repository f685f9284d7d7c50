"""The process's telemetry across config snapshots: HTTP histograms, tracing, the access log, the scrape port.

Owned by the listener manager and staged like a snapshot: ``prepare`` builds
what a new ``telemetry`` section needs (a Tracing, an AccessLog, a bound
scrape listener; a bind failure refuses the config with the field's path),
``commit`` swaps it in and retires the old pieces off the event loop (a
tracing shutdown flushes to a collector that may be slow), ``abort`` drops
what was staged. Unchanged settings keep their objects, so a reload does
not restart the exporter or lose queued lines.

Turning a part off takes it off the hot path: the per-snapshot view
(:class:`TelemetryView`) holds None for it and the exchange tests one
attribute.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..config.model import Telemetry
from ..config.snapshot import UpdateRejected
from .access_log import AccessLog
from .counters import TelemetryCollector
from .http_metrics import HttpMetrics, RequestRecorder

log = logging.getLogger("sidecar_proxy.telemetry")


@dataclass
class Staged:
    options: Telemetry
    tracing: object | None
    access_log: AccessLog | None
    scrape: object | None        # an AdminServer serving /metrics only, or None
    new: list                    # the pieces made by this prepare (retired on abort)


class TelemetryView:
    """What the request path of one listener under one snapshot uses (None: that part is off)."""

    __slots__ = ("tracing", "access_log", "recorders", "timing", "epoch")

    def __init__(self, http: HttpMetrics | None, listener: str, clusters, tracing, access_log) -> None:
        self.tracing = tracing
        self.access_log = access_log
        # One recorder per cluster, "none" for what the proxy answered itself; bound once here.
        self.recorders: dict[str, RequestRecorder] | None = None
        if http is not None:
            self.recorders = {name: http.recorder(listener, name) for name in clusters}
            self.recorders[""] = http.recorder(listener, "none")
        # Whether a request must read the clock at all.
        self.timing = http is not None or access_log is not None
        # perf_counter() + epoch = wall-clock seconds (one time.time() per snapshot, not per request).
        self.epoch = time.time() - time.perf_counter()


class TelemetryPipeline:
    def __init__(self, loop: asyncio.AbstractEventLoop, registry, scrape_routes: Callable[[], dict]) -> None:
        self.loop = loop
        self.http = HttpMetrics(registry)
        self.options: Telemetry | None = None
        self.tracing = None
        self.access_log: AccessLog | None = None
        self.scrape = None
        self._scrape_routes = scrape_routes
        registry.register(TelemetryCollector(lambda: self.tracing, lambda: self.access_log))

    # --- staging

    async def prepare(self, options: Telemetry) -> Staged:
        old = self.options
        new: list = []
        tracing = self.tracing
        if old is None or options.tracing != old.tracing:
            tracing = self._make_tracing(options)
            if tracing is not None:
                new.append(tracing)
        access_log = self.access_log
        if old is None or options.access_log != old.access_log:
            access_log = AccessLog(options.access_log.format) if options.access_log.enabled else None
            if access_log is not None:
                new.append(access_log)
        scrape = self.scrape
        m, old_m = options.metrics, old.metrics if old is not None else None
        wanted = m.enabled and m.port != 0
        if old_m is None or (m.enabled, m.port, m.address) != (old_m.enabled, old_m.port, old_m.address):
            scrape = None
            if wanted:
                from ..admin.server import AdminServer
                scrape = AdminServer(self._scrape_routes())
                try:
                    await scrape.start(m.address, m.port)
                except OSError as exc:
                    self._flush_off_loop(new)
                    raise UpdateRejected([("telemetry.metrics.port",
                                           f"cannot bind {m.address}:{m.port}: {exc.strerror or exc}")]) from None
                new.append(scrape)
        return Staged(options, tracing, access_log, scrape, new)

    def commit(self, staged: Staged) -> None:
        if self.scrape is not None and self.scrape is not staged.scrape:
            self.scrape.close()
        self._flush_off_loop([piece for piece in (self.tracing, self.access_log)
                              if piece is not None and piece not in (staged.tracing, staged.access_log)])
        self.options = staged.options
        self.tracing, self.access_log, self.scrape = staged.tracing, staged.access_log, staged.scrape

    def abort(self, staged: Staged) -> None:
        if staged.scrape is not None and staged.scrape in staged.new:
            staged.scrape.close()
        self._flush_off_loop([piece for piece in staged.new if piece is not staged.scrape])

    def view(self, listener: str, clusters, options: Telemetry, staged: Staged) -> TelemetryView:
        return TelemetryView(self.http if options.metrics.enabled else None, listener, clusters, staged.tracing,
                             staged.access_log)

    async def close(self, timeout: float = 3.0) -> None:
        """At exit: flush spans and log lines (bounded), close the scrape listener."""
        if self.scrape is not None:
            self.scrape.close()
        pieces = [p for p in (self.tracing, self.access_log) if p is not None]
        self.tracing = self.access_log = self.scrape = None
        await self.loop.run_in_executor(None, _flush_all, pieces, timeout)

    # --- internals

    def _make_tracing(self, options: Telemetry):
        if not options.tracing.enabled:
            return None
        from .tracing import Tracing, resolve  # the SDK costs memory: only when tracing is on
        settings = resolve(options.tracing)
        for warning in settings.warnings:
            log.warning("tracing setting", extra={"fields": {"warning": warning}})
        if not settings.enabled:
            return None
        return Tracing(settings)

    def _flush_off_loop(self, pieces: list) -> None:
        """Retire a Tracing or an AccessLog: both flush (bounded, possibly to a slow collector) in a thread."""
        if pieces:
            self.loop.run_in_executor(None, _flush_all, pieces, 3.0)


def scrape_routes(render: Callable[[str], tuple[bytes, str]]) -> dict:
    """The dedicated scrape listener's one route: /metrics, negotiated like the admin endpoint's."""
    from ..admin.server import Response

    async def scrape(req) -> Response:
        body, content_type = render(req.headers.get("accept", ""))
        return Response(200, body, content_type)

    return {"/metrics": {"GET": scrape}}


def _flush_all(pieces: list, timeout: float) -> None:
    for piece in pieces:
        try:
            if isinstance(piece, AccessLog):
                piece.close(timeout)
            else:
                piece.shutdown(timeout)   # a Tracing
        except Exception:  # retiring must not fail a reload or the exit
            log.exception("closing a telemetry part failed")

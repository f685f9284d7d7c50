"""Prometheus series for telemetry's own health: spans dropped or lost, access log lines dropped.

The counters are plain ints on the Tracing, its span processor and the AccessLog (each written by
one thread); this collector reads them at scrape time, so recording costs the hot path nothing.
Register it once: ``registry.register(TelemetryCollector(lambda: tracing, lambda: access_log))``
(callables, so a restart of either after a reload is picked up).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class TelemetryCollector:
    def __init__(self, tracing: Callable[[], object | None], access_log: Callable[[], object | None]) -> None:
        self._tracing = tracing
        self._access_log = access_log

    def collect(self):
        out = []
        tracing = self._tracing()
        if tracing is not None:
            p = tracing.processor
            sampled = CounterMetricFamily("sidecar_tracing_traces_sampled",
                                          "Requests traced (a SERVER span started), by the sampler's decision "
                                          "or an incoming sampled context.")
            sampled.add_metric([], tracing.sampled)
            spans = CounterMetricFamily("sidecar_tracing_spans",
                                        "Finished spans by fate: exported (the collector accepted them), "
                                        "dropped (the export queue was full), failed (the collector refused or "
                                        "did not answer).", labels=["result"])
            spans.add_metric(["exported"], p.exported)
            spans.add_metric(["dropped"], p.dropped)
            spans.add_metric(["failed"], p.export_failures)
            queued = GaugeMetricFamily("sidecar_tracing_queue_spans", "Finished spans waiting for export now.")
            queued.add_metric([], p.queued)
            limit = GaugeMetricFamily("sidecar_tracing_queue_limit_spans",
                                      "Spans the export queue holds before it drops.")
            limit.add_metric([], p.max_queue_size)
            out += [sampled, spans, queued, limit]
        access_log = self._access_log()
        if access_log is not None:
            lines = CounterMetricFamily("sidecar_access_log_lines",
                                        "Access log lines by fate: written to stdout, dropped (the buffer was "
                                        "full: stdout is not keeping up), write_error (stdout failed).",
                                        labels=["result"])
            lines.add_metric(["written"], access_log.written)
            lines.add_metric(["dropped"], access_log.dropped)
            lines.add_metric(["write_error"], access_log.write_errors)
            pending = GaugeMetricFamily("sidecar_access_log_buffered_bytes", "Access log bytes waiting for stdout.")
            pending.add_metric([], access_log.pending_bytes)
            out += [lines, pending]
        return out

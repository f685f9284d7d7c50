"""CPU cost of the telemetry building blocks per request: ``python3 tests/telemetry/bench_telemetry.py``.

Not a test (pytest does not collect it): it prints microseconds per call, best of a few runs, for
what the exchange would call once per request. Spans go to an exporter that encodes them to OTLP
protobuf as the real one does and sends them nowhere, so the figures are the loop thread's cost plus
the export thread's share of the CPU (process time is measured, not wall time), which is what the
issue's per-request budgets count; the HTTP request to a collector is not included.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

from sidecar_proxy.telemetry.access_log import AccessLog  # noqa: E402
from sidecar_proxy.telemetry.histogram import HistogramFamily  # noqa: E402
from sidecar_proxy.telemetry.http_metrics import HttpMetrics  # noqa: E402
from sidecar_proxy.telemetry.tracing import Tracing, TracingSettings  # noqa: E402

HEADERS = [(b"host", b"api.shop.svc.cluster.local:8080"), (b"user-agent", b"curl/8.5.0"), (b"accept", b"*/*"),
           (b"x-request-id", b"8e1c4d2a-1b2c-4d3e-8f90-000000000001"), (b"content-type", b"application/json")]
UNSAMPLED_PARENT = HEADERS + [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]
SAMPLED_PARENT = HEADERS + [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                            (b"tracestate", b"congo=t61rcWkgMzE")]


class Discard(SpanExporter):
    """Encodes each batch as OTLPSpanExporter does (the CPU an export costs) and sends it nowhere."""

    def export(self, spans):
        encode_spans(spans).SerializePartialToString()
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


def per_call(fn, n: int, repeat: int = 5) -> float:
    """Microseconds of process CPU per call, best of ``repeat`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n)
    return best * 1e6


def bench_tracing(results: dict) -> None:
    def tracing(ratio: float, **kw) -> Tracing:
        return Tracing(TracingSettings(enabled=True, ratio=ratio, max_queue_size=1 << 20, schedule_delay=0.2),
                       exporter=Discard(), **kw)

    off = tracing(0.0)
    results["begin, unsampled, no incoming context (injects a fresh -00 traceparent)"] = per_call(
        lambda: off.begin(HEADERS), 200_000)
    quiet = tracing(0.0, inject_unsampled=False)
    results["begin, unsampled, no incoming context, no injection"] = per_call(lambda: quiet.begin(HEADERS), 200_000)
    results["begin, unsampled incoming traceparent (-00: forwarded unchanged)"] = per_call(
        lambda: off.begin(UNSAMPLED_PARENT), 200_000)

    def unsampled_request(t=off):
        trace = t.begin(HEADERS)
        if trace is not None:
            trace.client_attempt("api", "10.0.0.5", 8080)
            trace.finish(200, "-")
    results["unsampled request, lead's calls (begin + client_attempt + finish)"] = per_call(unsampled_request, 200_000)

    on = tracing(1.0)

    def sampled_request(headers=HEADERS):
        trace = on.begin(headers)
        trace.request(b"GET", b"/api/v1/items", b"api.shop.svc.cluster.local:8080", user_agent=b"curl/8.5.0",
                      client_address="10.0.0.9")
        span, lines = trace.client_attempt("api", "10.0.0.5", 8080)
        trace.end_attempt(span, 200)
        trace.finish(200, "-", route="items", cluster="api")
    def flushed(fn):
        def run():
            fn()
            on.force_flush()   # so the export thread's encoding is inside the measured process time
        return run
    results["sampled request, root (begin + request + 1 attempt + finish + OTLP encoding)"] = per_call(
        flushed(lambda: [sampled_request() for _ in range(100)]), 50) / 100
    results["sampled request, incoming sampled traceparent + tracestate (+ encoding)"] = per_call(
        flushed(lambda: [sampled_request(SAMPLED_PARENT) for _ in range(100)]), 50) / 100
    at1 = tracing(0.01)

    def one_percent():
        trace = at1.begin(HEADERS)
        if trace is not None:
            trace.request(b"GET", b"/api/v1/items", b"api:8080")
            span, lines = trace.client_attempt("api", "10.0.0.5", 8080)
            trace.end_attempt(span, 200)
            trace.finish(200, "-", route="items", cluster="api")
    results["average request at 1 % sampling (+ encoding)"] = per_call(
        lambda: [one_percent() for _ in range(10_000)] and at1.force_flush(), 20) / 10_000
    for t in (off, quiet, on, at1):
        t.shutdown(1.0)


def bench_metrics(results: dict) -> None:
    from prometheus_client import CollectorRegistry
    child = HistogramFamily("bench_seconds", "b", ["x"]).labels("a")
    results["histogram observe"] = per_call(lambda: child.observe(0.0004), 500_000)
    rec = HttpMetrics(CollectorRegistry()).recorder("out", "api")
    results["HttpMetrics recorder.record (4 histograms)"] = per_call(
        lambda: rec.record(200, 0.0004, 0.0002, 0, 1234), 500_000)


def bench_access_log(results: dict) -> None:
    record = (time.time(), b"GET", b"/api/v1/items?id=42", b"HTTP/1.1", 200, "-", 0, 1234, 3.2, 2.1,
              b"8e1c4d2a-1b2c-4d3e-8f90-000000000001", b"api.shop.svc:8080", "10.0.0.5:8080", "api-route", "api",
              "10.0.0.9:51234", None, None, b"curl/8.5.0", None)
    with open(os.devnull, "w") as devnull:
        for fmt in ("text", "json"):
            log = AccessLog(fmt, devnull, max_buffer_bytes=1 << 30)
            results[f"access log {fmt}: format + enqueue + the writer thread's share"] = per_call(
                lambda: log.log(record), 200_000)
            log.close()


def main() -> dict:
    results: dict[str, float] = {}
    bench_metrics(results)
    bench_access_log(results)
    bench_tracing(results)
    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.2f} us")
    return results


if __name__ == "__main__":
    main()

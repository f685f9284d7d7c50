"""telemetry: metrics, access log, tracing.

- ``metrics``: the process registry and the counters read at scrape time.
- ``histogram``, ``http_metrics``: lock-free per-request histograms (duration, upstream time, body sizes).
- ``access_log``: one line per request on stdout, written by a thread, dropped (and counted) when stdout lags.
- ``propagation``, ``tracing``, ``span_export``: OpenTelemetry spans, W3C/B3 context, OTLP/HTTP export
  (import ``tracing`` only when tracing is on: it loads the SDK, ~1.6 MiB, and its exporter ~3 MiB more).
- ``counters``: Prometheus series for telemetry's own drops and failures.
"""

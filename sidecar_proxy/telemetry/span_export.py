"""A span processor with a bounded queue that drops and counts, exporting from its own thread.

Why not the SDK's BatchSpanProcessor: when its queue is full it drops and
logs, but counts nothing a metric can show, and a full queue is exactly what
an operator must see (a dead or slow collector). Here ``on_end`` is a length
check and a deque append on the thread that ends the span (the event loop);
a full queue increments ``dropped`` and returns. A daemon thread wakes every
``schedule_delay`` seconds, or as soon as a batch is full, and hands batches
to the exporter; encoding and the HTTP request happen there, never on the
loop. (Under the GIL the thread still competes for CPU: OTLP encoding takes
about 40 us per span, so at 1 % of 30,000 requests/s, two spans each, about
2.4 % of a core; tests/telemetry/bench_telemetry.py measures it.)

A stalled collector holds the export thread for the exporter's timeout
(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, 10 s) per batch; meanwhile the queue
fills and spans are dropped, never waited for. Failed batches are counted
in ``export_failures`` (spans) and logged at most once a minute with the
exporter's reason.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("sidecar_proxy.tracing")

FAILURE_LOG_INTERVAL = 60.0
# The exporter's own logger: its per-batch errors are kept for our throttled line instead of
# reaching stderr unformatted once per batch.
EXPORTER_LOGGER = "opentelemetry.exporter"


class _LastMessage(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.last = record.getMessage()[:300]
        except Exception:  # noqa: BLE001 - a broken log record must not break the export thread
            self.last = str(record.msg)[:300]


def _exporter_messages() -> _LastMessage:
    """The handler that keeps the exporter's messages, attached once to its logger and never removed: the
    export thread may still log (an abandoned retry) after a processor shut down, and must not reach stderr."""
    logger = logging.getLogger(EXPORTER_LOGGER)
    for handler in logger.handlers:
        if isinstance(handler, _LastMessage):
            return handler
    handler = _LastMessage()
    logger.addHandler(handler)
    logger.propagate = False
    return handler


class BoundedSpanProcessor(SpanProcessor):
    """``on_end`` from one thread (the event loop); ``shutdown``/``force_flush`` from any."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int = 2048, max_export_batch_size: int = 512,
                 schedule_delay: float = 5.0) -> None:
        if max_queue_size < 1 or max_export_batch_size < 1 or schedule_delay <= 0:
            raise ValueError("queue size, batch size and schedule delay must be positive")
        self._exporter = exporter
        self.max_queue_size = max_queue_size
        self._batch = min(max_export_batch_size, max_queue_size)
        self._delay = schedule_delay
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self.dropped = 0            # spans refused because the queue was full (span-ending thread)
        self.exported = 0           # spans the collector accepted (export thread)
        self.export_failures = 0    # spans in batches the exporter gave up on (export thread)
        self._kicked = False
        self._stopping = False
        self._stopped = False
        self._wake = threading.Event()
        self._flushes: list[threading.Event] = []
        self._flush_lock = threading.Lock()
        self._last_failure_log = 0.0
        self._failures_unlogged = 0
        self._reason = _exporter_messages()
        self._thread = threading.Thread(target=self._run, name="sidecar-span-export", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # --- the span-ending thread

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self.max_queue_size or self._stopping:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) >= self._batch and not self._kicked:
            self._kicked = True
            self._wake.set()

    # --- the export thread

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._kicked = False
            with self._flush_lock:
                flushes, self._flushes = self._flushes, []
            self._export_queued()
            for done in flushes:
                done.set()
            if self._stopping:
                return

    def _export_queued(self) -> None:
        queue = self._queue
        while queue:
            batch = []
            while queue and len(batch) < self._batch:
                batch.append(queue.popleft())
            try:
                ok = self._exporter.export(batch) is SpanExportResult.SUCCESS
            except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the thread
                self._reason.last = f"{type(exc).__name__}: {exc}"[:300]
                ok = False
            if ok:
                self.exported += len(batch)
            else:
                self.export_failures += len(batch)
                self._log_failure(len(batch))

    def _log_failure(self, spans: int) -> None:
        self._failures_unlogged += spans
        now = time.monotonic()
        if now - self._last_failure_log < FAILURE_LOG_INTERVAL and self._last_failure_log:
            return
        self._last_failure_log = now
        log.warning("span export failed", extra={"fields": {
            "spans_lost": self._failures_unlogged, "reason": self._reason.last or "unknown",
            "dropped_queue_full": self.dropped}})
        self._failures_unlogged = 0

    # --- control

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export what is queued now; False when that took longer than the timeout."""
        if self._stopped:
            return True
        done = threading.Event()
        with self._flush_lock:
            self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout_millis / 1000)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (up to ``timeout``), then stop; spans ending later are dropped.

        A collector that does not answer cannot hold this longer than ``timeout``: the exporter is
        shut down (which abandons its retries) and the daemon thread left to its request timeout.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        try:
            self._exporter.shutdown()
        except Exception:  # noqa: BLE001
            pass

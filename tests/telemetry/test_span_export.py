"""The bounded span processor on its own: bounds, batching, failures counted and logged once, shutdown."""
import logging
import threading
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar_proxy.telemetry.span_export import BoundedSpanProcessor


class Recording(SpanExporter):
    """Keeps batch sizes; ``result`` or ``raises`` decides the outcome, ``gate`` can hold an export."""

    def __init__(self, result=SpanExportResult.SUCCESS, raises=None, gate=None):
        self.batches = []
        self.result = result
        self.raises = raises
        self.gate = gate
        self.shut = False

    def export(self, spans):
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(len(spans))
        if self.raises:
            raise self.raises
        return self.result

    def shutdown(self):
        self.shut = True


def tracer_with(processor):
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider.get_tracer("test")


def end_spans(tracer, n):
    for i in range(n):
        tracer.start_span(f"s{i}").end()


def test_batches_are_bounded_and_everything_is_exported():
    exporter = Recording()
    p = BoundedSpanProcessor(exporter, max_queue_size=1000, max_export_batch_size=7, schedule_delay=60)
    end_spans(tracer_with(p), 50)
    assert p.force_flush(5000)
    assert sum(exporter.batches) == 50 and max(exporter.batches) <= 7
    assert (p.exported, p.dropped, p.export_failures, p.queued) == (50, 0, 0, 0)
    p.shutdown()
    assert exporter.shut


def test_a_full_batch_wakes_the_exporter_before_the_schedule():
    exporter = Recording()
    p = BoundedSpanProcessor(exporter, max_queue_size=100, max_export_batch_size=10, schedule_delay=60)
    end_spans(tracer_with(p), 10)
    deadline = time.monotonic() + 5
    while p.exported < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.exported == 10
    p.shutdown()


def test_a_full_queue_drops_and_counts_without_waiting():
    gate = threading.Event()
    exporter = Recording(gate=gate)
    p = BoundedSpanProcessor(exporter, max_queue_size=10, max_export_batch_size=5, schedule_delay=0.01)
    tracer = tracer_with(p)
    end_spans(tracer, 5)
    deadline = time.monotonic() + 5
    while p.queued and time.monotonic() < deadline:   # the export thread took the batch and hangs on the gate
        time.sleep(0.01)
    start = time.perf_counter()
    end_spans(tracer, 100)
    assert time.perf_counter() - start < 1
    assert p.queued == 10 and p.dropped == 90
    gate.set()
    assert p.force_flush(5000)
    assert p.exported == 15 and p.dropped == 90
    p.shutdown()


def test_unsampled_spans_are_ignored():
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    exporter = Recording()
    p = BoundedSpanProcessor(exporter, schedule_delay=60)
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(p)
    end_spans(provider.get_tracer("t"), 5)
    p.force_flush(1000)
    assert exporter.batches == [] and p.queued == 0
    p.shutdown()


@pytest.mark.parametrize("exporter", [Recording(result=SpanExportResult.FAILURE),
                                      Recording(raises=RuntimeError("boom"))], ids=["failure", "raises"])
def test_failures_are_counted_and_logged_at_most_once_a_minute(exporter, caplog):
    p = BoundedSpanProcessor(exporter, max_queue_size=100, max_export_batch_size=2, schedule_delay=60)
    tracer = tracer_with(p)
    with caplog.at_level(logging.WARNING, logger="sidecar_proxy.tracing"):
        for _ in range(3):
            end_spans(tracer, 4)
            assert p.force_flush(5000)
    assert p.export_failures == 12 and p.exported == 0
    lines = [r for r in caplog.records if r.name == "sidecar_proxy.tracing"]
    assert len(lines) == 1 and lines[0].fields["spans_lost"] == 2
    if exporter.raises:
        assert "boom" in lines[0].fields["reason"]
    # The export thread survived: a later batch still goes out.
    exporter.result, exporter.raises = SpanExportResult.SUCCESS, None
    end_spans(tracer, 1)
    assert p.force_flush(5000) and p.exported == 1
    p.shutdown()


def test_shutdown_is_bounded_by_its_timeout_and_idempotent():
    gate = threading.Event()
    p = BoundedSpanProcessor(Recording(gate=gate), schedule_delay=0.01)
    tracer = tracer_with(p)
    end_spans(tracer, 3)
    time.sleep(0.1)
    start = time.monotonic()
    p.shutdown(0.2)
    assert time.monotonic() - start < 2
    p.shutdown(0.2)
    end_spans(tracer, 3)
    assert p.dropped == 3 and p.force_flush(10)
    gate.set()


@pytest.mark.parametrize("kw", [{"max_queue_size": 0}, {"max_export_batch_size": 0}, {"schedule_delay": 0}])
def test_invalid_bounds_are_refused(kw):
    with pytest.raises(ValueError):
        BoundedSpanProcessor(Recording(), **kw)

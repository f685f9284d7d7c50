"""The lock-free histograms: bucketing, exposition through prometheus-client, promtool's verdict."""
import math
import random
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OM_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from sidecar_proxy.telemetry.counters import TelemetryCollector
from sidecar_proxy.telemetry.histogram import DURATION_BUCKETS, SIZE_BUCKETS, HistogramFamily
from sidecar_proxy.telemetry.http_metrics import CODE_CLASSES, HttpMetrics
from sidecar_proxy.telemetry.metrics import Metrics

from ..support import require_tools


def samples(text: str, name: str) -> dict:
    """{(sample name, sorted labels): value} of one family of a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_bucketing_matches_prometheus_client_histogram():
    """Same buckets, same observations -> the same exposition as prometheus-client's own Histogram."""
    ours_reg, theirs_reg = CollectorRegistry(), CollectorRegistry()
    ours = HistogramFamily("t_seconds", "t", ["k"], DURATION_BUCKETS)
    ours_reg.register(ours)
    theirs = Histogram("t_seconds", "t", ["k"], buckets=DURATION_BUCKETS, registry=theirs_reg)
    rng = random.Random(7)
    # Exact bounds too: le means "less than or equal".
    values = [rng.lognormvariate(-7, 3) for _ in range(5000)] + list(DURATION_BUCKETS) + [0.0, 1e9]
    for v in values:
        ours.labels("a").observe(v)
        theirs.labels("a").observe(v)
    a = samples(generate_latest(ours_reg).decode(), "t_seconds")
    b = {k: v for k, v in samples(generate_latest(theirs_reg).decode(), "t_seconds").items()
         if not k[0].endswith("_created")}
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-9), key
    assert a[("t_seconds_count", (("k", "a"),))] == len(values)


def test_exposition_is_cumulative_with_inf_count_and_sum():
    family = HistogramFamily("req_seconds", "r", ["listener"], (0.001, 0.01, 0.1))
    child = family.labels("out")
    for v in (0.0005, 0.001, 0.002, 0.05, 5.0):
        child.observe(v)
    registry = CollectorRegistry()
    registry.register(family)
    got = samples(generate_latest(registry).decode(), "req_seconds")
    bucket = {dict(labels)["le"]: value for (name, labels), value in got.items() if name == "req_seconds_bucket"}
    assert bucket == {"0.001": 2, "0.01": 3, "0.1": 4, "+Inf": 5}
    assert got[("req_seconds_count", (("listener", "out"),))] == 5
    assert got[("req_seconds_sum", (("listener", "out"),))] == pytest.approx(5.0535)
    assert child.count == 5


def test_children_are_bound_once_and_unobserved_ones_are_not_exposed():
    family = HistogramFamily("x_seconds", "x", ["a", "b"])
    assert family.labels("1", "2") is family.labels("1", "2")
    family.labels("never", "used")
    family.labels("1", "2").observe(0.1)
    registry = CollectorRegistry()
    registry.register(family)
    text = generate_latest(registry).decode()
    assert 'a="1"' in text and "never" not in text
    family.remove("1", "2")
    assert "x_seconds_bucket" not in generate_latest(registry).decode()
    with pytest.raises(ValueError):
        family.labels("only-one")


@pytest.mark.parametrize("name,labels,buckets", [
    ("bad_seconds", [], (1.0, 0.5)),
    ("bad_seconds", [], ()),
    ("bad_seconds", [], (1.0, math.inf)),
    ("bad_count", [], (1.0,)),
    ("bad_seconds", ["le"], (1.0,)),
])
def test_invalid_families_are_refused(name, labels, buckets):
    with pytest.raises(ValueError):
        HistogramFamily(name, "h", labels, buckets)


def test_openmetrics_exposition_parses():
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    rec = metrics.recorder("out", "api")
    rec.record(200, 0.0004, 0.0002, 0, 1234)
    rec.record(503, 0.7, None, 10, 0)
    text = generate_openmetrics(registry).decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    duration = families["sidecar_http_request_duration_seconds"]
    assert duration.type == "histogram"
    count = {tuple(sorted(s.labels.items())): s.value for s in duration.samples
             if s.name == "sidecar_http_request_duration_seconds_count"}
    assert count == {(("cluster", "api"), ("code_class", "2xx"), ("listener", "out")): 1,
                     (("cluster", "api"), ("code_class", "5xx"), ("listener", "out")): 1}
    assert families["sidecar_http_response_body_bytes"].type == "histogram"


def test_recorder_counts_equal_requests_recorded():
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    recorders = {c: metrics.recorder("out", c) for c in ("api", "none")}
    rng = random.Random(3)
    statuses = [200, 201, 204, 301, 404, 429, 500, 503, 0, 101]
    expected = {}
    for _ in range(2000):
        cluster = rng.choice(("api", "none"))
        status = rng.choice(statuses)
        recorders[cluster].record(status, rng.random(), rng.random() if status else None, rng.randrange(1 << 20),
                                  rng.randrange(1 << 20))
        cc = CODE_CLASSES[status // 100] if status else "none"
        expected[(cluster, cc)] = expected.get((cluster, cc), 0) + 1
    got = samples(generate_latest(registry).decode(), "sidecar_http_request_duration_seconds")
    counts = {(dict(l)["cluster"], dict(l)["code_class"]): v for (n, l), v in got.items() if n.endswith("_count")}
    assert counts == expected
    sizes = samples(generate_latest(registry).decode(), "sidecar_http_request_body_bytes")
    assert sum(v for (n, l), v in sizes.items() if n.endswith("_count")) == 2000


def full_registry() -> CollectorRegistry:
    """The process registry with the HTTP histograms and the telemetry counters, as the proxy would serve it."""
    metrics = Metrics()
    http = HttpMetrics(metrics.registry)
    for listener, cluster in (("out", "api"), ("in", "none"), ("out", "payments")):
        rec = http.recorder(listener, cluster)
        for status in (200, 404, 503, 0):
            rec.record(status, 0.0003 * (1 + status % 7), 0.0002 if status else None, 100, 2048)

    class FakeTracing:
        sampled = 3

        class processor:
            exported, dropped, export_failures, queued, max_queue_size = 5, 1, 2, 0, 2048

    class FakeLog:
        written, dropped, write_errors, pending_bytes = 10, 0, 0, 0

    metrics.registry.register(TelemetryCollector(lambda: FakeTracing, lambda: FakeLog))
    return metrics.registry


def histograms_only() -> CollectorRegistry:
    registry = CollectorRegistry()
    rec = HttpMetrics(registry).recorder("out", "api")
    for status in (200, 503, 0):
        rec.record(status, 0.0004, 0.0002, 0, 1234)
    return registry


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_promtool_check_metrics_accepts_the_exposition(openmetrics):
    # Debian's "prometheus" package ships promtool (apt-get install -y prometheus).
    require_tools("promtool")
    # promtool (2.42, Debian 12) lints the Prometheus text format: on OpenMetrics it reads a counter's
    # HELP (on the family name) as belonging to no sample, so that case checks the histograms alone.
    body = generate_openmetrics(histograms_only()) if openmetrics else generate_latest(full_registry())
    run = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    # promtool exits 0 when clean, 3 for lint warnings only (it prints them), 1 for invalid input.
    assert run.returncode == 0, (run.returncode, run.stdout.decode()[-2000:], run.stderr.decode()[-2000:])


def test_telemetry_counters_are_exposed():
    text = generate_latest(full_registry()).decode()
    got = samples(text, "sidecar_tracing_spans")
    assert got[("sidecar_tracing_spans_total", (("result", "dropped"),))] == 1
    assert got[("sidecar_tracing_spans_total", (("result", "failed"),))] == 2
    assert samples(text, "sidecar_access_log_lines")[("sidecar_access_log_lines_total", (("result", "written"),))] == 10
    assert OM_TYPE.startswith("application/openmetrics-text")


def test_size_buckets_cover_empty_bodies_to_hundreds_of_megabytes():
    assert SIZE_BUCKETS[0] == 0 and SIZE_BUCKETS[-1] == 100 << 20
    assert DURATION_BUCKETS[0] == 0.0001 and DURATION_BUCKETS[-1] == 30.0

"""Tracing: sampling decisions, the span tree a real OTLP/HTTP receiver decodes, a bad collector."""
import math
import re
import time

import pytest
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from sidecar_proxy.config import model
from sidecar_proxy.telemetry import propagation
from sidecar_proxy.telemetry.tracing import NotSampled, Trace, Tracing, TracingSettings, resolve, sdk_sampler

from .otlp_receiver import OtlpReceiver

TID = "0af7651916cd43dd8448eb211c80319c"
SID = "b7ad6b7169203331"
HEADERS = [(b"host", b"api.shop:8080"), (b"user-agent", b"curl/8.5.0"), (b"accept", b"*/*")]
FRESH = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-00\r\n\Z")


def tp(flags: str = "01", tid: str = TID, sid: str = SID) -> tuple[bytes, bytes]:
    return (b"traceparent", f"00-{tid}-{sid}-{flags}".encode())


def settings(**kw) -> TracingSettings:
    kw.setdefault("enabled", True)
    kw.setdefault("schedule_delay", 0.05)
    return TracingSettings(**kw)


@pytest.fixture
def collector():
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture
def tracings():
    made = []

    def make(s: TracingSettings, **kw) -> Tracing:
        t = Tracing(s, **kw)
        made.append(t)
        return t
    yield make
    for t in made:
        t.shutdown(1.0)


def one_request(t: Tracing, headers, attempts=((503, None), (200, None)), route="items", status=200, flags="-"):
    """What the exchange does for one request; returns (trace, [(client span, injected lines)])."""
    trace = t.begin(headers)
    if trace is None:
        return None, []
    trace.request(b"GET", b"/api/items", b"api.shop:8080", user_agent=b"curl/8.5.0", client_address="10.0.0.9")
    tries = []
    for i, (code, flag) in enumerate(attempts):
        span, lines = trace.client_attempt("api", f"10.0.0.{5 + i}", 8080, attempt=i)
        tries.append((span, lines))
        trace.end_attempt(span, code, flag)
    trace.finish(status, flags, route=route, cluster="api")
    return trace, tries


# --- the span tree, decoded by a real receiver


def test_span_tree_with_an_incoming_sampled_parent(collector, tracings):
    t = tracings(settings(ratio=0.0, endpoint=collector.endpoint))
    trace, tries = one_request(t, HEADERS + [tp("01"), (b"tracestate", b"congo=t61rcWkgMzE")])
    assert isinstance(trace, Trace) and trace.trace_id == TID
    t.force_flush()
    spans = collector.wait_for_spans(3)
    assert collector.errors == [] and collector.content_types[0] == "application/x-protobuf"
    server = [s for s in spans if s.kind == "SERVER"]
    clients = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.attributes["sidecar.retry_attempt"])
    assert len(server) == 1 and len(clients) == 2
    server = server[0]
    # One trace; the SERVER span is the caller's child; each try is a CLIENT child of it (retries are siblings).
    assert {s.trace_id for s in spans} == {TID}
    assert server.parent_span_id == SID
    assert [c.parent_span_id for c in clients] == [server.span_id] * 2
    assert len({server.span_id, *(c.span_id for c in clients)}) == 3
    # What went upstream on each try names that try's CLIENT span, and carries the tracestate on.
    for client, (_, lines) in zip(clients, tries):
        assert lines == (f"traceparent: 00-{TID}-{client.span_id}-01\r\n".encode()
                         + b"tracestate: congo=t61rcWkgMzE\r\n")
    assert server.start_ns <= clients[0].start_ns <= clients[0].end_ns <= clients[1].start_ns <= server.end_ns
    assert server.name == "GET items" and clients[0].name == "GET"
    assert server.resource["service.name"] == "sidecar-proxy" and server.scope == "sidecar_proxy"


def test_semantic_convention_attributes(collector, tracings):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint))
    one_request(t, HEADERS, attempts=((0, "UF"), (200, None)), flags="-")
    t.force_flush()
    spans = collector.wait_for_spans(3)
    server = next(s for s in spans if s.kind == "SERVER")
    assert server.attributes == {
        "http.request.method": "GET", "url.path": "/api/items", "url.scheme": "http",
        "server.address": "api.shop", "server.port": 8080, "network.protocol.name": "http",
        "network.protocol.version": "1.1", "user_agent.original": "curl/8.5.0", "client.address": "10.0.0.9",
        "sidecar.route": "items", "sidecar.cluster": "api", "http.response.status_code": 200,
        "sidecar.response_flags": "-"}
    assert server.status == "UNSET" and server.parent_span_id == ""
    first, second = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.attributes["sidecar.retry_attempt"])
    assert first.attributes == {
        "http.request.method": "GET", "server.address": "10.0.0.5", "server.port": 8080,
        "network.peer.address": "10.0.0.5", "network.peer.port": 8080, "network.protocol.name": "http",
        "network.protocol.version": "1.1", "sidecar.cluster": "api", "sidecar.retry_attempt": 0,
        "url.full": "http://api.shop:8080/api/items", "error.type": "connect_failure"}
    assert first.status == "ERROR"
    assert second.attributes["http.request.resend_count"] == 1 and second.attributes["http.response.status_code"] == 200
    assert second.status == "UNSET" and "error.type" not in second.attributes


@pytest.mark.parametrize("status,flags,error_type,span_status", [
    (503, "UF,URX", "503", "ERROR"),
    (504, "UT", "504", "ERROR"),
    (404, "NR", None, "UNSET"),      # a 4xx is the client's error, not the server span's
    (429, "RL", None, "UNSET"),
    (0, "DC", "downstream_closed", "ERROR"),
])
def test_server_span_errors(collector, tracings, status, flags, error_type, span_status):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint))
    one_request(t, HEADERS, attempts=(), status=status, flags=flags, route=None)
    t.force_flush()
    (server,) = collector.wait_for_spans(1)
    assert server.name == "GET"
    assert server.attributes.get("error.type") == error_type and server.status == span_status
    assert server.attributes["sidecar.response_flags"] == flags
    assert server.attributes.get("http.response.status_code") == (status or None)


def test_an_explicit_error_type_wins(collector, tracings):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint))
    trace = t.begin([])
    span, _ = trace.client_attempt("api", "10.0.0.5", 443)
    trace.end_attempt(span, 0, "UF", error="tls_handshake")
    trace.finish(503, "UF", error="tls_handshake")
    t.force_flush()
    spans = collector.wait_for_spans(2)
    assert {s.attributes["error.type"] for s in spans} == {"tls_handshake"}
    assert {s.status for s in spans} == {"ERROR"}


def test_other_methods_are_reported_as_other(collector, tracings):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint))
    trace = t.begin([])
    trace.request(b"PURGE", b"/x", None, version=b"1.0")
    trace.finish(200)
    t.force_flush()
    (span,) = collector.wait_for_spans(1)
    assert span.name == "HTTP" and span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PURGE"
    assert span.attributes["network.protocol.version"] == "1.0" and "server.address" not in span.attributes


def test_ipv6_authority(collector, tracings):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint))
    trace = t.begin([])
    trace.request(b"GET", b"/", b"[2001:db8::1]:8443")
    trace.finish(200)
    t.force_flush()
    (span,) = collector.wait_for_spans(1)
    assert (span.attributes["server.address"], span.attributes["server.port"]) == ("2001:db8::1", 8443)


def test_root_trace_ids_and_injection(collector, tracings):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint, service_name="checkout"))
    trace, tries = one_request(t, HEADERS, attempts=((200, None),))
    t.force_flush()
    spans = collector.wait_for_spans(2)
    assert {s.trace_id for s in spans} == {trace.trace_id}
    client = next(s for s in spans if s.kind == "CLIENT")
    m = re.fullmatch(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-(0[13])\r\n", tries[0][1])
    assert m and m.group(1).decode() == trace.trace_id and m.group(2).decode() == client.span_id
    assert spans[0].resource["service.name"] == "checkout"


def test_gzip_headers_and_resource_attributes_from_the_environment(collector, tracings, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=shop")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,k8s.pod.name=web-1")
    t = tracings(resolve(model.TracingOptions(enabled=True, sampling=1.0, endpoint=collector.endpoint)))
    one_request(t, HEADERS)
    t.force_flush()
    spans = collector.wait_for_spans(3)
    assert collector.encodings[0] == "gzip" and collector.headers[0]["x-tenant"] == "shop"
    assert spans[0].resource["deployment.environment"] == "prod" and spans[0].resource["k8s.pod.name"] == "web-1"


# --- sampling decisions


def sampled_count(t: Tracing, n: int, headers=HEADERS) -> int:
    return sum(isinstance(t.begin(headers), Trace) for _ in range(n))


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_the_ratio_is_honoured_within_statistical_bounds(tracings, ratio):
    t = tracings(settings(ratio=ratio, endpoint="http://127.0.0.1:9/v1/traces"))
    n = 20_000
    got = sampled_count(t, n)
    sd = math.sqrt(n * ratio * (1 - ratio))
    # 5 standard deviations: a false failure about once in 3.5 million runs.
    assert abs(got - n * ratio) < 5 * sd, (got, n * ratio, sd)
    assert t.sampled == got


def test_ratio_zero_and_one(tracings):
    assert sampled_count(tracings(settings(ratio=0.0)), 2000) == 0
    assert sampled_count(tracings(settings(ratio=1.0)), 2000) == 2000


def test_parent_based_decisions_are_honoured(tracings):
    never = tracings(settings(ratio=0.0))
    always = tracings(settings(ratio=1.0))
    # An incoming sampled parent is followed at ratio 0, an unsampled one at ratio 1.
    assert all(isinstance(never.begin(HEADERS + [tp("01")]), Trace) for _ in range(200))
    assert all(never.begin(HEADERS + [tp("03")]) is not None for _ in range(20))
    assert all(always.begin(HEADERS + [tp("00")]) is None for _ in range(200))


def test_without_parent_based_the_ratio_applies_to_the_incoming_trace_id(tracings):
    t = tracings(settings(ratio=0.5, parent_based=False))
    low_half = "0" * 16 + "7" + "f" * 15    # low 64 bits under 2**63: sampled at 0.5
    high_half = "0" * 16 + "8" + "0" * 15
    assert isinstance(t.begin([tp("00", tid=low_half)]), Trace)
    assert t.begin([tp("01", tid=high_half)]) is None


def test_decisions_agree_with_the_sdks_parent_based_ratio_sampler(tracings):
    """begin() decides exactly as ParentBased(TraceIdRatioBased(ratio)) would, incoming context or not."""
    import random
    rng = random.Random(11)
    for parent_based in (True, False):
        for ratio in (0.0, 0.01, 0.3, 1.0):
            t = tracings(settings(ratio=ratio, parent_based=parent_based))
            sdk = sdk_sampler(parent_based, ratio)
            for _ in range(500):
                tid, sid, flags = rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, rng.choice((0, 1))
                ours = t.begin([tp(f"{flags:02x}", f"{tid:032x}", f"{sid:016x}")]) is not None
                parent = SpanContext(tid, sid, is_remote=True, trace_flags=TraceFlags(flags))
                theirs = sdk.should_sample(set_span_in_context(NonRecordingSpan(parent)), tid, "x").decision
                assert ours == (theirs is Decision.RECORD_AND_SAMPLE), (parent_based, ratio, tid, flags)
            # Roots: the id begin() chose is the one the SDK span carries, and the SDK would sample it too.
            for _ in range(200):
                trace = t.begin([])
                if isinstance(trace, Trace):
                    decision = sdk.should_sample(None, int(trace.trace_id, 16), "x").decision
                    assert decision is Decision.RECORD_AND_SAMPLE


def test_unsampled_request_without_context_gets_a_fresh_unsampled_traceparent(tracings):
    t = tracings(settings(ratio=0.0))
    seen = set()
    for _ in range(1000):
        trace = t.begin(HEADERS)
        assert isinstance(trace, NotSampled) and trace.trace_id is None and not trace.sampled
        span, lines = trace.client_attempt("api", "10.0.0.5", 8080)
        assert span is None and trace.client_attempt("api", "10.0.0.5", 8080, attempt=1)[1] == lines
        m = FRESH.match(lines)
        assert m and m.group(1) != b"0" * 32 and m.group(2) != b"0" * 16
        seen.add(m.group(1))
        trace.request(b"GET", b"/", b"h")
        trace.end_attempt(span, 200)
        trace.finish(200)
    assert len(seen) == 1000
    # An invalid incoming traceparent is replaced the same way (the exchange drops the old field).
    assert FRESH.match(t.begin([(b"traceparent", b"00-bogus-01")]).lines)
    assert t.drop_fields == {b"traceparent", b"tracestate"}


def test_injection_of_unsampled_context_can_be_turned_off(tracings):
    t = tracings(settings(ratio=0.0), inject_unsampled=False)
    assert t.begin(HEADERS) is None


def test_unsampled_root_ids_would_be_unsampled_for_a_downstream_ratio_sampler(tracings):
    """The fresh id's low 64 bits are the ones begin() decided on, so a TraceIdRatioBased downstream at the same
    ratio decides the same."""
    t = tracings(settings(ratio=0.3))
    sdk = sdk_sampler(False, 0.3)
    for _ in range(300):
        trace = t.begin([])
        if isinstance(trace, NotSampled):
            tid = int(FRESH.match(trace.lines).group(1), 16)
            assert sdk.should_sample(None, tid, "x").decision is Decision.DROP


def test_b3_propagation(tracings):
    tid, sid = TID.encode(), SID.encode()
    single = tracings(settings(ratio=0.0, propagators=(propagation.B3,)))
    trace = single.begin([(b"b3", tid + b"-" + sid + b"-1")])
    assert isinstance(trace, Trace) and trace.trace_id == TID
    trace.request(b"GET", b"/", b"h")
    span, lines = trace.client_attempt("api", "10.0.0.5", 80)
    assert re.fullmatch(rb"b3: " + tid + rb"-([0-9a-f]{16})-1\r\n", lines)
    assert single.begin([(b"b3", tid + b"-" + sid + b"-0")]) is None
    assert single.begin([(b"b3", b"0")]) is None
    assert isinstance(single.begin([(b"b3", b"1")]), Trace)    # a decision without ids: a new, sampled trace
    assert single.begin([tp("01")]).lines.startswith(b"b3: ")  # traceparent is not read: a fresh context
    multi = tracings(settings(ratio=1.0, propagators=(propagation.TRACECONTEXT, propagation.B3MULTI)))
    trace = multi.begin([(b"x-b3-traceid", tid), (b"x-b3-spanid", sid), (b"x-b3-sampled", b"1")])
    trace.request(b"GET", b"/", b"h")
    _, lines = trace.client_attempt("api", "10.0.0.5", 80)
    names = [line.split(b":")[0] for line in lines.split(b"\r\n") if line]
    assert names == [b"traceparent", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled"]
    assert multi.drop_fields == propagation.W3C_NAMES | propagation.B3_NAMES
    # Deferred (no sampling state): the ratio decides, the ids are kept.
    assert isinstance(multi.begin([(b"x-b3-traceid", tid), (b"x-b3-spanid", sid)]), Trace)


def test_no_propagators_means_nothing_is_read_or_injected(tracings):
    t = tracings(settings(ratio=1.0, propagators=()))
    trace = t.begin([tp("00")])   # not read: a root, sampled by the ratio
    trace.request(b"GET", b"/", b"h")
    assert trace.client_attempt("api", "10.0.0.5", 80)[1] == b""
    assert t.drop_fields == frozenset()
    assert tracings(settings(ratio=0.0, propagators=())).begin([]) is None


# --- a bad collector


def run_requests(t: Tracing, n: int) -> float:
    """Worst wall time of one request's tracing calls."""
    worst = 0.0
    for _ in range(n):
        start = time.perf_counter()
        one_request(t, HEADERS)
        worst = max(worst, time.perf_counter() - start)
    return worst


def test_a_dead_collector_neither_blocks_nor_breaks_tracing_and_drops_are_counted(tracings, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    import socket
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"
    t = tracings(settings(ratio=1.0, endpoint=dead, max_queue_size=30, max_export_batch_size=10))
    worst = run_requests(t, 300)   # 900 spans into a queue of 30
    assert worst < 0.05, f"one request's tracing took {worst * 1000:.1f} ms"
    assert t.dropped > 500
    deadline = time.monotonic() + 10
    while t.export_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.export_failures > 0 and t.exported == 0
    start = time.monotonic()
    t.shutdown(1.0)
    assert time.monotonic() - start < 3


def test_a_stalled_collector_neither_blocks_nor_holds_shutdown(tracings, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "30")
    with OtlpReceiver(mode="stall") as stalled:
        t = tracings(settings(ratio=1.0, endpoint=stalled.endpoint, max_queue_size=20, max_export_batch_size=5))
        one_request(t, HEADERS)
        stalled.wait_for_requests(1)       # the export thread is now stuck in its request
        worst = run_requests(t, 200)
        assert worst < 0.05, f"one request's tracing took {worst * 1000:.1f} ms"
        assert t.dropped >= 600 - 20 - 5
        start = time.monotonic()
        t.shutdown(0.5)
        assert time.monotonic() - start < 3


def test_a_collector_answering_503_loses_spans_counted(tracings, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    with OtlpReceiver(mode="unavailable") as sick:
        t = tracings(settings(ratio=1.0, endpoint=sick.endpoint))
        one_request(t, HEADERS)
        t.force_flush(5)
        assert sick.requests >= 1 and t.export_failures == 3 and t.exported == 0


def test_shutdown_exports_what_is_queued(collector, tracings):
    t = tracings(settings(ratio=1.0, endpoint=collector.endpoint, schedule_delay=60))
    for _ in range(10):
        one_request(t, HEADERS)
    t.shutdown(5)
    assert len(collector.wait_for_spans(30, timeout=1)) == 30 and t.exported == 30


# --- configuration from config and environment


def test_resolve_defaults():
    s = resolve(model.TracingOptions(), environ={})
    assert (s.enabled, s.parent_based, s.ratio, s.endpoint) == (False, True, 0.01, "http://localhost:4318/v1/traces")
    assert (s.max_queue_size, s.max_export_batch_size, s.schedule_delay) == (2048, 512, 5.0)
    assert (s.service_name, s.propagators, s.warnings) == ("sidecar-proxy", ("tracecontext",), ())


ENV = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
       "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/", "OTEL_BSP_MAX_QUEUE_SIZE": "100",
       "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1000", "OTEL_BSP_SCHEDULE_DELAY": "250",
       "OTEL_SERVICE_NAME": "from-env", "OTEL_PROPAGATORS": "baggage,b3multi,tracecontext"}


def test_resolve_reads_the_environment_when_the_config_is_silent():
    s = resolve(model.TracingOptions(enabled=True), environ=ENV)
    assert (s.parent_based, s.ratio) == (False, 0.25)
    assert s.endpoint == "http://collector:4318/v1/traces"
    assert (s.max_queue_size, s.max_export_batch_size, s.schedule_delay) == (100, 100, 0.25)
    assert s.service_name == "from-env" and s.propagators == ("b3multi", "tracecontext") and s.warnings == ()
    env = dict(ENV, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="https://traces.example/otlp")
    assert resolve(model.TracingOptions(), environ=env).endpoint == "https://traces.example/otlp"


def test_config_keys_win_over_the_environment():
    options = model.TracingOptions(enabled=True, sampling=0.5, endpoint="http://c:4318/v1/traces",
                                   max_queue_size=7, service_name="from-config")
    s = resolve(options, environ=ENV)
    assert (s.parent_based, s.ratio, s.endpoint, s.max_queue_size, s.service_name) == (
        True, 0.5, "http://c:4318/v1/traces", 7, "from-config")


@pytest.mark.parametrize("name,parent_based,ratio", [
    ("always_on", False, 1.0), ("always_off", False, 0.0), ("parentbased_always_on", True, 1.0),
    ("parentbased_always_off", True, 0.0), ("parentbased_traceidratio", True, 1.0), ("TraceIdRatio", False, 1.0),
])
def test_env_samplers(name, parent_based, ratio):
    s = resolve(model.TracingOptions(), environ={"OTEL_TRACES_SAMPLER": name})
    assert (s.parent_based, s.ratio) == (parent_based, ratio)


def test_bad_environment_values_warn_and_fall_back():
    env = {"OTEL_TRACES_SAMPLER": "jaeger_remote", "OTEL_BSP_MAX_QUEUE_SIZE": "lots",
           "OTEL_PROPAGATORS": "tracecontext,xray", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    s = resolve(model.TracingOptions(), environ=env)
    assert (s.parent_based, s.ratio, s.max_queue_size, s.propagators) == (True, 0.01, 2048, ("tracecontext",))
    assert len(s.warnings) == 4
    bad_arg = resolve(model.TracingOptions(), environ={"OTEL_TRACES_SAMPLER": "traceidratio",
                                                      "OTEL_TRACES_SAMPLER_ARG": "2"})
    assert bad_arg.ratio == 1.0 and bad_arg.warnings


def test_service_name_from_resource_attributes_and_the_kill_switch():
    env = {"OTEL_RESOURCE_ATTRIBUTES": "team=shop,service.name=web%20api"}
    assert resolve(model.TracingOptions(), environ=env).service_name == "web api"
    assert resolve(model.TracingOptions(), environ={"OTEL_PROPAGATORS": "none"}).propagators == ()
    s = resolve(model.TracingOptions(enabled=True), environ={"OTEL_SDK_DISABLED": "true"})
    assert not s.enabled and s.warnings
    assert resolve(model.TracingOptions(enabled=True), environ={}).enabled


def test_resolve_passes_resource_attributes_through():
    s = resolve(model.TracingOptions(), environ={}, **{"service.instance.id": "node-1"})
    assert s.resource_attributes == {"service.instance.id": "node-1"}

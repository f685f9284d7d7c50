"""Telemetry through the real proxy: spans decoded by a real OTLP receiver, /metrics parsed and linted,
the access log on stdout, the dedicated scrape port, and bounded label cardinality."""
from __future__ import annotations

import json
import random
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..http.upstreams import RecordingUpstream, reply
from ..support import Proxy, free_port, require_tools, stop_all, wait_for
from .otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.e2e

R503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"


def config(upstream_port: int, telemetry: dict, retry: dict | None = None) -> dict:
    route = {"name": "api", "match": {"path_prefix": "/"}, "cluster": "backend"}
    if retry is not None:
        route["retry"] = retry
    return {
        "version": 1, "node": {"id": "telemetry"},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": {"web": {"address": "127.0.0.1", "port": free_port(), "protocol": "http", "routes": "main"}},
        "clusters": {"backend": {"endpoints": [f"127.0.0.1:{upstream_port}"]}},
        "route_tables": {"main": [route]},
        "telemetry": telemetry,
    }


def tracing(endpoint: str, sampling: float) -> dict:
    return {"metrics": {"port": 0}, "access_log": {"enabled": False},
            "tracing": {"enabled": True, "sampling": sampling, "endpoint": endpoint}}


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def get(self, path: str, headers: str = "", host: str = "t") -> int:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "closed"
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")),
                      0)
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        self.buf = self.buf[length:]
        return int(head.split()[1])


@pytest.fixture
def world(tmp_path):
    proxies, closers = [], []

    class World:
        def upstream(self) -> RecordingUpstream:
            up = RecordingUpstream()
            closers.append(up)
            return up

        def receiver(self, mode: str = "ok") -> OtlpReceiver:
            r = OtlpReceiver(mode)
            closers.append(r)
            return r

        def proxy(self, cfg: dict) -> Proxy:
            p = Proxy(cfg, tmp_path / f"p{len(proxies)}")
            proxies.append(p)
            return p.wait_ready()

    yield World()
    errors = stop_all(proxies)
    for c in closers:
        c.close()
    assert not errors, errors


def test_spans_form_a_tree_and_the_upstream_gets_the_client_span_as_parent(world):
    up, collector = world.upstream(), world.receiver()
    proxy = world.proxy(config(up.port, tracing(collector.endpoint, 0.0), retry={"on": ["5xx"], "attempts": 2}))
    up.script(reply(R503))
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert Client(proxy.port("web")).get("/orders/7?x=1", f"traceparent: {incoming}\r\ntracestate: k=v\r\n") == 200
    spans = collector.wait_for_spans(3)
    server = [s for s in spans if s.kind == "SERVER"]
    clients = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    assert len(server) == 1 and len(clients) == 2
    server = server[0]
    # The incoming context is the SERVER span's parent (sampling 0: the parent's decision was followed).
    assert server.trace_id == "0af7651916cd43dd8448eb211c80319c" and server.parent_span_id == "b7ad6b7169203331"
    # Each try is a CLIENT span under the SERVER span: the 503 and the retry are siblings.
    assert {c.parent_span_id for c in clients} == {server.span_id}
    assert [c.attributes.get("http.response.status_code") for c in clients] == [503, 200]
    assert server.attributes["http.request.method"] == "GET" and server.attributes["url.path"] == "/orders/7"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["sidecar.route"] == "api" and server.attributes["sidecar.cluster"] == "backend"
    # What each try sent upstream: one traceparent, naming that try's CLIENT span, and the tracestate.
    sent = [r.header(b"traceparent") for r in up.requests]
    assert [[v[:-2] for v in values] for values in sent] == [[f"00-{server.trace_id}-{c.span_id}-".encode()]
                                                              for c in clients]
    assert all(int(values[0][-2:], 16) & 1 for values in sent)  # sampled
    assert all(r.header(b"tracestate") == [b"k=v"] for r in up.requests)


def test_sampling_ratio_is_honoured_and_unsampled_requests_carry_a_fresh_unsampled_context(world):
    up, collector = world.upstream(), world.receiver()
    proxy = world.proxy(config(up.port, tracing(collector.endpoint, 0.1)))
    client = Client(proxy.port("web"))
    n = 1000
    for i in range(n):
        assert client.get(f"/s{i}") == 200
    # One traceparent per request; its flags' low bit is the decision (bit 1 may say the id is random).
    flags = [int(r.header(b"traceparent")[0][-2:], 16) for r in up.requests]
    assert len(flags) == n
    sampled = sum(f & 1 for f in flags)
    # Binomial(1000, 0.1): mean 100, sd 9.5; 5 sd either way.
    assert 52 <= sampled <= 148, sampled
    spans = collector.wait_for_spans(2 * sampled, timeout=15)
    assert sum(s.kind == "SERVER" for s in spans) == sampled


def test_a_dead_collector_neither_slows_nor_breaks_proxying(world):
    up = world.upstream()
    proxy = world.proxy(config(up.port, tracing(f"http://127.0.0.1:{free_port()}/v1/traces", 1.0)))
    client = Client(proxy.port("web"))
    began = time.monotonic()
    for i in range(300):
        assert client.get(f"/d{i}") == 200
    assert time.monotonic() - began < 30  # bounded; the export thread's retries never reach the loop
    wait_for(lambda: proxy.metric("sidecar_tracing_spans_total", result="failed")
             + proxy.metric("sidecar_tracing_spans_total", result="dropped") > 0, 20,
             what="failed or dropped spans counted")


def metric_samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_histograms_count_every_request_and_promtool_accepts_the_exposition(world):
    up = world.upstream()
    proxy = world.proxy(config(up.port, {"metrics": {"port": 0}, "access_log": {"enabled": False}}))
    client = Client(proxy.port("web"))
    for i in range(120):
        assert client.get(f"/h{i}") == 200
    labels = {"listener": "web", "cluster": "backend", "code_class": "2xx"}
    assert proxy.metric("sidecar_http_request_duration_seconds_count", **labels) == 120
    assert proxy.metric("sidecar_http_request_duration_seconds_bucket", le="+Inf", **labels) == 120
    assert proxy.metric("sidecar_http_upstream_response_seconds_count", cluster="backend") == 120
    assert proxy.metric("sidecar_http_requests_total", listener="web", route="api", cluster="backend",
                        code_class="2xx", flags="-") == 120
    status, body = proxy.get("/metrics")
    assert status == 200 and metric_samples(body.decode())
    require_tools("promtool")
    run = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert run.returncode == 0, (run.stdout.decode()[-3000:], run.stderr.decode()[-3000:])


def test_labels_stay_within_the_configured_names_after_10000_random_paths_and_hosts(world):
    up = world.upstream()
    proxy = world.proxy(config(up.port, {"metrics": {"port": 0}, "access_log": {"enabled": False}}))
    rng = random.Random(7)
    client = Client(proxy.port("web"))
    deadline = time.monotonic() + 90
    for i in range(10_000):
        host = f"h{rng.getrandbits(40):x}.example:{rng.randrange(1, 65535)}"
        assert client.get(f"/{rng.getrandbits(64):x}/{i}", host=host) == 200
        assert time.monotonic() < deadline, f"only {i} requests in 90 s"
    allowed = {"listener": {"web"}, "route": {"api", "none"}, "cluster": {"backend", "none", "passthrough"},
               "code_class": {"none", "1xx", "2xx", "3xx", "4xx", "5xx"}}
    status, body = proxy.get("/metrics")
    seen = 0
    for sample in metric_samples(body.decode()):
        if not sample.name.startswith("sidecar_http"):
            continue
        seen += 1
        for label, values in allowed.items():
            if label in sample.labels:
                assert sample.labels[label] in values, (sample.name, sample.labels)
        assert all(len(v) < 64 for v in sample.labels.values()), sample
    assert seen and seen < 200, seen


def test_access_log_lines_in_text_and_json(world, tmp_path):
    up = world.upstream()
    for fmt in ("text", "json"):
        proxy = world.proxy(config(up.port, {"metrics": {"port": 0}, "access_log": {"enabled": True, "format": fmt}}))
        assert Client(proxy.port("web")).get(f"/logged-{fmt}", "x-request-id: rid-" + fmt + "\r\n") == 200
        line = wait_for(lambda: next((l for l in proxy.log().splitlines() if f"/logged-{fmt}" in l), None), 5,
                        what="the access-log line")
        if fmt == "json":
            entry = json.loads(line)
            assert entry["status"] == 200 and entry["request_id"] == "rid-json" and entry["cluster"] == "backend"
            assert entry["upstream_host"] == f"127.0.0.1:{up.port}" and entry["response_flags"] == "-"
        else:
            assert '"GET /logged-text HTTP/1.1" 200 -' in line and '"rid-text"' in line
            assert f'"127.0.0.1:{up.port}"' in line and " api backend " in line


def test_the_dedicated_scrape_port_serves_text_and_openmetrics(world):
    up = world.upstream()
    port = free_port()
    proxy = world.proxy(config(up.port, {"metrics": {"port": port, "address": "127.0.0.1"},
                                         "access_log": {"enabled": False}}))
    assert Client(proxy.port("web")).get("/x") == 200
    import http.client
    for accept, kind in (("", "text/plain"), ("application/openmetrics-text; version=1.0.0", "openmetrics")):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 200 and kind in resp.getheader("content-type")
        assert b"sidecar_http_request_duration_seconds" in body

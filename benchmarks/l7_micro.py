"""Pure-Python cost of one proxied HTTP/1.1 request, without sockets.

Drives the real Session/Exchange/codec/route code with in-memory transports:
a wrk-like GET goes in, an nginx-like small response comes back, and the
time per request is what the proxy spends in Python on top of the
syscalls and event loop work the L4 relay also pays. A guide for
optimising the data path; the wrk benchmark (run.py) is the figure that counts.

    python3 benchmarks/l7_micro.py [--codec httptools|h11] [-n 50000] [--profile] [--policies] [--telemetry]

``--policies`` measures, in the same run and interleaved round by round,
the same route with every resilience policy configured and none of them
triggering (retry, per-try timeout, rate limit, circuit breakers, outlier
detection, least-request balancing): issue 5's "policies cost" figure.

``--telemetry`` measures, the same way, the route with telemetry off against
metrics on (the per-request histograms), tracing at 1 % and at 100 %
sampling (spans encoded to OTLP protobuf by the export thread, then
discarded), and the text access log (written to /dev/null by its thread).
These rounds are timed with process CPU time, so the background threads'
work counts: issue 6's figures.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import cProfile
import pstats
import socket
import time

import uvloop

from settings import POLICY_CLUSTER, ROUTE_POLICIES
from sidecar_proxy.config.load import build
from sidecar_proxy.protocols.http1.session import Session
from sidecar_proxy.telemetry.metrics import Metrics
from sidecar_proxy.transport.listeners import ListenerRuntime, ListenerState
from sidecar_proxy.transport.relay import Relay
from sidecar_proxy.logs import Throttle
from sidecar_proxy.upstream.pool import PoolManager, UpstreamConn

REQUEST = (b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:15080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 07:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n")


class FakeTransport(asyncio.Transport):
    def __init__(self, peer=None) -> None:
        super().__init__()
        self.written = 0
        self.peer = peer
        self.sock = None

    def write(self, data):
        self.written += 1

    def writelines(self, data):
        self.written += 1

    def is_closing(self):
        return False

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_protocol(self, protocol):
        pass

    def get_extra_info(self, name, default=None):
        if name == "socket":
            # The pool probes a connection idle for a while (while another variant ran) with MSG_PEEK:
            # a live socket with nothing to read.
            if self.sock is None:
                self.sock, self.peer_sock = socket.socketpair()
            return self.sock
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def close(self):
        pass


def accepted_relay(rt: ListenerRuntime, transport: FakeTransport) -> Relay:
    """A relay as a listener's accept leaves it (a real one: compiled, Session's field is typed)."""
    relay = Relay(rt)
    relay.down.transport = transport
    relay.peer_addr = ("127.0.0.1", 40000)
    return relay


CONFIG = {
    "version": 1, "node": {"id": "bench"},
    "listeners": {"web": {"address": "127.0.0.1", "port": 15080, "protocol": "http", "routes": "main"}},
    "clusters": {"backend": {"endpoints": ["127.0.0.1:8080"]}},
    "route_tables": {"main": [{"match": {"path_prefix": "/"}, "cluster": "backend"}]},
}


# Every policy of issue 5 on the route and its cluster, none triggering: the wrk target's settings.
POLICIES = ROUTE_POLICIES
CLUSTER_POLICIES = POLICY_CLUSTER


def with_policies(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    doc["route_tables"]["main"][0].update(POLICIES)
    doc["clusters"]["backend"].update(CLUSTER_POLICIES)
    return doc


class EncodeOnly:
    """An OTLP span exporter that does the CPU work of exporting (protobuf encoding) and sends nothing."""

    def export(self, spans):
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult
        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=30000):
        return True


def telemetry_view(kind: str, config):
    """The TelemetryView of one --telemetry variant (None: all off)."""
    from sidecar_proxy.telemetry.pipeline import TelemetryView
    if kind == "off":
        return None
    clusters = [*config.clusters, "passthrough"]
    if kind == "metrics":
        from prometheus_client import CollectorRegistry
        from sidecar_proxy.telemetry.http_metrics import HttpMetrics
        return TelemetryView(HttpMetrics(CollectorRegistry()), "web", clusters, None, None)
    if kind == "access_log":
        from sidecar_proxy.telemetry.access_log import AccessLog
        return TelemetryView(None, "web", clusters, None, AccessLog("text", open("/dev/null", "w")))
    from sidecar_proxy.config.model import TracingOptions
    from sidecar_proxy.telemetry.tracing import Tracing, resolve
    ratio = {"tracing_1pct": 0.01, "tracing_100pct": 1.0}[kind]
    settings = resolve(TracingOptions(enabled=True, sampling=ratio, endpoint="http://127.0.0.1:9/v1/traces"))
    return TelemetryView(None, "web", clusters, Tracing(settings, exporter=EncodeOnly()), None)


def setup(loop, doc: dict, codec: str, telemetry: str = "off"):
    """A session and a pooled upstream connection wired to fake transports; returns one request's work."""
    config = build(doc)
    listener = config.listeners["web"]
    pools = PoolManager(loop)
    rt = ListenerRuntime(listener, config, ListenerState("web"), loop, frozenset({15080}), 1, Metrics(),
                         Throttle(1.0), pools, None, codec, telemetry=telemetry_view(telemetry, config))
    session = Session(accepted_relay(rt, FakeTransport()), rt.http)
    pool = rt.http.pool_for(config.clusters["backend"], ("127.0.0.1", 8080))
    conn = UpstreamConn(pool)
    conn.connection_made(FakeTransport())
    pool.active += 1
    pool.give_back(conn)

    def one() -> None:
        session.data_received(REQUEST)
        conn.data_received(RESPONSE)

    for _ in range(1000):
        one()
    return one, rt


def best(one, n: int, clock=time.perf_counter) -> float:
    began = clock()
    for _ in range(n):
        one()
    return clock() - began


TELEMETRY = ("off", "metrics", "tracing_1pct", "tracing_100pct", "access_log")


async def main(args) -> None:
    loop = asyncio.get_running_loop()
    variants = {"plain": setup(loop, CONFIG, args.codec)}
    if args.policies:
        variants["policies"] = setup(loop, with_policies(CONFIG), args.codec)
    clock = time.perf_counter
    if args.telemetry:
        variants = {kind: setup(loop, CONFIG, args.codec, kind) for kind in TELEMETRY}
        clock = time.process_time  # the export and access-log threads' CPU counts too
    n = args.n
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
    # The best of several rounds, variants interleaved: this shared machine's noise only ever adds time.
    rounds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (one, _) in variants.items():
            rounds[name].append(best(one, n, clock))
    if args.profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    for name, (_, rt) in variants.items():
        assert rt.state.http_requests.get(("main[0]", "backend", 2, "-")) == n * args.rounds + 1000, \
            rt.state.http_requests
        print(f"{args.codec} {name}: {min(rounds[name]) / n * 1e6:.2f} us per request (Python only, no syscalls; "
              f"best of {args.rounds} rounds of {n})")
    if args.policies:
        extra = (min(rounds["policies"]) - min(rounds["plain"])) / n * 1e6
        print(f"every policy configured, none triggering: {extra:+.2f} us per request")
    if args.telemetry:
        off = min(rounds["off"])
        for kind in TELEMETRY[1:]:
            print(f"{kind} over telemetry off: {(min(rounds[kind]) - off) / n * 1e6:+.2f} us per request")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--codec", default="httptools", choices=("httptools", "h11"))
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--policies", action="store_true", help="also measure the route with every policy configured")
    p.add_argument("--telemetry", action="store_true", help="measure telemetry off, metrics, tracing, access log")
    uvloop.run(main(p.parse_args()))

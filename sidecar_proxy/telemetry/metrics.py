"""Prometheus metrics: one registry per process, passed explicitly.

Per-connection TCP counters live as plain ints on each listener's state and
are read at scrape time by :class:`_TcpCollector`, so the relay pays an int
add per chunk instead of a locked Counter.inc. Everything else is a
prometheus-client metric whose label children are bound once per snapshot.
Label values are config names and fixed reason sets only.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.platform_collector import PlatformCollector

from .. import __version__, compiled

# Loopback connects take tens of microseconds; cross-zone ones tens of
# milliseconds; a connect_timeout can be seconds.
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _TcpCollector:
    def __init__(self, states: Callable[[], Iterable]) -> None:
        self._states = states

    def collect(self):
        opened = CounterMetricFamily("sidecar_tcp_connections_opened", "Downstream TCP connections accepted.",
                                     labels=["listener"])
        closed = CounterMetricFamily("sidecar_tcp_connections_closed", "Downstream TCP connections finished, by reason.",
                                     labels=["listener", "reason"])
        active = GaugeMetricFamily("sidecar_tcp_connections_active", "Downstream TCP connections open now.",
                                   labels=["listener"])
        refused = CounterMetricFamily("sidecar_tcp_connections_refused",
                                      "Accepted connections closed before relaying, by reason.",
                                      labels=["listener", "reason"])
        rx = CounterMetricFamily("sidecar_tcp_received_bytes", "Bytes read from downstream and relayed upstream.",
                                 labels=["listener"])
        tx = CounterMetricFamily("sidecar_tcp_sent_bytes", "Bytes read from upstream and relayed downstream.",
                                 labels=["listener"])
        detections = CounterMetricFamily("sidecar_protocol_detections",
                                         "Connections of 'auto' listeners by what the first bytes showed "
                                         "(timeout: nothing in time; opaque_port: not sniffed).",
                                         labels=["listener", "outcome"])
        buffered = GaugeMetricFamily("sidecar_tcp_buffered_bytes",
                                     "Bytes held in the proxy's write buffers now, all connections.",
                                     labels=["listener"])
        http = CounterMetricFamily("sidecar_http_requests",
                                   "HTTP requests answered, by status class and response flag "
                                   "('-': none; DPE, DRT, NR, UF, UT, UC, UPE, DC, DR, LOOP, RL, UO: see README; "
                                   "',URX' is added when a route's retry attempts ran out).",
                                   labels=["listener", "route", "cluster", "code_class", "flags"])
        resends = CounterMetricFamily("sidecar_http_upstream_resends",
                                      "Safe bodiless requests sent again on a fresh connection because the "
                                      "reused keep-alive connection they went out on closed unanswered.",
                                      labels=["listener"])
        tls = CounterMetricFamily("sidecar_tls_terminations",
                                  "mTLS handshakes of listeners with tls.mode permissive/strict, by result: ok, or "
                                  "why the client was refused (plaintext on a strict listener, no_client_cert, "
                                  "expired, unknown_ca, no_spiffe_id, ...).", labels=["listener", "result"])
        limited = CounterMetricFamily("sidecar_http_rate_limit_decisions",
                                      "Requests checked by a route's local rate limit, by decision "
                                      "(would_limit: refused in shadow mode, let through).",
                                      labels=["listener", "route", "decision"])
        for state in self._states():
            for route, limiter in state.rate_limits.items():
                limited.add_metric([state.name, route, "allowed"], limiter.allowed)
                limited.add_metric([state.name, route, "limited"], limiter.limited)
                limited.add_metric([state.name, route, "would_limit"], limiter.would_limit)
            if state.http_requests or state.http_resends:
                resends.add_metric([state.name], state.http_resends)
            for (route, cluster, code, flag), count in state.http_requests.items():
                http.add_metric([state.name, route, cluster, f"{code}xx" if code else "none", flag], count)
            name = [state.name]
            conns = list(state.connections)
            opened.add_metric(name, state.opened)
            for reason, count in state.closed.items():
                closed.add_metric([state.name, reason], count)
            active.add_metric(name, len(conns))
            for reason, count in state.refused.items():
                refused.add_metric([state.name, reason], count)
            for outcome, count in state.detections.items():
                detections.add_metric([state.name, outcome], count)
            for result, count in state.tls.items():
                tls.add_metric([state.name, result], count)
            rx.add_metric(name, state.closed_rx + sum(c.down.nbytes for c in conns))
            tx.add_metric(name, state.closed_tx + sum(c.up.nbytes for c in conns if c.up is not None))
            buffered.add_metric(name, sum(c.buffered() for c in conns))
        return [opened, closed, active, refused, rx, tx, buffered, detections, http, resends, limited, tls]


class _ClusterCollector:
    """Resilience decisions per cluster, read from the plain counters of each ClusterState."""

    def __init__(self, states: Callable[[], Iterable]) -> None:
        self._states = states

    def collect(self):
        attempts = CounterMetricFamily("sidecar_http_upstream_attempts",
                                       "Tries sent to the cluster's endpoints, first tries and retries.",
                                       labels=["cluster"])
        retries = CounterMetricFamily("sidecar_http_retries", "Retries started, by what the failed try met "
                                      "(connect-failure, reset, per-try-timeout, status).",
                                      labels=["cluster", "reason"])
        skipped = CounterMetricFamily("sidecar_http_retries_skipped",
                                      "Retriable failures not tried again, by why: attempts ran out, the retry "
                                      "budget or the max_retries breaker was exhausted, the body was not kept, "
                                      "the method is not idempotent, the route timeout left no time.",
                                      labels=["cluster", "reason"])
        overflow = CounterMetricFamily("sidecar_circuit_breaker_overflow",
                                       "Requests refused (503 UO) or retries skipped because a circuit breaker "
                                       "of the cluster was full, by breaker.", labels=["cluster", "breaker"])
        active = GaugeMetricFamily("sidecar_circuit_breaker_active", "What each circuit breaker counts now.",
                                   labels=["cluster", "breaker"])
        limit = GaugeMetricFamily("sidecar_circuit_breaker_limit", "Each circuit breaker's threshold.",
                                  labels=["cluster", "breaker"])
        ejections = CounterMetricFamily("sidecar_outlier_ejections", "Endpoints ejected by outlier detection.",
                                        labels=["cluster"])
        ejected = GaugeMetricFamily("sidecar_outlier_ejected_endpoints", "Endpoints ejected now.",
                                    labels=["cluster"])
        panic = GaugeMetricFamily("sidecar_outlier_panic", "1 while every endpoint is ejected and traffic goes "
                                  "to all of them anyway.", labels=["cluster"])
        tls = CounterMetricFamily("sidecar_tls_originations", "mTLS connections to clusters with tls.mode mutual, "
                                  "by result: ok, or the handshake's failure reason (identity_mismatch, "
                                  "unknown_ca, no_local_identity, ...).", labels=["cluster", "result"])
        for state in self._states():
            name = state.name
            attempts.add_metric([name], state.attempts)
            for reason, count in state.retries.items():
                retries.add_metric([name, reason], count)
            for reason, count in state.skipped.items():
                skipped.add_metric([name, reason], count)
            b = state.breakers
            for kind in b.active:
                overflow.add_metric([name, kind], b.overflow[kind])
                active.add_metric([name, kind], b.active[kind])
                limit.add_metric([name, kind], b.limits[kind])
            det = state.detector
            if det is not None:
                det.healthy()  # returns endpoints whose ejection ended
                ejections.add_metric([name], det.ejections_total)
                ejected.add_metric([name], det.ejected_now)
                panic.add_metric([name], 1 if det.panic else 0)
            for result, count in state.tls.items():
                tls.add_metric([name, result], count)
        return [attempts, retries, skipped, overflow, active, limit, ejections, ejected, panic, tls]


class _IdentityCollector:
    """The workload certificate: expiry, rotations applied and refused."""

    def __init__(self, mesh: Callable[[], object]) -> None:
        self._mesh = mesh

    def collect(self):
        mesh = self._mesh()
        if mesh is None:
            return []
        source = mesh.source
        cert = GaugeMetricFamily("sidecar_tls_certificate_expiry_timestamp_seconds",
                                 "notAfter of the workload certificate in use (alert well before it).")
        bundle = GaugeMetricFamily("sidecar_tls_trust_bundle_expiry_timestamp_seconds",
                                   "The earliest notAfter among the trust bundle's CA certificates.")
        if source.not_after is not None:
            cert.add_metric([], source.not_after)
        if source.bundle_not_after is not None:
            bundle.add_metric([], source.bundle_not_after)
        reloads = CounterMetricFamily("sidecar_tls_identity_reloads",
                                      "Changed certificate files: applied, or refused by reason (the previous "
                                      "identity stays).", labels=["result"])
        reloads.add_metric(["applied"], source.reloads)
        for reason, count in source.rejected.items():
            reloads.add_metric([reason], count)
        expired = CounterMetricFamily("sidecar_tls_expired_refusals",
                                      "Handshakes refused because the workload certificate had expired and no "
                                      "valid one replaced it.")
        expired.add_metric([], source.expired_refusals)
        return [cert, bundle, reloads, expired]


class Metrics:
    def __init__(self) -> None:
        # The *_created series double the text for no question an operator asks.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.upstream_connect_seconds = Histogram(
            "sidecar_upstream_connect_duration_seconds", "Time to establish upstream TCP connections.",
            ["cluster"], buckets=CONNECT_BUCKETS, registry=r)
        self.upstream_connect_failures = Counter(
            "sidecar_upstream_connect_failures", "Upstream connects that failed, by reason.",
            ["cluster", "reason"], registry=r)
        self.config_reloads = Counter(
            "sidecar_config_reloads", "Config updates attempted, by source and result.",
            ["source", "result"], registry=r)
        self.config_version = Gauge(
            "sidecar_config_version", "Version of the live config snapshot (1 = first loaded).", registry=r)
        self.config_info = Gauge(
            "sidecar_config_info", "The live config snapshot: always 1, identity in labels.",
            ["version", "digest", "source"], registry=r)
        self.config_loaded = Gauge(
            "sidecar_config_last_applied_timestamp_seconds", "When the live config snapshot was applied.",
            registry=r)
        self.config_age = Gauge(
            "sidecar_config_age_seconds", "Seconds since the live config snapshot was applied.", registry=r)
        self.control_connected = Gauge(
            "sidecar_control_connected", "1 while every resource type's last exchange with the control "
            "server succeeded.", registry=r)
        self.control_updates = Counter(
            "sidecar_control_updates", "Control server responses decided, by type and ACK/NACK.",
            ["type", "result"], registry=r)
        self.control_errors = Counter(
            "sidecar_control_errors", "Control server requests that failed (unreachable, timeout, bad answer).",
            ["type"], registry=r)
        self.loop_tasks = Gauge(
            "sidecar_event_loop_tasks", "asyncio tasks alive: a number that keeps growing is a leak.", registry=r)
        self.ready = Gauge("sidecar_ready", "1 when /ready answers 200.", registry=r)
        self.draining = Gauge("sidecar_draining", "1 while draining.", registry=r)
        self._info_labels: tuple | None = None
        Gauge("sidecar_build_info", "The running build: always 1; data_path is compiled, source or mixed "
              "(see GET /server_info).", ["version", "data_path"], registry=r).labels(
                  __version__, compiled.status()["data_path"]).set(1)

    def watch_tcp(self, states: Callable[[], Iterable]) -> None:
        self.registry.register(_TcpCollector(states))

    def watch_clusters(self, states: Callable[[], Iterable]) -> None:
        self.registry.register(_ClusterCollector(states))

    def watch_identity(self, mesh: Callable[[], object]) -> None:
        self.registry.register(_IdentityCollector(mesh))

    def snapshot_applied(self, snapshot) -> None:
        labels = (str(snapshot.version), snapshot.digest[:12], snapshot.source)
        if self._info_labels is not None:
            self.config_info.remove(*self._info_labels)
        self.config_info.labels(*labels).set(1)
        self._info_labels = labels
        self.config_version.set(snapshot.version)
        self.config_loaded.set(snapshot.loaded_at)

    def render(self, accept_header: str) -> tuple[bytes, str]:
        """Exposition body and content type, OpenMetrics when the scraper asks."""
        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.registry), content_type

"""What the proxy knows about each cluster, across config snapshots, and its per-snapshot view.

:class:`ClusterState` is kept per cluster *name* for the life of the
process (in :class:`ClusterStates`): its circuit-breaker gauges, retry
budget, outlier detector and counters describe requests that may have
started under an older snapshot and end under a newer one, so a reload must
neither reset nor duplicate them. A new snapshot's settings are applied at
commit (:meth:`ClusterStates.apply`); preparing a snapshot that is then
rejected changes nothing.

:class:`Upstream` is one cluster under one snapshot: the config, the shared
state and the endpoint picker built from that snapshot's endpoints. The
exchange asks it for an endpoint (:meth:`Upstream.pick`), which is where
load balancing meets outlier detection: the picker chooses among the
detector's healthy endpoints, and a retry prefers one not tried yet.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ..addr import format_addr
from ..config.model import PASSTHROUGH, Cluster
from ..policies.retry import RetryBudget
from .balancer import make_picker, random_pick
from .breaker import CircuitBreakers
from ..tls.spiffe import IdentityMatcher
from .outlier import OutlierDetector
from .pool import PoolManager

Addr = tuple[str, int]

# Why a failed try was not tried again (the label of sidecar_http_retries_skipped_total).
SKIP_REASONS = ("attempts", "budget", "circuit_breaker", "body_not_buffered", "non_idempotent", "deadline")
# What a retry answered (sidecar_http_retries_total's reason).
RETRY_REASONS = ("connect-failure", "reset", "per-try-timeout", "status")

# Transparent traffic that no route claims is the application's own: the
# proxy must not cap it with cluster defaults meant for configured clusters.
_UNBOUNDED = 2 ** 31


class ClusterState:
    """Per cluster name: breakers, retry budget, outlier detector, in-flight counts, counters."""

    __slots__ = ("name", "breakers", "budget", "detector", "attempts", "retries", "skipped", "tls", "_settings")

    def __init__(self, cluster: Cluster, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = cluster.name
        self.breakers = CircuitBreakers()
        self.budget = RetryBudget()
        self.detector: OutlierDetector | None = None
        self.attempts = 0                        # tries sent (first tries and retries)
        self.retries = dict.fromkeys(RETRY_REASONS, 0)
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.tls: dict[str, int] = {}   # mTLS originations: "ok" or the failure reason (tls.reasons)
        self._settings = None
        self.apply(cluster, clock)

    def apply(self, cluster: Cluster, clock: Callable[[], float] = time.monotonic) -> None:
        """Take a snapshot's settings, keeping gauges, counters and ejections."""
        cb = cluster.circuit_breakers
        if cluster is PASSTHROUGH:
            self.breakers.set_limits(_UNBOUNDED, _UNBOUNDED, _UNBOUNDED, _UNBOUNDED)
        else:
            self.breakers.set_limits(cb.max_connections, cb.max_pending_requests, cb.max_requests,
                                     cb.max_retries)
        rb = cluster.retry_budget
        self.budget.ratio = rb.percent / 100.0
        self.budget.min_retries = rb.min_retries
        od = cluster.outlier_detection
        endpoints = [(ep.host, ep.port) for ep in cluster.endpoints]
        if od is None or cluster.original_destination:
            self.detector = None
            return
        settings = (od.consecutive_5xx, od.consecutive_gateway_failure, od.base_ejection_time,
                    od.max_ejection_percent, od.max_ejection_time)
        if self.detector is None or settings != self._settings:
            # New thresholds start a fresh detector; the same ones keep ejections across a reload.
            self.detector = OutlierDetector(endpoints, *settings[:4], max_ejection_time=settings[4], clock=clock)
            self._settings = settings
        else:
            self.detector.update_endpoints(endpoints)

    def stats(self) -> dict:
        """For the admin endpoint; not for the request path."""
        det = self.detector
        return {"circuit_breakers": self.breakers.stats(),
                "retry_budget": {"percent": self.budget.ratio * 100, "min_retries": self.budget.min_retries,
                                 "exhausted": self.budget.exhausted},
                "attempts": self.attempts, "retries": dict(self.retries), "retries_skipped": dict(self.skipped),
                "tls_originations": dict(self.tls),
                "outlier_detection": None if det is None else {
                    "ejected": [format_addr(ep) for ep in det.endpoints if det.is_ejected(ep)],
                    "ejections_total": det.ejections_total, "panic": det.panic}}


class ClusterStates:
    """Every cluster's state, by name, across snapshots."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.states: dict[str, ClusterState] = {}

    def get(self, cluster: Cluster) -> ClusterState:
        """The state of ``cluster``'s name; made (with its settings) the first time, else as it is."""
        state = self.states.get(cluster.name)
        if state is None:
            state = self.states[cluster.name] = ClusterState(cluster, self.clock)
        return state

    def apply(self, clusters: Iterable[Cluster]) -> None:
        """At a snapshot's commit: its settings everywhere, and states of clusters gone are forgotten
        (requests still holding one release into it harmlessly)."""
        live = {}
        for cluster in clusters:
            state = self.get(cluster)
            state.apply(cluster, self.clock)
            live[cluster.name] = state
        self.states = live


def _in_flight(cluster: str, endpoints: tuple[Addr, ...], pools: PoolManager) -> Callable[[int], int]:
    """least_request's in-flight count of endpoint ``i``.

    HTTP/1.1 carries one request per connection, so it is the endpoint
    pool's connections owned by an exchange (connecting ones included):
    nothing is counted per request for it.
    """
    keys = [(cluster, host, port) for host, port in endpoints]
    live = pools.pools

    def active(i: int) -> int:
        pool = live.get(keys[i])
        return pool.active if pool is not None else 0

    return active


class Upstream:
    """One cluster under one snapshot: config, shared state, and the endpoint picker."""

    __slots__ = ("name", "cluster", "state", "picker", "retry_picker", "endpoints", "next", "tls_expected",
                 "tls_sni")
    # A typed C field when compiled (compiled.pxd_text): reached without a lookup.
    state: ClusterState

    def __init__(self, cluster: Cluster, state: ClusterState, pools: PoolManager | None = None) -> None:
        self.name = cluster.name
        self.cluster = cluster
        self.state = state
        self.endpoints: tuple[Addr, ...] = tuple((ep.host, ep.port) for ep in cluster.endpoints)
        # tls.mode mutual: connections originate mTLS and the server must be one of these SPIFFE IDs.
        tls = cluster.tls
        self.tls_expected = IdentityMatcher(tls.peer_identity) if tls.mode == "mutual" else None
        self.tls_sni = tls.sni
        self.picker = make_picker(cluster, _in_flight(cluster.name, self.endpoints, pools) if pools else None)
        # The picker's no-argument form (round robin's own rotation, no wrapper call), or None.
        self.next = getattr(self.picker, "turn", self.picker)
        # A retry's pick must not advance the round-robin rotation: with two
        # endpoints, one down, every first try would land on the dead one.
        self.retry_picker = self.picker
        if cluster.lb == "round_robin" and self.endpoints:
            self.retry_picker = random_pick(self.endpoints, [ep.weight for ep in cluster.endpoints])

    def pick(self, tried: tuple[Addr, ...] = ()) -> Addr:
        """An endpoint: among the healthy ones (all of them in outlier panic), avoiding ``tried`` when
        another is left."""
        det = self.state.detector
        if det is None or not det.ejected_now:
            # Nothing ejected (a return is noticed by healthy(), called while something is).
            if not tried:
                return self.picker()
            candidates = self.endpoints
        else:
            candidates = det.healthy()
            if not tried:
                return self.picker(candidates)
        others = tuple(ep for ep in candidates if ep not in tried)
        return self.retry_picker(others or candidates)

"""ClusterState across snapshots, and Upstream.pick where load balancing meets outlier detection."""
from __future__ import annotations

import asyncio
from collections import Counter

from sidecar_proxy.config.model import PASSTHROUGH, CircuitBreakers, Cluster, Endpoint, OutlierDetection
from sidecar_proxy.upstream.cluster import ClusterStates, Upstream
from sidecar_proxy.upstream.pool import PoolManager

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cluster(*addrs, lb="round_robin", outlier: OutlierDetection | None = None, max_requests=1024) -> Cluster:
    return Cluster("c", tuple(Endpoint(h, p) for h, p in addrs), lb=lb, outlier_detection=outlier,
                   circuit_breakers=CircuitBreakers(max_requests=max_requests))


def test_a_new_snapshot_keeps_gauges_and_ejections_but_takes_new_limits():
    clock = Clock()
    states = ClusterStates(clock)
    od = OutlierDetection(consecutive_5xx=1, max_ejection_percent=50)
    state = states.get(cluster(A, B, outlier=od))
    assert state.breakers.try_acquire("requests")
    state.detector.record(A, 503)
    assert state.detector.is_ejected(A)

    states.apply([cluster(A, B, C, outlier=od, max_requests=7)])
    assert states.states["c"] is state
    assert state.breakers.active["requests"] == 1 and state.breakers.limits["requests"] == 7
    assert state.detector.is_ejected(A) and state.detector.endpoints == (A, B, C)

    # Other thresholds: a fresh detector (its runs were counted against other numbers).
    states.apply([cluster(A, B, outlier=OutlierDetection(consecutive_5xx=3))])
    assert not state.detector.is_ejected(A)
    # Outlier detection turned off, then the cluster removed: forgotten.
    states.apply([cluster(A, B)])
    assert state.detector is None
    states.apply([])
    assert states.states == {}


def test_transparent_passthrough_is_not_capped_by_cluster_defaults():
    state = ClusterStates().get(PASSTHROUGH)
    assert min(state.breakers.limits.values()) >= 2 ** 31


def test_a_retry_prefers_an_endpoint_not_tried_and_leaves_the_rotation_alone():
    up = Upstream(cluster(A, B, C), ClusterStates().get(cluster(A, B, C)))
    assert [up.pick() for _ in range(3)] == [A, B, C]
    for _ in range(50):
        assert up.pick(tried=(A,)) in (B, C)
        assert up.pick(tried=(A, C)) == B
    # Only tried endpoints left: one of them again rather than nothing.
    assert up.pick(tried=(A, B, C)) in (A, B, C)
    assert [up.pick() for _ in range(3)] == [A, B, C]  # retries did not move the round robin


def test_ejected_endpoints_get_nothing_until_they_return_and_panic_uses_all():
    clock = Clock()
    od = OutlierDetection(consecutive_5xx=1, base_ejection_time=10.0, max_ejection_percent=100)
    c = cluster(A, B, C, outlier=od)
    states = ClusterStates(clock)
    up = Upstream(c, states.get(c))
    det = up.state.detector
    det.record(A, 500)
    assert Counter(up.pick() for _ in range(30)) == {B: 15, C: 15}
    det.record(B, 500)
    det.record(C, 500)
    assert det.panic
    assert set(up.pick() for _ in range(30)) == {A, B, C}
    clock.now += 10.0
    assert set(up.pick() for _ in range(30)) == {A, B, C} and not det.panic and det.ejected_now == 0


def test_least_request_reads_in_flight_requests_from_the_endpoint_pools():
    loop = asyncio.new_event_loop()
    try:
        pools = PoolManager(loop)
        c = cluster(A, B, lb="least_request")
        up = Upstream(c, ClusterStates().get(c), pools)
        busy = pools.pool("c", A, 10, 4.0)
        busy.active = 3  # three requests in flight on A's connections
        assert Counter(up.pick() for _ in range(40)) == {B: 40}
        busy.active = 0
        assert set(up.pick() for _ in range(40)) == {A, B}
    finally:
        loop.close()

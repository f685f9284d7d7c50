import pytest

from sidecar_proxy.upstream.outlier import OutlierDetector


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def eps(n):
    return [(f"10.0.0.{i}", 80) for i in range(1, n + 1)]


def detector(n=10, **kw):
    clock = FakeClock()
    kw.setdefault("max_ejection_percent", 100)
    return OutlierDetector(eps(n), clock=clock, **kw), clock


A, B, C = eps(3)


def fail(d, ep, times, status=500, connect_failed=False):
    for _ in range(times):
        d.record(ep, status, connect_failed)


def test_consecutive_5xx_ejects_at_the_threshold_not_before():
    d, _ = detector(consecutive_5xx=5)
    fail(d, A, 4)
    assert not d.is_ejected(A) and A in d.healthy()
    fail(d, A, 1)
    assert d.is_ejected(A) and A not in d.healthy()
    assert d.ejections_total == 1 and d.ejected_now == 1
    assert len(d.healthy()) == 9


def test_a_success_resets_both_counters():
    d, _ = detector(consecutive_5xx=3, consecutive_gateway=3)
    fail(d, A, 2, status=503)
    d.record(A, 200, False)
    fail(d, A, 2, status=503)
    d.record(A, 404, False)  # a 4xx is the upstream working correctly
    fail(d, A, 2, status=503)
    assert not d.is_ejected(A)
    fail(d, A, 1, status=503)
    assert d.is_ejected(A)


def test_counters_are_per_endpoint():
    d, _ = detector(consecutive_5xx=3)
    for _ in range(2):
        d.record(A, 500, False)
        d.record(B, 500, False)
    d.record(B, 200, False)
    d.record(A, 500, False)
    assert d.is_ejected(A) and not d.is_ejected(B)


def test_gateway_failures_eject_on_the_gateway_threshold():
    d, _ = detector(consecutive_5xx=10, consecutive_gateway=3)
    d.record(A, 502, False)
    d.record(A, 504, False)
    assert not d.is_ejected(A)
    d.record(A, 503, False)
    assert d.is_ejected(A)


def test_connect_failures_are_gateway_failures():
    d, _ = detector(consecutive_5xx=10, consecutive_gateway=3)
    fail(d, A, 2, status=None, connect_failed=True)
    d.record(A, 502, False)
    assert d.is_ejected(A)


def test_plain_5xx_counts_toward_5xx_but_breaks_a_gateway_run():
    d, _ = detector(consecutive_5xx=10, consecutive_gateway=3)
    fail(d, A, 2, status=503)
    d.record(A, 500, False)
    fail(d, A, 2, status=503)
    assert not d.is_ejected(A)
    d.record(A, 503, False)
    assert d.is_ejected(A)


def test_gateway_failures_also_count_toward_consecutive_5xx():
    d, _ = detector(consecutive_5xx=4, consecutive_gateway=100)
    fail(d, A, 2, status=502)
    fail(d, A, 1, status=500)
    fail(d, A, 1, status=None, connect_failed=True)
    assert d.is_ejected(A)


def test_status_none_without_connect_failure_changes_nothing():
    d, _ = detector(consecutive_5xx=2)
    d.record(A, 500, False)
    d.record(A, None, False)  # no upstream verdict: neither success nor failure
    assert not d.is_ejected(A)
    d.record(A, 500, False)
    assert d.is_ejected(A)


def test_ejection_time_is_base_times_count_capped():
    d, clock = detector(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_time=100.0,
                        decay_interval=1e9)
    expected = [30.0, 60.0, 90.0, 100.0, 100.0]
    for duration in expected:
        d.record(A, 500, False)
        assert d.is_ejected(A)
        clock.advance(duration - 0.001)
        assert d.is_ejected(A), duration
        clock.advance(0.001)
        assert not d.is_ejected(A), duration
    assert d.ejections_total == 5


def test_max_below_base_means_base():
    d, clock = detector(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_time=5.0)
    d.record(A, 500, False)
    clock.advance(29.9)
    assert d.is_ejected(A)
    clock.advance(0.1)
    assert not d.is_ejected(A)


def test_ejected_endpoint_returns_lazily_on_healthy_and_ejected_now_follows():
    d, clock = detector(n=3, consecutive_5xx=1, base_ejection_time=10.0)
    d.record(A, 500, False)
    clock.advance(5)
    d.record(B, 500, False)
    assert d.healthy() == (C,) and d.ejected_now == 2
    clock.advance(5)
    assert d.healthy() == (A, C) and d.ejected_now == 1
    clock.advance(5)
    assert d.healthy() == (A, B, C) and d.ejected_now == 0
    assert not d.panic


def test_explicit_now_overrides_the_clock():
    d, clock = detector(n=3, consecutive_5xx=1, base_ejection_time=10.0)
    d.record(A, 500, False, now=0.0)
    assert d.healthy(now=9.9) == (B, C)
    assert d.is_ejected(A, now=9.9)
    assert d.healthy(now=10.0) == (A, B, C)


def test_ejection_count_decays_while_back_in_service():
    d, clock = detector(consecutive_5xx=1, base_ejection_time=30.0, max_ejection_time=300.0,
                        decay_interval=10.0)
    d.record(A, 500, False)          # count 1: 30 s
    clock.advance(30)
    d.record(A, 500, False)          # back 0 s: count 2: 60 s
    clock.advance(60)
    assert not d.is_ejected(A)
    clock.advance(10)                # one healthy interval: count 2 -> 1, then +1 = 2
    d.record(A, 500, False)
    clock.advance(59.9)
    assert d.is_ejected(A)
    clock.advance(0.1)
    assert not d.is_ejected(A)
    clock.advance(1000)              # long healthy: back to the base time
    d.record(A, 500, False)
    clock.advance(30)
    assert not d.is_ejected(A)


def test_decay_does_not_depend_on_how_late_the_return_is_noticed():
    # Nobody asks between ejection and the next failure; the return time is
    # the scheduled one, so the decay is the same as if polled continuously.
    d, clock = detector(consecutive_5xx=1, base_ejection_time=30.0, decay_interval=10.0)
    d.record(A, 500, False)
    clock.advance(30 + 25)           # returned at +30, 2 healthy intervals since
    d.record(A, 500, False)          # count 1 - 2 -> 0, +1 = 1: 30 s
    clock.advance(30)
    assert not d.is_ejected(A)


def test_results_while_ejected_are_ignored():
    d, clock = detector(consecutive_5xx=2, base_ejection_time=10.0)
    fail(d, A, 2)
    assert d.is_ejected(A)
    fail(d, A, 5)                    # in-flight requests finishing late
    assert d.ejections_total == 1
    clock.advance(10)
    d.record(A, 500, False)
    assert not d.is_ejected(A), "a fresh run starts after the return"
    d.record(A, 500, False)
    assert d.is_ejected(A)


@pytest.mark.parametrize("n,pct,allowed", [
    (3, 10, 1), (10, 10, 1), (20, 10, 2), (20, 25, 5), (3, 50, 1), (3, 67, 2), (10, 0, 0), (2, 50, 1),
])
def test_max_ejection_percent(n, pct, allowed):
    d, _ = detector(n=n, consecutive_5xx=1, max_ejection_percent=pct)
    for ep in eps(n):
        d.record(ep, 500, False)
    assert d.ejected_now == allowed
    assert d.ejections_total == allowed
    assert d.ejections_overflow == n - allowed
    assert len(d.healthy()) == n - allowed
    assert not d.panic


def test_single_endpoint_is_never_ejected():
    d, _ = detector(n=1, consecutive_5xx=1, max_ejection_percent=100)
    fail(d, A, 3)
    assert not d.is_ejected(A) and d.healthy() == (A,) and not d.panic
    assert d.ejections_overflow == 3


def test_refused_ejection_resets_the_run():
    d, _ = detector(n=3, consecutive_5xx=2, max_ejection_percent=10)
    fail(d, A, 2)
    fail(d, B, 2)
    assert d.is_ejected(A) and not d.is_ejected(B)
    assert d.ejections_overflow == 1
    fail(d, B, 1)
    assert d.ejections_overflow == 1, "needs a whole new run before trying again"
    fail(d, B, 1)
    assert d.ejections_overflow == 2


def test_cap_frees_up_when_an_endpoint_returns():
    d, clock = detector(n=3, consecutive_5xx=1, max_ejection_percent=10, base_ejection_time=10.0)
    d.record(A, 500, False)
    d.record(B, 500, False)
    assert not d.is_ejected(B)
    clock.advance(10)
    d.record(B, 500, False)          # A's return is noticed inside record
    assert d.is_ejected(B) and not d.is_ejected(A)


def test_panic_when_every_endpoint_is_ejected():
    d, clock = detector(n=3, consecutive_5xx=1, max_ejection_percent=100, base_ejection_time=10.0)
    d.record(A, 500, False)
    d.record(B, 500, False)
    assert d.healthy() == (C,) and not d.panic
    d.record(C, 500, False)
    assert d.ejected_now == 3
    assert d.healthy() == (A, B, C) and d.panic
    clock.advance(10)
    assert d.healthy() == (A, B, C) and not d.panic and d.ejected_now == 0


def test_healthy_is_cached_until_the_set_changes():
    d, clock = detector(n=3, consecutive_5xx=1, base_ejection_time=10.0)
    first = d.healthy()
    assert d.healthy() is first
    d.record(A, 200, False)
    assert d.healthy() is first
    d.record(A, 500, False)
    second = d.healthy()
    assert second is not first
    clock.advance(5)
    assert d.healthy() is second
    clock.advance(5)
    assert d.healthy() is not second


def test_unknown_endpoint_is_counted_and_ignored():
    d, _ = detector(n=3, consecutive_5xx=1)
    d.record(("192.0.2.1", 80), 500, False)
    assert d.unknown_records == 1 and d.ejected_now == 0
    assert not d.is_ejected(("192.0.2.1", 80))


def test_update_endpoints_keeps_survivor_state():
    d, clock = detector(n=3, consecutive_5xx=2, base_ejection_time=10.0)
    fail(d, A, 2)
    d.record(B, 500, False)
    D = ("10.0.0.9", 80)
    d.update_endpoints([A, B, D])
    assert d.is_ejected(A) and d.healthy() == (B, D)
    d.record(B, 500, False)          # B's run of one survived the swap
    assert d.is_ejected(B)
    d.update_endpoints([A, B])       # only ejected endpoints left: panic
    assert d.panic and d.healthy() == (A, B)
    d.update_endpoints([C])
    assert not d.panic and d.ejected_now == 0 and d.healthy() == (C,)


def test_empty_cluster():
    d = OutlierDetector([], clock=FakeClock())
    assert d.healthy() == () and not d.panic


@pytest.mark.parametrize("kw,field", [
    ({"consecutive_5xx": 0}, "consecutive_5xx"),
    ({"consecutive_gateway": 1.5}, "consecutive_gateway"),
    ({"max_ejection_percent": 101}, "max_ejection_percent"),
    ({"max_ejection_percent": -1}, "max_ejection_percent"),
    ({"base_ejection_time": 0}, "base_ejection_time"),
    ({"max_ejection_time": float("nan")}, "max_ejection_time"),
    ({"decay_interval": float("inf")}, "decay_interval"),
])
def test_bad_parameters_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        OutlierDetector(eps(3), clock=FakeClock(), **kw)


def test_duplicate_endpoints_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        OutlierDetector([A, B, A], clock=FakeClock())


def test_defaults_follow_envoy():
    d = OutlierDetector(eps(3), clock=FakeClock())
    assert (d.consecutive_5xx, d.consecutive_gateway, d.base_ejection_time,
            d.max_ejection_percent, d.max_ejection_time) == (5, 5, 30.0, 10, 300.0)


def test_failing_counts_endpoints_in_a_failure_run_so_successes_can_skip_record():
    det = OutlierDetector([A, B, C], consecutive_5xx=3, clock=lambda: 0.0, max_ejection_percent=50)
    assert det.failing == 0
    det.record(A, 503)
    det.record(A, 500)
    det.record(B, 502)
    assert det.failing == 2
    det.record(A, 200)            # A's run ends
    assert det.failing == 1
    det.record(B, 503)
    det.record(B, 504)            # B reaches the threshold: ejected, its run over
    assert det.is_ejected(B) and det.failing == 0
    det.record(C, 500)
    det.update_endpoints([A, B])  # C leaves with its run
    assert det.failing == 0

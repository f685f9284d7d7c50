"""Token bucket, keyed limiter, shadow mode and RateLimit headers, on a fake clock.

Rates and steps are powers of two so the float arithmetic is exact.
"""
import pytest

from sidecar_proxy.policies.rate_limit import (
    Decision, KeyedLimiter, LocalRateLimit, TokenBucket, rate_limit_headers,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- TokenBucket -------------------------------------------------------------

def test_bucket_starts_full_and_drains_to_burst():
    b = TokenBucket(rate=2.0, burst=4, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [0.0] * 4
    assert b.take(0.0) == 0.5          # one token at 2/s is 0.5 s away
    assert b.remaining(0.0) == 0


def test_bucket_refill_timing_is_exact():
    b = TokenBucket(rate=4.0, burst=2, now=0.0)
    b.take(0.0)
    b.take(0.0)
    assert b.take(0.125) == 0.125      # half a token accrued, half to go at 4/s
    assert b.take(0.25) == 0.0         # exactly one token at 0.25 s
    assert b.tokens == 0.0
    assert b.take(0.375) == 0.125
    assert b.take(0.5) == 0.0


def test_bucket_partial_tokens_accumulate_across_denials():
    b = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert b.take(0.0) == 0.0
    assert b.take(0.25) == 0.75
    assert b.take(0.5) == 0.5          # a denial takes nothing
    assert b.take(1.0) == 0.0


def test_bucket_never_exceeds_burst():
    b = TokenBucket(rate=100.0, burst=3, now=0.0)
    assert b.remaining(1e6) == 3
    assert b.tokens == 3.0
    assert [b.take(1e6) for _ in range(4)][-1] > 0


def test_bucket_backwards_clock_adds_nothing():
    b = TokenBucket(rate=1.0, burst=2, now=10.0)
    b.take(10.0)
    b.take(10.0)
    assert b.take(5.0) == 1.0          # clock went back 5 s: still empty
    assert b.last == 10.0
    assert b.take(9.0) == 1.0
    assert b.take(10.5) == 0.5         # only real forward time counts
    assert b.take(11.0) == 0.0


def test_bucket_rounding_does_not_deny_a_due_token():
    b = TokenBucket(rate=3.0, burst=1, now=0.0)
    b.take(0.0)
    assert b.take(1.0 / 3.0) == 0.0


def test_bucket_remaining_and_reset_after():
    b = TokenBucket(rate=2.0, burst=4, now=0.0)
    assert b.remaining(0.0) == 4 and b.reset_after(0.0) == 0.0
    b.take(0.0)
    b.take(0.0)
    b.take(0.0)
    assert b.remaining(0.0) == 1
    assert b.reset_after(0.0) == 1.5   # 3 tokens at 2/s
    assert b.remaining(0.25) == 1      # 1.5 tokens floors to 1
    assert b.reset_after(0.25) == 1.25
    assert b.reset_after(10.0) == 0.0


@pytest.mark.parametrize("rate, burst", [(2.0, 1), (8.0, 5), (0.5, 3), (16.0, 20)])
def test_bucket_admits_rate_times_window_plus_burst(rate, burst):
    """Hammering every 1/64 s over a window admits burst + rate*window, within one."""
    b = TokenBucket(rate=rate, burst=burst, now=0.0)
    window = 16.0
    step = 1.0 / 64
    admitted = 0
    t = 0.0
    while t <= window:
        for _ in range(4):
            if b.take(t) == 0.0:
                admitted += 1
        t += step
    expected = burst + rate * window
    assert expected - 1 <= admitted <= expected


@pytest.mark.parametrize("rate, burst", [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_bucket_rejects_bad_limits(rate, burst):
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


# --- KeyedLimiter --------------------------------------------------------------

def test_keyed_buckets_are_independent():
    clock = FakeClock()
    lim = KeyedLimiter(rate=1.0, burst=1, max_keys=10, clock=clock)
    assert lim.check(b"a").allowed
    assert not lim.check(b"a").allowed
    assert lim.check(b"b").allowed
    d = lim.check(b"a")
    assert d == Decision(False, 1.0, 0, 1.0)


def test_keyed_none_shares_missing_bucket_outside_table():
    clock = FakeClock()
    lim = KeyedLimiter(rate=1.0, burst=2, max_keys=1, clock=clock)
    assert lim.check(None).allowed
    assert lim.check(None).allowed
    assert not lim.check(None).allowed
    assert len(lim) == 0
    assert lim.check(b"k").allowed     # a real key is unaffected
    assert lim.evicted == 0


def test_keyed_evicts_least_recently_used():
    clock = FakeClock()
    lim = KeyedLimiter(rate=1.0, burst=1, max_keys=3, clock=clock)
    for k in (b"a", b"b", b"c"):
        lim.check(k)
    lim.check(b"a")                    # a is now most recent; b is oldest
    lim.check(b"d")
    assert list(lim.buckets) == [b"c", b"a", b"d"]
    assert lim.evicted == 1
    lim.check(b"e")
    assert list(lim.buckets) == [b"a", b"d", b"e"]
    assert lim.evicted == 2


def test_evicted_key_comes_back_with_a_full_bucket():
    clock = FakeClock()
    lim = KeyedLimiter(rate=1.0, burst=1, max_keys=1, clock=clock)
    assert lim.check(b"a").allowed
    assert not lim.check(b"a").allowed
    lim.check(b"b")                    # evicts a
    assert lim.check(b"a").allowed     # the documented inexactness
    assert lim.evicted == 2


def test_keyed_table_bounded_after_10000_keys():
    clock = FakeClock()
    lim = KeyedLimiter(rate=1.0, burst=1, max_keys=100, clock=clock)
    for i in range(10_000):
        assert lim.check(b"k%d" % i).allowed
        assert len(lim) <= 100
    assert len(lim) == 100
    assert lim.evicted == 10_000 - 100
    assert list(lim.buckets) == [b"k%d" % i for i in range(9_900, 10_000)]


def test_keyed_take_matches_check():
    clock = FakeClock()
    lim = KeyedLimiter(rate=2.0, burst=1, max_keys=4, clock=clock)
    assert lim.take(b"x") == 0.0
    assert lim.take(b"x") == 0.5
    clock.advance(0.5)
    assert lim.take(b"x") == 0.0


def test_keyed_rejects_zero_keys():
    with pytest.raises(ValueError):
        KeyedLimiter(1.0, 1, 0, FakeClock())


# --- LocalRateLimit ------------------------------------------------------------

def test_local_enforcing_counts_and_decisions():
    clock = FakeClock()
    rl = LocalRateLimit(rate=1.0, burst=2, shadow=False, key=None, max_keys=10, clock=clock)
    decisions = [rl.check(None) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[0] == Decision(True, 0.0, 1, 1.0)
    assert decisions[2] == Decision(False, 1.0, 0, 2.0)
    assert (rl.allowed, rl.limited, rl.would_limit) == (2, 1, 0)
    clock.advance(1.0)
    assert rl.check(None).allowed


def test_local_without_key_ignores_key_values():
    clock = FakeClock()
    rl = LocalRateLimit(rate=1.0, burst=1, shadow=False, key=None, max_keys=10, clock=clock)
    assert rl.check(b"a").allowed
    assert not rl.check(b"b").allowed
    assert len(rl.limiter) == 0


def test_local_keyed_by_header_value():
    clock = FakeClock()
    rl = LocalRateLimit(rate=1.0, burst=1, shadow=False, key="x-user", max_keys=2, clock=clock)
    assert rl.check(b"a").allowed
    assert rl.check(b"b").allowed
    assert not rl.check(b"a").allowed
    assert rl.check(None).allowed      # missing header: its own bucket
    assert not rl.check(None).allowed
    rl.check(b"c")
    assert rl.evicted == 1


def test_shadow_mode_allows_and_counts_would_limit():
    clock = FakeClock()
    rl = LocalRateLimit(rate=1.0, burst=1, shadow=True, key=None, max_keys=10, clock=clock)
    decisions = [rl.check(None) for _ in range(5)]
    assert all(d.allowed for d in decisions)
    assert all(d.retry_after == 0.0 for d in decisions)
    assert (rl.allowed, rl.limited, rl.would_limit) == (1, 0, 4)
    assert [rl.allow(None) for _ in range(2)] == [0.0, 0.0]
    assert rl.would_limit == 6
    clock.advance(1.0)
    rl.check(None)
    assert rl.allowed == 2


def test_allow_fast_path_counts_like_check():
    clock = FakeClock()
    rl = LocalRateLimit(rate=4.0, burst=1, shadow=False, key="k", max_keys=10, clock=clock)
    assert rl.allow(b"a") == 0.0
    assert rl.allow(b"a") == 0.25
    assert (rl.allowed, rl.limited) == (1, 1)


# --- headers -------------------------------------------------------------------

def test_headers_on_allow():
    h = rate_limit_headers(Decision(True, 0.0, 7, 2.5), limit=10, window=1.0)
    assert h == [(b"ratelimit-limit", b"10"), (b"ratelimit-remaining", b"7"),
                 (b"ratelimit-reset", b"3"), (b"ratelimit-policy", b"10;w=1")]


def test_headers_on_full_bucket_reset_zero():
    h = dict(rate_limit_headers(Decision(True, 0.0, 10, 0.0), limit=10, window=5.0))
    assert h[b"ratelimit-reset"] == b"0"
    assert h[b"ratelimit-policy"] == b"10;w=5"
    assert b"retry-after" not in h


@pytest.mark.parametrize("retry_after, header", [
    (0.001, b"1"), (0.5, b"1"), (1.0, b"1"), (1.01, b"2"), (29.9, b"30"), (0.0, b"1"),
])
def test_headers_on_deny_retry_after_rounded_up_at_least_1(retry_after, header):
    h = rate_limit_headers(Decision(False, retry_after, 0, 4.2), limit=5, window=2.0)
    assert h[0] == (b"retry-after", header)
    assert dict(h)[b"ratelimit-remaining"] == b"0"
    assert dict(h)[b"ratelimit-reset"] == b"5"


def test_headers_from_a_real_denial():
    clock = FakeClock()
    rl = LocalRateLimit(rate=0.5, burst=2, shadow=False, key=None, max_keys=1, clock=clock)
    rl.check(None)
    rl.check(None)
    d = rl.check(None)
    assert dict(rate_limit_headers(d, limit=2, window=4.0)) == {
        b"retry-after": b"2", b"ratelimit-limit": b"2", b"ratelimit-remaining": b"0",
        b"ratelimit-reset": b"4", b"ratelimit-policy": b"2;w=4",
    }

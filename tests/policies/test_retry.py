"""Retry conditions, backoff, Retry-After, replay rules and the retry budget."""
import random
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from sidecar_proxy.policies.retry import (
    CONNECT_FAILURE, GATEWAY_ERROR, REFUSED_STREAM, RESET, SERVER_5XX,
    RetryBudget, RetryPolicy, parse_retry_after,
)

NOW = 1_700_000_000.0  # a fixed wall clock for HTTP dates


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def http_date(epoch: float) -> bytes:
    return format_datetime(datetime.fromtimestamp(epoch, timezone.utc), usegmt=True).encode()


def policy(**kw) -> RetryPolicy:
    args = dict(on=frozenset({CONNECT_FAILURE}), statuses=frozenset(), attempts=3, per_try_timeout=1.0)
    args.update(kw)
    return RetryPolicy(**args)


# --- retriable -----------------------------------------------------------------

@pytest.mark.parametrize("on, outcome, status, expected", [
    ({CONNECT_FAILURE}, CONNECT_FAILURE, None, True),
    ({CONNECT_FAILURE}, RESET, None, False),
    ({CONNECT_FAILURE}, REFUSED_STREAM, None, False),
    ({RESET, REFUSED_STREAM}, RESET, None, True),
    ({RESET, REFUSED_STREAM}, REFUSED_STREAM, None, True),
    ({SERVER_5XX}, CONNECT_FAILURE, None, False),   # 5xx names responses only
    ({SERVER_5XX}, None, 500, True),
    ({SERVER_5XX}, None, 599, True),
    ({SERVER_5XX}, None, 499, False),
    ({SERVER_5XX}, None, 200, False),
    ({GATEWAY_ERROR}, None, 502, True),
    ({GATEWAY_ERROR}, None, 503, True),
    ({GATEWAY_ERROR}, None, 504, True),
    ({GATEWAY_ERROR}, None, 500, False),
    ({GATEWAY_ERROR}, None, 501, False),
    (set(), None, 503, False),
    ({CONNECT_FAILURE}, "something-else", None, False),
    ({CONNECT_FAILURE}, None, None, False),
])
def test_retriable_conditions(on, outcome, status, expected):
    assert policy(on=frozenset(on)).retriable(outcome, status) is expected


def test_retriable_listed_statuses():
    p = policy(on=frozenset(), statuses=frozenset({409, 429}))
    assert p.retriable(None, 429) and p.retriable(None, 409)
    assert not p.retriable(None, 503)
    p = policy(on=frozenset({GATEWAY_ERROR}), statuses=frozenset({500}))
    assert p.retriable(None, 500) and p.retriable(None, 502) and not p.retriable(None, 501)


@pytest.mark.parametrize("kw", [
    {"on": frozenset({"5xxx"})}, {"statuses": frozenset({99})}, {"statuses": frozenset({"503"})},
    {"attempts": 0}, {"per_try_timeout": -1.0}, {"base": -1.0}, {"cap": -0.1},
    {"retry_after_cap": -1.0}, {"buffer_limit": -1},
])
def test_policy_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        policy(**kw)


def test_attempts_counts_the_first_try():
    assert policy(attempts=1).retries == 0
    assert policy(attempts=4).retries == 3


# --- backoff -------------------------------------------------------------------

@pytest.mark.parametrize("base, cap", [(0.025, 0.25), (0.1, 1.0), (0.01, 0.015), (0.0, 0.5)])
def test_backoff_bounds_over_many_seeded_draws(base, cap):
    p = policy(base=base, cap=cap)
    rng = random.Random(1234)
    for attempt in range(1, 13):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        draws = [p.backoff(attempt, rng.random) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in draws)
        if ceiling > 0:
            # full jitter actually spreads over the range
            assert min(draws) < 0.1 * ceiling and max(draws) > 0.9 * ceiling


def test_backoff_exact_with_fixed_rand():
    p = policy(base=0.025, cap=0.25)
    one = lambda: 1.0  # noqa: E731 - the upper edge of the jitter
    assert [p.backoff(n, one) for n in range(1, 7)] == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25]
    assert p.backoff(3, lambda: 0.5) == 0.05
    assert p.backoff(1, lambda: 0.0) == 0.0


def test_backoff_huge_and_nonpositive_attempts():
    p = policy(base=0.025, cap=0.25)
    assert p.backoff(10_000, lambda: 1.0) == 0.25     # no float overflow
    assert p.backoff(0, lambda: 1.0) == 0.025          # clamped to the first retry
    assert p.backoff(-3, lambda: 1.0) == 0.025


# --- Retry-After ---------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (b"0", 0.0),
    (b"1", 1.0),
    (b" 2 ", 2.0),
    (b"120", 120.0),
    (b"99999999999999999999999999", float("inf")),
    (http_date(NOW + 30), 30.0),
    (http_date(NOW - 30), 0.0),
    (b"Tue, 14 Nov 2023 22:13:50 -0000", 30.0),  # naive date taken as UTC
    (b"", None),
    (b"-5", None),
    (b"1.5", None),
    (b"soon", None),
    (b"Mon, 99 Foo 2023 99:99:99 GMT", None),
    (b"\xff\xfe", None),
    (b"1" * 100, None),
])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, FakeClock()) == expected


def test_parse_retry_after_date_needs_a_wall_clock():
    assert parse_retry_after(http_date(NOW + 30), None) is None
    assert parse_retry_after(b"5", None) == 5.0


@pytest.mark.parametrize("value, expected", [
    (b"0", 0.0),
    (b"1", 1.0),
    (b"3", 2.0),                         # capped by retry_after_cap
    (b"86400", 2.0),
    (b"99999999999999999999999999", 2.0),
    (http_date(NOW + 1), 1.0),
    (http_date(NOW + 3600), 2.0),
    (http_date(NOW - 3600), 0.0),        # in the past: retry now, never negative
])
def test_delay_honours_retry_after(value, expected):
    p = policy(retry_after_cap=2.0)
    assert p.delay(1, value, lambda: 1.0, FakeClock()) == expected


@pytest.mark.parametrize("value", [None, b"garbage", b"-1", b"", b"1e3"])
def test_delay_falls_back_to_backoff(value):
    p = policy(base=0.025, cap=0.25)
    assert p.delay(3, value, lambda: 1.0, FakeClock()) == 0.1
    assert p.delay(3, value, lambda: 0.5) == 0.05


def test_delay_without_wall_clock_ignores_dates():
    p = policy(base=0.025, cap=0.25, retry_after_cap=5.0)
    assert p.delay(1, http_date(NOW + 3), lambda: 1.0) == 0.025


def test_delay_never_negative_over_random_inputs():
    p = policy(retry_after_cap=1.0)
    rng = random.Random(7)
    clock = FakeClock()
    for _ in range(500):
        offset = rng.uniform(-1e6, 1e6)
        value = rng.choice([http_date(NOW + offset), b"%d" % abs(int(offset)), b"%d" % int(offset)])
        d = p.delay(rng.randint(1, 20), value, rng.random, clock)
        assert 0.0 <= d <= max(1.0, p.cap)


# --- may_retry_request -----------------------------------------------------------

LIMIT = 64 * 1024


@pytest.mark.parametrize("method, body, whole, started, written, non_idem, expected", [
    # idempotent, no body
    (b"GET", 0, False, False, 0, False, True),
    (b"GET", 0, False, False, 512, False, True),      # sent headers: still safe to replay
    (b"HEAD", 0, False, False, 100, False, True),
    (b"OPTIONS", 0, False, False, 100, False, True),
    (b"TRACE", 0, False, False, 100, False, True),
    (b"DELETE", 0, False, False, 100, False, True),
    # any response byte downstream ends it
    (b"GET", 0, False, True, 0, False, False),
    (b"GET", 0, False, True, 0, True, False),
    # bodies: only whole and within the buffer limit
    (b"PUT", 100, True, False, 300, False, True),
    (b"PUT", LIMIT, True, False, 300, False, True),
    (b"PUT", LIMIT + 1, True, False, 300, False, False),
    (b"PUT", 100, False, False, 0, False, False),     # streamed, not kept
    (b"GET", 10, False, False, 0, False, False),
    # non-idempotent: only when nothing reached the upstream
    (b"POST", 0, False, False, 0, False, True),
    (b"POST", 0, False, False, 1, False, False),
    (b"POST", 100, True, False, 0, False, True),
    (b"POST", 100, True, False, 150, False, False),
    (b"PATCH", 100, True, False, 10, False, False),
    (b"CONNECT", 0, False, False, 10, False, False),
    (b"PURGE", 0, False, False, 10, False, False),    # unknown method
    (b"get", 0, False, False, 10, False, False),      # methods are case-sensitive
    # ... unless explicitly allowed; body and response rules still hold
    (b"POST", 100, True, False, 150, True, True),
    (b"PATCH", 0, False, False, 10, True, True),
    (b"POST", 100, False, False, 0, True, False),
    (b"POST", LIMIT + 1, True, False, 0, True, False),
])
def test_may_retry_request(method, body, whole, started, written, non_idem, expected):
    p = policy(buffer_limit=LIMIT, retry_non_idempotent=non_idem)
    assert p.may_retry_request(method, body, whole, started, written) is expected


def test_buffer_limit_zero_allows_only_bodiless_requests():
    p = policy(buffer_limit=0)
    assert p.may_retry_request(b"GET", 0, False, False, 10)
    assert not p.may_retry_request(b"PUT", 1, True, False, 10)


# --- RetryBudget -----------------------------------------------------------------

def test_budget_floor_applies_with_few_requests():
    b = RetryBudget(ratio=0.2, min_retries=3)
    for _ in range(5):
        b.request_started()
    for _ in range(3):
        assert b.can_retry()
        b.retry_started()
    assert not b.can_retry()
    assert b.exhausted == 1
    b.retry_finished()
    assert b.can_retry()


def test_budget_ratio_applies_above_the_floor():
    b = RetryBudget(ratio=0.2, min_retries=3)
    for _ in range(100):
        b.request_started()
    granted = 0
    while b.can_retry():
        b.retry_started()
        granted += 1
    assert granted == 20
    assert b.exhausted == 1
    for _ in range(50):
        b.request_finished()
    assert not b.can_retry()                # 20 active >= max(3, 10)
    for _ in range(11):
        b.retry_finished()
    assert b.can_retry()                    # 9 < 10
    assert b.exhausted == 2


def test_budget_fractional_limit():
    b = RetryBudget(ratio=0.25, min_retries=0)
    for _ in range(6):
        b.request_started()                 # limit 1.5
    assert b.can_retry()
    b.retry_started()
    assert b.can_retry()                    # 1 < 1.5
    b.retry_started()
    assert not b.can_retry()                # 2 >= 1.5


def test_budget_zero_floor_and_idle_cluster():
    b = RetryBudget(ratio=0.2, min_retries=0)
    assert not b.can_retry()
    assert RetryBudget().can_retry()        # default floor of 3 lets an idle cluster retry


def test_budget_counts_never_negative():
    b = RetryBudget()
    b.request_finished()
    b.retry_finished()
    assert (b.active_requests, b.active_retries) == (0, 0)


@pytest.mark.parametrize("kw", [{"ratio": -0.1}, {"min_retries": -1}])
def test_budget_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        RetryBudget(**kw)


def test_budget_allows_on_counts_kept_by_the_caller():
    b = RetryBudget(ratio=0.2, min_retries=3)
    assert b.allows(active_requests=0, active_retries=2)
    assert not b.allows(active_requests=0, active_retries=3)          # the floor
    assert b.allows(active_requests=100, active_retries=19)           # 20 % of 100
    assert not b.allows(active_requests=100, active_retries=20)
    assert b.exhausted == 2


def test_policy_without_a_per_try_timeout():
    assert policy(per_try_timeout=0.0).per_try_timeout == 0.0

import pytest

from sidecar_proxy.upstream.breaker import KINDS, CircuitBreakers


def breakers(connections=2, pending=3, requests=4, retries=1):
    return CircuitBreakers(connections, pending, requests, retries)


@pytest.mark.parametrize("kind,limit", [("connections", 2), ("pending", 3), ("requests", 4), ("retries", 1)])
def test_each_kind_admits_up_to_its_limit_then_overflows_and_counts(kind, limit):
    cb = breakers()
    assert [cb.try_acquire(kind) for _ in range(limit)] == [True] * limit
    assert cb.active[kind] == limit
    assert cb.try_acquire(kind) is False
    assert cb.try_acquire(kind) is False
    assert cb.active[kind] == limit, "a refused acquire must not take a slot"
    assert cb.overflow[kind] == 2
    # Kinds are independent: the others neither filled nor overflowed.
    for other in KINDS:
        if other != kind:
            assert cb.active[other] == 0 and cb.overflow[other] == 0
            assert cb.try_acquire(other) is True


def test_release_frees_exactly_one_slot():
    cb = breakers(requests=2)
    assert cb.try_acquire("requests") and cb.try_acquire("requests")
    assert not cb.try_acquire("requests")
    cb.release("requests")
    assert cb.active["requests"] == 1
    assert cb.try_acquire("requests") is True
    assert cb.try_acquire("requests") is False
    assert cb.overflow["requests"] == 2


def test_release_below_zero_is_clamped_and_counted():
    cb = breakers(retries=1)
    cb.release("retries")
    cb.release("retries")
    assert cb.active["retries"] == 0
    assert cb.release_errors == 2
    # A buggy extra release must not raise the effective limit.
    assert cb.try_acquire("retries") is True
    assert cb.try_acquire("retries") is False
    cb.release("retries")
    cb.release("retries")
    assert cb.active["retries"] == 0 and cb.release_errors == 3


def test_gauges_never_go_negative_under_random_interleaving():
    import random
    rng = random.Random(7)
    cb = breakers(connections=5, pending=5, requests=5, retries=5)
    held = dict.fromkeys(KINDS, 0)
    for _ in range(5000):
        kind = rng.choice(KINDS)
        if rng.random() < 0.5:
            if cb.try_acquire(kind):
                held[kind] += 1
        else:
            cb.release(kind)
            if held[kind]:
                held[kind] -= 1
        assert all(0 <= cb.active[k] <= cb.limits[k] for k in KINDS)
        assert cb.active == held


def test_zero_limit_rejects_everything():
    cb = CircuitBreakers(0, 0, 0, 0)
    for kind in KINDS:
        assert cb.try_acquire(kind) is False
        assert cb.remaining(kind) == 0
    assert cb.overflow == dict.fromkeys(KINDS, 1)


def test_defaults_are_envoys():
    cb = CircuitBreakers()
    assert cb.limits == {"connections": 1024, "pending": 1024, "requests": 1024, "retries": 3}


def test_unknown_kind_is_a_programming_error():
    cb = breakers()
    with pytest.raises(KeyError):
        cb.try_acquire("request")
    with pytest.raises(KeyError):
        cb.release("conn")


@pytest.mark.parametrize("bad", [-1, 1.5, None, True, "10"])
def test_limits_must_be_non_negative_ints(bad):
    with pytest.raises(ValueError, match="max_requests"):
        CircuitBreakers(1, 1, bad, 1)


def test_set_limits_keeps_gauges_and_a_lowered_limit_blocks_until_drained():
    cb = breakers(requests=4)
    for _ in range(3):
        assert cb.try_acquire("requests")
    cb.set_limits(2, 3, 1, 1)
    assert cb.active["requests"] == 3
    assert cb.remaining("requests") == 0
    assert cb.try_acquire("requests") is False
    cb.release("requests")
    cb.release("requests")
    assert cb.try_acquire("requests") is False  # 1 held, limit 1
    cb.release("requests")
    assert cb.try_acquire("requests") is True
    assert cb.release_errors == 0


def test_remaining_and_stats_are_copies():
    cb = breakers(pending=3)
    cb.try_acquire("pending")
    assert cb.remaining("pending") == 2
    stats = cb.stats()
    assert stats["active"]["pending"] == 1 and stats["limits"]["pending"] == 3
    stats["active"]["pending"] = 99
    assert cb.active["pending"] == 1


def test_objects_are_slotted():
    with pytest.raises(AttributeError):
        breakers().extra = 1

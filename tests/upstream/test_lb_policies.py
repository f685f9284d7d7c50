import random
from collections import Counter

import pytest

from sidecar_proxy.upstream.balancer import least_request, random_pick

A, B, C, D = [(f"10.0.0.{i}", 80) for i in range(1, 5)]


def seq(*values):
    """A rand that returns exactly these values, then fails loudly."""
    it = iter(values)
    return lambda: next(it)


# --- random_pick -----------------------------------------------------------------------------------

def test_random_pick_maps_rand_onto_cumulative_weights():
    # weights 5, 1, 1 -> [0, 5/7) A, [5/7, 6/7) B, [6/7, 1) C
    pick = random_pick([A, B, C], [5, 1, 1], seq(0.0, 0.7, 5 / 7, 0.857, 6 / 7, 0.999999))
    assert [pick() for _ in range(6)] == [A, A, B, B, C, C]


def test_random_pick_float_edge_is_clamped():
    pick = random_pick([A, B], [1, 1], seq(1.0))  # out of contract, still in range
    assert pick() == B


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (5, 1, 1, 3), (1000, 1, 10, 100)])
def test_random_pick_distribution_follows_weights(weights):
    rng = random.Random(42)
    pick = random_pick([A, B, C, D], weights, rng.random)
    n = 20_000
    counts = Counter(pick() for _ in range(n))
    total = sum(weights)
    for ep, w in zip([A, B, C, D], weights):
        expected = n * w / total
        # 5 standard deviations of a binomial, plus 1 for tiny expectations.
        tolerance = 5 * (n * (w / total) * (1 - w / total)) ** 0.5 + 1
        assert abs(counts[ep] - expected) <= tolerance, (ep, counts[ep], expected)


def test_random_pick_single_endpoint():
    pick = random_pick([A], [3], random.Random(1).random)
    assert {pick() for _ in range(50)} == {A}


def test_random_pick_among_a_subset():
    pick = random_pick([A, B, C, D], [1, 2, 3, 4], seq(0.0, 0.5, 0.99, 0.5))
    subset = (B, D)  # weights 2, 4 -> [0, 1/3) B, [1/3, 1) D
    assert [pick(subset), pick(subset), pick(subset)] == [B, D, D]
    assert pick() == C  # full set: 0.5 * 10 = 5 -> C's [3, 6)


def test_subset_distribution_follows_weights_and_never_leaves_the_subset():
    rng = random.Random(3)
    pick = random_pick([A, B, C, D], [1, 2, 3, 4], rng.random)
    subset = (A, C)
    counts = Counter(pick(subset) for _ in range(20_000))
    assert set(counts) == {A, C}
    assert 0.23 < counts[A] / 20_000 < 0.27


def test_subset_cache_is_keyed_on_identity():
    pick = random_pick([A, B, C], [1, 1, 1], seq(*[0.0] * 10))
    first = (B, C)
    assert pick(first) == B
    assert pick(first) == B
    # An equal-looking but different object is rebuilt, not served stale.
    assert pick((C, B)) == C
    assert pick(first) == B


def test_empty_or_unknown_subset_falls_back_to_all_endpoints():
    pick = random_pick([A, B], [1, 1], seq(0.0, 0.0, 0.99))
    assert pick(()) == A
    assert pick([("192.0.2.1", 1)]) == A
    assert pick([("192.0.2.1", 1), B]) == B  # unknown candidates are ignored


@pytest.mark.parametrize("endpoints,weights,match", [
    ([], [], "no endpoints"),
    ([A, B], [1], "2 endpoints"),
    ([A, B], [1, 0], "weight"),
    ([A], [1.5], "weight"),
])
def test_bad_input_is_rejected(endpoints, weights, match):
    with pytest.raises(ValueError, match=match):
        random_pick(endpoints, weights)
    with pytest.raises(ValueError, match=match):
        least_request(endpoints, weights, lambda i: 0)


# --- least_request (power of two choices) ----------------------------------------------------------

def test_p2c_prefers_the_less_loaded_of_the_two_drawn():
    load = [10, 0, 5, 7]
    pick = least_request([A, B, C, D], [1, 1, 1, 1], load.__getitem__,
                         # draws: (A, then B among the rest), (C, then A), (D, then C)
                         seq(0.0, 0.0, 0.5, 0.0, 0.9, 0.9))
    assert pick() == B
    assert pick() == C
    assert pick() == C


def test_p2c_tie_goes_to_the_first_drawn():
    pick = least_request([A, B, C], [1, 1, 1], lambda i: 3, seq(0.9, 0.0, 0.0, 0.9))
    assert pick() == C  # C first, then A: tie -> C
    assert pick() == A  # A first, then C: tie -> A


def test_p2c_two_draws_are_always_distinct():
    drawn = []

    def active(i):
        drawn.append(i)
        return 0

    rng = random.Random(11)
    pick = least_request([A, B, C], [1, 100, 1], active, rng.random)
    for _ in range(2000):
        pick()
    pairs = list(zip(drawn[0::2], drawn[1::2]))
    assert all(a != b for a, b in pairs)


def test_p2c_second_draw_is_weighted_over_the_rest():
    # First draw B (weights 1, 2, 3 on [0, 6): B is [1, 3)). The rest is A
    # (weight 1) and C (weight 3) on a line of 4: r < 0.25 -> A, else C.
    seen = []
    pick = least_request([A, B, C], [1, 2, 3], lambda i: seen.append(i) or 0,
                         seq(0.2, 0.24, 0.2, 0.25))
    pick()
    pick()
    assert seen == [1, 0, 1, 2]


def test_p2c_single_endpoint_draws_nothing():
    pick = least_request([A], [1], lambda i: 0, seq())
    assert pick() == A
    pick2 = least_request([A, B, C], [1, 1, 1], lambda i: 0, seq())
    assert pick2((B,)) == B


def test_p2c_with_equal_load_follows_weights():
    rng = random.Random(5)
    weights = [1, 2, 3, 4]
    pick = least_request([A, B, C, D], weights, lambda i: 0, rng.random)
    n = 20_000
    counts = Counter(pick() for _ in range(n))
    # Equal load: the first (weighted) draw wins every time.
    for ep, w in zip([A, B, C, D], weights):
        assert abs(counts[ep] / n - w / 10) < 0.015, counts


def test_p2c_steers_away_from_a_loaded_endpoint():
    rng = random.Random(9)
    load = [0, 0, 0, 50]
    pick = least_request([A, B, C, D], [1, 1, 1, 1], load.__getitem__, rng.random)
    counts = Counter(pick() for _ in range(20_000))
    # D only wins when drawn... never: any partner has less load.
    assert counts[D] == 0
    assert all(6000 < counts[ep] < 7400 for ep in (A, B, C)), counts


def test_p2c_among_a_subset_uses_full_list_indices_for_load():
    asked = []

    def active(i):
        asked.append(i)
        return {1: 9, 3: 1}[i]

    pick = least_request([A, B, C, D], [1, 1, 1, 1], active, seq(0.0, 0.0))
    assert pick((B, D)) == D
    assert asked == [1, 3]

"""Endpoint choice for a cluster. Built once per snapshot, O(1) or O(n) per pick.

``make_picker`` builds the cluster's ``lb`` policy — ``round_robin``,
``random_pick`` or ``least_request`` — once per snapshot from its endpoints
and weights. Each returns ``pick(candidates=None)``:

- ``candidates=None``: choose among all endpoints, O(log n) per pick.
- ``candidates=<sequence>``: choose among that subset, typically
  ``OutlierDetector.healthy()``. The subset's cumulative weights are cached
  keyed on the sequence's *identity* (one entry; the reference is held, so
  ids cannot be recycled): passing the same object again costs O(log k); a
  new object costs one O(n) rebuild. The detector returns the same tuple
  until an endpoint is ejected or returns, so a rebuild happens per health
  change, not per request. Do not mutate a sequence after passing it; pass a
  new one. Candidates that are not endpoints of the cluster are ignored, and
  an empty (or entirely unknown) subset falls back to all endpoints — the
  same degraded answer as outlier panic mode.

``rand`` is injectable (``random.random`` by default): any ``() -> float`` in
[0, 1), so tests drive exact sequences.
"""
from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from typing import Callable, Sequence

from ..config.model import Cluster


def round_robin(cluster: Cluster) -> Callable[..., tuple[str, int]]:
    """Plain rotation when weights are equal, smooth weighted RR otherwise.

    Smooth WRR spreads a heavy endpoint's turns out (a,b,a,c,a,b,a,...)
    instead of sending it a burst, so a weight change does not cause a spike.
    ``pick(candidates)`` skips turns of endpoints not in ``candidates`` (at
    most one full rotation; none of them known: an endpoint of all).
    """
    addrs = [(ep.host, ep.port) for ep in cluster.endpoints]
    weights = [ep.weight for ep in cluster.endpoints]
    if len(set(weights)) <= 1:
        turn = itertools.cycle(addrs).__next__
    else:
        total = sum(weights)
        current = [0] * len(addrs)

        def turn() -> tuple[str, int]:
            best = 0
            for i, w in enumerate(weights):
                current[i] += w
                if current[i] > current[best]:
                    best = i
            current[best] -= total
            return addrs[best]

    n = len(addrs)

    def pick(candidates: Sequence[tuple[str, int]] | None = None) -> tuple[str, int]:
        if candidates is None:
            return turn()
        for _ in range(n):
            addr = turn()
            if addr in candidates:
                return addr
        return turn()

    pick.turn = turn  # pick() without candidates, minus a call: for the per-request path
    return pick


def make_picker(cluster: Cluster, active: Callable[[int], int] | None = None,
                rand: Callable[[], float] = random.random) -> Callable[..., tuple[str, int]] | None:
    """The cluster's ``lb`` policy as ``pick(candidates=None)``; None for an
    original-destination cluster (the connection names its target).

    ``active(i)``: in-flight requests of endpoint ``i`` (least_request only).
    """
    if cluster.original_destination:
        return None
    if cluster.lb == "round_robin":
        return round_robin(cluster)
    endpoints = [(ep.host, ep.port) for ep in cluster.endpoints]
    weights = [ep.weight for ep in cluster.endpoints]
    if cluster.lb == "random":
        return random_pick(endpoints, weights, rand)
    if cluster.lb == "least_request":
        return least_request(endpoints, weights, active or (lambda i: 0), rand)
    raise ValueError(f"unknown lb policy {cluster.lb!r}")


Addr = tuple[str, int]
Picker = Callable[..., Addr]


class _Weighted:
    """A candidate set as base indices and cumulative weights (ends: [5, 6, 7] for 5, 1, 1)."""

    __slots__ = ("key", "idx", "weights", "cum", "total")

    def __init__(self, key: object, idx: list[int], all_weights: Sequence[int]) -> None:
        self.key = key
        self.idx = idx
        self.weights = [all_weights[i] for i in idx]
        self.cum = list(itertools.accumulate(self.weights))
        self.total = self.cum[-1]

    def draw(self, r: float) -> int:
        """Position in this set for r in [0, 1); clamped against float rounding at the top."""
        i = bisect_right(self.cum, r * self.total)
        return i if i < len(self.cum) else len(self.cum) - 1

    def draw_other(self, first: int, r: float) -> int:
        """A second position != first, weighted over the rest, in one draw (no retry loop).

        Draw on a line with ``first``'s interval cut out, then map back past it.
        """
        w = self.weights[first]
        x = r * (self.total - w)
        if x >= self.cum[first] - w:
            x += w
        j = bisect_right(self.cum, x)
        if j >= len(self.cum):
            j = len(self.cum) - 1
        if j == first:  # only reachable through float rounding at an edge
            j = first - 1 if first else first + 1
        return j


def _check(endpoints: Sequence[Addr], weights: Sequence[int]) -> None:
    if not endpoints:
        raise ValueError("load balancer: no endpoints")
    if len(weights) != len(endpoints):
        raise ValueError(f"load balancer: {len(weights)} weights for {len(endpoints)} endpoints")
    for w in weights:
        if type(w) is not int or w < 1:
            raise ValueError(f"load balancer: weight must be an int >= 1, got {w!r}")


def _resolver(endpoints: tuple[Addr, ...], weights: tuple[int, ...]) -> Callable[[Sequence[Addr] | None], _Weighted]:
    """candidates -> _Weighted, with the full set prebuilt and a one-entry identity cache for subsets."""
    full = _Weighted(endpoints, list(range(len(endpoints))), weights)
    position = {ep: i for i, ep in enumerate(endpoints)}
    cache = [full]

    def resolve(candidates: Sequence[Addr] | None) -> _Weighted:
        if candidates is None:
            return full
        hit = cache[0]
        if candidates is hit.key:
            return hit
        idx = [position[ep] for ep in candidates if ep in position]
        built = _Weighted(candidates, idx, weights) if idx else full
        if idx:
            cache[0] = built
        return built

    return resolve


def random_pick(endpoints: Sequence[Addr], weights: Sequence[int],
                rand: Callable[[], float] = random.random) -> Picker:
    """Weighted random: one rand() and a bisect on cumulative weights, O(log n)."""
    endpoints, weights = tuple(endpoints), tuple(weights)
    _check(endpoints, weights)
    resolve = _resolver(endpoints, weights)

    def pick(candidates: Sequence[Addr] | None = None) -> Addr:
        s = resolve(candidates)
        return endpoints[s.idx[s.draw(rand())]]

    return pick


def least_request(endpoints: Sequence[Addr], weights: Sequence[int], active: Callable[[int], int],
                  rand: Callable[[], float] = random.random) -> Picker:
    """Power of two choices: two distinct weighted draws, the one with fewer active requests wins.

    ``active(i)`` is the in-flight count of ``endpoints[i]`` (index into the
    full list, also for subsets) — e.g. ``counts.__getitem__`` on a list the
    pool keeps per endpoint. Ties go to the first drawn. One candidate is
    returned without drawing. Cost: two rand(), two bisects, two active()
    calls; no allocation.
    """
    endpoints, weights = tuple(endpoints), tuple(weights)
    _check(endpoints, weights)
    resolve = _resolver(endpoints, weights)

    def pick(candidates: Sequence[Addr] | None = None) -> Addr:
        s = resolve(candidates)
        idx = s.idx
        if len(idx) == 1:
            return endpoints[idx[0]]
        first = s.draw(rand())
        second = s.draw_other(first, rand())
        a, b = idx[first], idx[second]
        return endpoints[a] if active(a) <= active(b) else endpoints[b]

    return pick

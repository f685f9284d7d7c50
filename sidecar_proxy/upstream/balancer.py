"""Endpoint choice for a cluster. Built once per snapshot, O(1) or O(n) per pick."""
from __future__ import annotations

import itertools
from typing import Callable

from ..config.model import Cluster


def round_robin(cluster: Cluster) -> Callable[[], tuple[str, int]]:
    """Plain rotation when weights are equal, smooth weighted RR otherwise.

    Smooth WRR spreads a heavy endpoint's turns out (a,b,a,c,a,b,a,...)
    instead of sending it a burst, so a weight change does not cause a spike.
    """
    addrs = [(ep.host, ep.port) for ep in cluster.endpoints]
    weights = [ep.weight for ep in cluster.endpoints]
    if len(set(weights)) <= 1:
        return itertools.cycle(addrs).__next__
    total = sum(weights)
    current = [0] * len(addrs)

    def pick() -> tuple[str, int]:
        best = 0
        for i, w in enumerate(weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return addrs[best]

    return pick


def make_picker(cluster: Cluster) -> Callable[[], tuple[str, int]] | None:
    """None for an original-destination cluster: the connection names its target."""
    if cluster.original_destination:
        return None
    return round_robin(cluster)

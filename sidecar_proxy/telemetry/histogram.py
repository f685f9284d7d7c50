"""Histograms the event loop observes without locks or allocation, exposed through prometheus-client.

prometheus_client.Histogram takes a lock and walks every bucket on each
observe (about 1 us with 17 buckets); a request records four histograms, so
that alone would eat the 3 us the issue allows metrics per request. Here a
child holds a preallocated list of per-bucket counts (not cumulative) and a
sum: ``observe`` is one bisect, one list item increment and one float add
(~0.15 us, measured in tests/telemetry/bench_telemetry.py). The cumulative
buckets, ``_count`` and ``_sum`` are computed at scrape time by
:class:`HistogramFamily.collect`, which prometheus-client renders as text or
OpenMetrics like any of its own histograms.

Threading: children are written by the event loop thread only. A scrape
from another thread may read a child between its count and its sum update,
never a torn value (each is one Python object swap under the GIL); a scrape
on the loop thread (the admin endpoint, the scrape listener) sees every
child consistent, so ``_count`` equals the number of observations made.
"""
from __future__ import annotations

import math
from bisect import bisect_left
from typing import Iterable, Sequence

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Request durations: a loopback hop through the proxy takes ~100 us, a slow
# upstream seconds; 30 s is past any sane route timeout.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Body sizes: bodiless requests land in 0, a typical JSON API in 100..10 KiB.
SIZE_BUCKETS = (0, 100, 1 << 10, 10 << 10, 100 << 10, 1 << 20, 10 << 20, 100 << 20)


class HistogramChild:
    """One label set. ``counts[i]`` counts observations in (bounds[i-1], bounds[i]]; the last is +Inf."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, _bisect=bisect_left) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is "less or equal").
        self.counts[_bisect(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class HistogramFamily:
    """A named histogram with label children, registered as a prometheus-client collector.

    ``labels(*values)`` returns the child for those values, created once:
    bind it when the snapshot is built, not per request (label values are
    config names and fixed sets, so the number of children stays bounded).
    A child appears in the exposition from its first observation on, so
    binding every combination up front costs memory, not series.
    """

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(b >= a for a, b in zip(bounds[1:], bounds)) or not all(map(math.isfinite, bounds)):
            raise ValueError(f"{name}: buckets must be finite and strictly increasing")
        if name.endswith(("_bucket", "_count", "_sum", "_total")):
            raise ValueError(f"{name}: a histogram name does not end in _bucket/_count/_sum/_total")
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is the bucket label")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.bounds = bounds
        self._les = [floatToGoString(b) for b in bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(key)}")
            child = self._children[key] = HistogramChild(self.bounds)
        return child

    def remove(self, *values: str) -> None:
        """Forget a child (a cluster that left the config); its series disappear from the next scrape."""
        self._children.pop(tuple(str(v) for v in values), None)

    def children(self) -> Iterable[tuple[tuple[str, ...], HistogramChild]]:
        return list(self._children.items())

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.help, labels=self.labelnames)]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.help, labels=self.labelnames)
        les = self._les
        for values, child in self.children():
            counts = list(child.counts)   # one copy, so buckets and _count agree with each other
            total = child.sum
            if not any(counts):
                continue   # bound but never observed: no series yet (bounds what a scrape carries)
            running = 0
            buckets = []
            for le, n in zip(les, counts):
                running += n
                buckets.append((le, running))
            family.add_metric(list(values), buckets, total)
        return [family]

"""Per-cluster circuit breakers: four counting gates, Envoy's `circuit_breakers.thresholds`.

Pure: no I/O, no clock, no awaiting. ``try_acquire`` is O(1), never blocks
and never queues — a full gate answers False at once, the caller fails the
request fast and the overflow is counted. Nothing here times out: a slot is
held exactly as long as the caller holds it, and every successful
``try_acquire`` must be paired with one ``release`` of the same kind
(``try/finally`` in the caller).

How the exchange uses it (the gate is context-free: it never sees a request,
only counts; linkerd2-proxy's ``stack/src/gate.rs`` idea — the request path
only checks, it does not decide)::

    kind          acquired                                   released
    "requests"    at dispatch to the cluster, once per        when the response (or error)
                  downstream request                          is finished
    "pending"     while the request waits for a pooled or     when it gets a connection or
                  new upstream connection                     gives up
    "connections" per upstream connection opened (not per     when that connection closes
                  reuse from the pool)
    "retries"     per retry attempt (not the first try)       when that attempt finishes

    A False from try_acquire means: answer 503 with response flag "UO"
    (upstream overflow) without touching the upstream; for "retries" it
    means: do not retry, return the last upstream answer instead.

The object must outlive config snapshots (keep it per cluster *name*): a
request releases on the object it acquired from, so replacing the breaker on
a swap would let old requests release into a fresh gauge. ``set_limits``
changes thresholds in place and keeps the gauges.
"""
from __future__ import annotations

KINDS = ("connections", "pending", "requests", "retries")

# Envoy's defaults for cluster circuit breakers.
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING_REQUESTS = 1024
DEFAULT_MAX_REQUESTS = 1024
DEFAULT_MAX_RETRIES = 3


class CircuitBreakers:
    """Gauges ``active[kind]``, limits ``limits[kind]``, counters ``overflow[kind]``.

    Invariant: ``0 <= active[kind]``; ``active[kind] <= limits[kind]`` except
    after ``set_limits`` lowered a limit below the current gauge (then new
    acquires fail until releases bring it under). A ``release`` with nothing
    held is a caller bug: the gauge stays at 0 and ``release_errors`` counts it,
    so one bug cannot silently raise the effective limit for everyone else.
    """

    __slots__ = ("active", "limits", "overflow", "release_errors")

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS,
                 max_requests: int = DEFAULT_MAX_REQUESTS,
                 max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        self.active = dict.fromkeys(KINDS, 0)
        self.overflow = dict.fromkeys(KINDS, 0)
        self.release_errors = 0
        self.limits: dict[str, int] = {}
        self.set_limits(max_connections, max_pending_requests, max_requests, max_retries)

    def set_limits(self, max_connections: int, max_pending_requests: int,
                   max_requests: int, max_retries: int) -> None:
        """Replace the thresholds, keeping the gauges (a snapshot swap)."""
        limits = dict(zip(KINDS, (max_connections, max_pending_requests, max_requests, max_retries)))
        for kind, value in limits.items():
            # bool is an int subclass; True as a limit is a config bug, not 1.
            if type(value) is not int or value < 0:
                raise ValueError(f"circuit breaker max_{kind}: must be an int >= 0, got {value!r}")
        self.limits = limits

    def try_acquire(self, kind: str) -> bool:
        """Take one slot of ``kind``; False (and one overflow counted) when full.

        An unknown kind raises KeyError: it is a programming error, not load.
        """
        n = self.active[kind]
        if n >= self.limits[kind]:
            self.overflow[kind] += 1
            return False
        self.active[kind] = n + 1
        return True

    def release(self, kind: str) -> None:
        n = self.active[kind]
        if n <= 0:
            self.release_errors += 1
            return
        self.active[kind] = n - 1

    def remaining(self, kind: str) -> int:
        """Free slots of ``kind`` now (0 when full or over a lowered limit)."""
        return max(0, self.limits[kind] - self.active[kind])

    def stats(self) -> dict[str, object]:
        """A copy for the admin endpoint and metrics; not for the request path."""
        return {"active": dict(self.active), "limits": dict(self.limits),
                "overflow": dict(self.overflow), "release_errors": self.release_errors}

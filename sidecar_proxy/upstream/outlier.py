"""Passive health: eject endpoints that keep failing (Envoy's consecutive_5xx / gateway outlier detection).

Pure and timer-free: results go in through ``record`` (off the request's
critical decision — the request itself only reads ``healthy()``), time comes
from the injected clock or an explicit ``now``, and an ejected endpoint comes
back lazily on the first ``healthy()`` / ``is_ejected()`` / ``record()`` call
at or after its return time. While nothing is ejected ``healthy()`` is one
float comparison and returns a cached tuple; the tuple is rebuilt (O(n)) only
when an endpoint is ejected or returns, so its *identity* changes exactly
when the healthy set does — pickers in ``balancer`` key their caches on it.

Decisions (each has a test in tests/upstream/test_outlier.py):

- What counts. ``connect_failed`` is a gateway failure *and* a 5xx (Envoy
  maps local-origin failures to 503 unless split_external_local_origin_errors).
  502/503/504 count toward both counters; any other 5xx counts toward
  consecutive_5xx and breaks a gateway run (the run is of *consecutive*
  gateway failures). status < 500 resets both. ``status=None`` without a
  connect failure means no upstream verdict (downstream went away, cancelled)
  and changes nothing; the caller records an upstream timeout as 504.
- Results for an endpoint that is already ejected are ignored: they are from
  requests sent before the ejection and must not start the next run early.
- Reaching a threshold resets both counters whether or not the ejection is
  allowed, so a capped endpoint needs a fresh run before the next attempt
  (counted in ``ejections_overflow`` when refused).
- Ejection time is ``base_ejection_time * ejection_count``, capped at
  ``max(max_ejection_time, base_ejection_time)``. ``ejection_count`` decays by
  one per ``decay_interval`` seconds the endpoint has spent back in service
  (Envoy decrements its multiplier once per healthy interval), computed at the
  next ejection instead of by a timer.
- max_ejection_percent: an ejection is allowed when
  ``(ejected_now + 1) * 100 <= max_ejection_percent * n`` (integer maths), or
  when nothing is ejected yet and n >= 2 and max_ejection_percent > 0 — like
  Envoy, at least one endpoint may always be ejected. A single-endpoint
  cluster is never ejected (all traffic would go to it anyway via panic), and
  max_ejection_percent = 0 disables ejection. 3 endpoints at 10 % -> 1,
  10 -> 1, 20 -> 2.
- Panic: when every endpoint is ejected (possible at 100 %, or after
  ``update_endpoints`` dropped the healthy ones) ``healthy()`` returns all
  endpoints and ``panic`` is True: a degraded answer beats a certain 503.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

Addr = tuple[str, int]

_GATEWAY = frozenset((502, 503, 504))
_NEVER = math.inf


class _Host:
    """Per-endpoint state: plain numbers, no per-request allocation."""

    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejection_count", "ejected_until", "returned_at")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejection_count = 0
        self.ejected_until: float | None = None   # None: in service
        self.returned_at: float | None = None     # when the last ejection ended


class OutlierDetector:
    __slots__ = ("endpoints", "consecutive_5xx", "consecutive_gateway", "base_ejection_time",
                 "max_ejection_percent", "max_ejection_time", "decay_interval", "clock",
                 "panic", "ejections_total", "ejected_now", "ejections_overflow", "unknown_records",
                 "failing", "_hosts", "_healthy", "_next_return")

    def __init__(self, endpoints: Iterable[Addr], consecutive_5xx: int = 5, consecutive_gateway: int = 5,
                 base_ejection_time: float = 30.0, max_ejection_percent: int = 10,
                 max_ejection_time: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 decay_interval: float = 10.0) -> None:
        for name, value in (("consecutive_5xx", consecutive_5xx), ("consecutive_gateway", consecutive_gateway)):
            if type(value) is not int or value < 1:
                raise ValueError(f"outlier detection {name}: must be an int >= 1, got {value!r}")
        if type(max_ejection_percent) is not int or not 0 <= max_ejection_percent <= 100:
            raise ValueError(f"outlier detection max_ejection_percent: must be an int 0..100, got {max_ejection_percent!r}")
        for name, value in (("base_ejection_time", base_ejection_time), ("max_ejection_time", max_ejection_time),
                            ("decay_interval", decay_interval)):
            if not value > 0 or value == _NEVER:
                raise ValueError(f"outlier detection {name}: must be a finite number > 0, got {value!r}")
        self.consecutive_5xx = consecutive_5xx
        self.consecutive_gateway = consecutive_gateway
        self.base_ejection_time = float(base_ejection_time)
        self.max_ejection_percent = max_ejection_percent
        self.max_ejection_time = float(max(max_ejection_time, base_ejection_time))
        self.decay_interval = float(decay_interval)
        self.clock = clock
        self.panic = False
        self.ejections_total = 0      # ejections ever made
        self.ejected_now = 0          # endpoints ejected at the last check
        self.ejections_overflow = 0   # thresholds reached but refused by max_ejection_percent
        self.unknown_records = 0      # results for endpoints not in the set (removed by a swap)
        # Endpoints in the middle of a failure run. While 0, a success changes nothing, so the
        # request path may skip record() for a status under 500 (the common case, one call saved).
        self.failing = 0
        self._hosts: dict[Addr, _Host] = {}
        self.endpoints: tuple[Addr, ...] = ()
        self._healthy: tuple[Addr, ...] = ()
        self._next_return = _NEVER
        self.update_endpoints(endpoints)

    # --- the request path: reads only -------------------------------------------------------------

    def healthy(self, now: float | None = None) -> tuple[Addr, ...]:
        """Endpoints in service (all of them in panic). Cached: treat as read-only."""
        if self._next_return != _NEVER:
            self._expire(self.clock() if now is None else now)
        return self._healthy

    def is_ejected(self, endpoint: Addr, now: float | None = None) -> bool:
        """False for an endpoint not in the set: it has no outlier state to be ejected by."""
        if self._next_return != _NEVER:
            self._expire(self.clock() if now is None else now)
        host = self._hosts.get(endpoint)
        return host is not None and host.ejected_until is not None

    # --- results ------------------------------------------------------------------------------------

    def record(self, endpoint: Addr, status: int | None, connect_failed: bool = False,
               now: float | None = None) -> None:
        host = self._hosts.get(endpoint)
        if host is None:
            self.unknown_records += 1
            return
        if connect_failed:
            server_error = gateway = True
        elif status is None:
            return
        else:
            server_error = status >= 500
            gateway = status in _GATEWAY
        if not server_error:
            if host.consecutive_5xx or host.consecutive_gateway:
                self.failing -= 1
                host.consecutive_5xx = host.consecutive_gateway = 0
            return
        if now is None:
            now = self.clock()
        if self._next_return <= now:
            self._expire(now)
        if host.ejected_until is not None:
            return
        if not (host.consecutive_5xx or host.consecutive_gateway):
            self.failing += 1
        host.consecutive_5xx += 1
        if gateway:
            host.consecutive_gateway += 1
        else:
            host.consecutive_gateway = 0
        if host.consecutive_5xx >= self.consecutive_5xx or host.consecutive_gateway >= self.consecutive_gateway:
            host.consecutive_5xx = host.consecutive_gateway = 0
            self.failing -= 1
            self._eject(host, now)

    # --- config swaps -----------------------------------------------------------------------------

    def update_endpoints(self, endpoints: Iterable[Addr]) -> None:
        """Take a new endpoint set; survivors keep their counters and ejections.

        A snapshot swap must not un-eject a failing endpoint, so the detector is
        kept per cluster name and told about the new set instead of rebuilt.
        """
        new = tuple(endpoints)
        if len(set(new)) != len(new):
            dupes = sorted({ep for ep in new if new.count(ep) > 1})
            raise ValueError(f"outlier detection: duplicate endpoints {dupes}")
        old = self._hosts
        self._hosts = {ep: old.get(ep) or _Host() for ep in new}
        self.failing = sum(1 for h in self._hosts.values() if h.consecutive_5xx or h.consecutive_gateway)
        self.endpoints = new
        self._reschedule()

    # --- internals ----------------------------------------------------------------------------------

    def _allowed(self) -> bool:
        n = len(self.endpoints)
        pct = self.max_ejection_percent
        if n < 2 or pct == 0:
            return False
        return self.ejected_now == 0 or (self.ejected_now + 1) * 100 <= pct * n

    def _eject(self, host: _Host, now: float) -> None:
        if not self._allowed():
            self.ejections_overflow += 1
            return
        if host.returned_at is not None and host.ejection_count:
            healthy_periods = int((now - host.returned_at) // self.decay_interval)
            host.ejection_count = max(0, host.ejection_count - healthy_periods)
        host.ejection_count += 1
        host.ejected_until = now + min(self.base_ejection_time * host.ejection_count, self.max_ejection_time)
        self.ejections_total += 1
        self._reschedule()

    def _expire(self, now: float) -> None:
        if now < self._next_return:
            return
        for host in self._hosts.values():
            until = host.ejected_until
            if until is not None and until <= now:
                host.ejected_until = None
                # The return time, not the (later) time someone noticed: decay is
                # then the same however lazily the detector is consulted.
                host.returned_at = until
        self._reschedule()

    def _reschedule(self) -> None:
        """Recompute the healthy tuple, counters and the next return time (O(n), on change only)."""
        hosts = self._hosts
        healthy = tuple(ep for ep in self.endpoints if hosts[ep].ejected_until is None)
        untils = [h.ejected_until for h in hosts.values() if h.ejected_until is not None]
        self.ejected_now = len(untils)
        self._next_return = min(untils) if untils else _NEVER
        self.panic = not healthy and bool(self.endpoints)
        self._healthy = self.endpoints if self.panic else healthy

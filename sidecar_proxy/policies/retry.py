"""Retry decisions: which outcomes retry, how long to wait, whether a request
can be replayed, and a per-cluster budget that stops retry storms.

Pure: randomness, the wall clock for HTTP dates, and all request state are
passed in. The HTTP layer asks ``retriable`` on an outcome, then
``may_retry_request`` on what it already sent, then ``RetryBudget.can_retry``,
and only then sleeps ``delay(...)`` and tries again.
"""
from __future__ import annotations

import email.utils
from datetime import timezone
from typing import Callable

# Retry-on conditions. A connection outcome matches only its own condition
# (unlike Envoy, "5xx" does not also mean connect-failure/reset): the config
# names exactly what it retries.
CONNECT_FAILURE = "connect-failure"   # upstream connect refused / timed out
REFUSED_STREAM = "refused-stream"     # h2 REFUSED_STREAM, or h1 conn closed before any response byte
RESET = "reset"                       # upstream reset/closed mid-response-wait
SERVER_5XX = "5xx"                    # any 500-599 response
GATEWAY_ERROR = "gateway-error"       # 502, 503, 504 only

CONNECTION_CONDITIONS = frozenset({CONNECT_FAILURE, REFUSED_STREAM, RESET})
STATUS_CONDITIONS = frozenset({SERVER_5XX, GATEWAY_ERROR})
CONDITIONS = CONNECTION_CONDITIONS | STATUS_CONDITIONS
GATEWAY_STATUSES = frozenset({502, 503, 504})
SERVER_STATUSES = frozenset(range(500, 600))

# RFC 9110 9.2.2: replaying these has the same effect as sending them once.
# Methods are case-sensitive, so b"get" is an unknown method: not idempotent.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# A Retry-After longer than this cannot be a delta-seconds or an HTTP-date we
# honour; it is ignored rather than parsed (bounds the work per header).
MAX_RETRY_AFTER_BYTES = 64
# Exponents past this already exceed any sane cap; avoids float overflow.
_MAX_EXPONENT = 60


def parse_retry_after(value: bytes, now_http_date: Callable[[], float] | None) -> float | None:
    """Seconds from a Retry-After value, or None when it is unusable.

    delta-seconds is 1*DIGIT (so "-5" and "1.5" are garbage). An HTTP-date
    needs ``now_http_date`` (wall-clock epoch seconds); a date in the past
    gives 0.0. A naive date (zone -0000) is taken as UTC.
    """
    if len(value) > MAX_RETRY_AFTER_BYTES:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():  # bytes.isdigit is ASCII-only
        return float(int(value)) if len(value) <= 15 else float("inf")
    if now_http_date is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        seconds = when.timestamp() - now_http_date()
    except (OverflowError, ValueError, OSError):
        return None
    return seconds if seconds > 0 else 0.0


class RetryPolicy:
    """A route's retry policy, compiled once per config snapshot.

    ``attempts`` is the total number of tries including the first (1 means
    never retry); ``retries`` = attempts - 1. ``statuses`` are extra response
    codes to retry besides those ``on`` implies. ``buffer_limit`` bounds the
    request body the proxy keeps for replay.
    """

    __slots__ = ("on", "statuses", "attempts", "retries", "per_try_timeout", "base", "cap",
                 "retry_after_cap", "buffer_limit", "retry_non_idempotent",
                 "_connection_on", "retry_statuses")

    def __init__(self, on: frozenset, statuses: frozenset[int], attempts: int,
                 per_try_timeout: float, base: float = 0.025, cap: float = 0.25,
                 retry_after_cap: float = 1.0, buffer_limit: int = 64 * 1024,
                 retry_non_idempotent: bool = False) -> None:
        unknown = set(on) - CONDITIONS
        if unknown:
            raise ValueError(f"unknown retry-on condition(s): {sorted(unknown)}")
        bad = [s for s in statuses if not (isinstance(s, int) and 100 <= s <= 599)]
        if bad:
            raise ValueError(f"retry statuses must be ints 100-599, got {bad}")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts!r}")
        if not per_try_timeout >= 0:
            raise ValueError(f"per_try_timeout must be >= 0 (0: none), got {per_try_timeout!r}")
        if base < 0 or cap < 0 or retry_after_cap < 0:
            raise ValueError("base, cap and retry_after_cap must be >= 0")
        if buffer_limit < 0:
            raise ValueError(f"buffer_limit must be >= 0, got {buffer_limit!r}")
        self.on = frozenset(on)
        self.statuses = frozenset(statuses)
        self.attempts = attempts
        self.retries = attempts - 1
        self.per_try_timeout = float(per_try_timeout)
        self.base = float(base)
        self.cap = float(cap)
        self.retry_after_cap = float(retry_after_cap)
        self.buffer_limit = buffer_limit
        self.retry_non_idempotent = retry_non_idempotent
        self._connection_on = self.on & CONNECTION_CONDITIONS
        codes = set(self.statuses)
        if SERVER_5XX in self.on:
            codes |= SERVER_STATUSES
        if GATEWAY_ERROR in self.on:
            codes |= GATEWAY_STATUSES
        self.retry_statuses = frozenset(codes)  # every response code retried (what `on` implies too)

    def retriable(self, outcome: str | None, status: int | None) -> bool:
        """Does this try's result call for another? ``outcome`` is a connection
        condition, or None when a response (``status``) arrived."""
        if outcome is not None:
            return outcome in self._connection_on
        return status in self.retry_statuses

    def backoff(self, attempt: int, rand: Callable[[], float]) -> float:
        """Full jitter for retry number ``attempt`` (1 = first retry):
        rand() * min(cap, base * 2**(attempt-1)), rand() in [0, 1)."""
        if attempt < 1:
            attempt = 1
        if attempt > _MAX_EXPONENT:
            ceiling = self.cap
        else:
            ceiling = self.base * (1 << (attempt - 1))
            if ceiling > self.cap:
                ceiling = self.cap
        return rand() * ceiling

    def delay(self, attempt: int, retry_after: bytes | None, rand: Callable[[], float],
              now_http_date: Callable[[], float] | None = None) -> float:
        """Seconds to wait before retry ``attempt``: the upstream's Retry-After
        when usable (capped by retry_after_cap), else the jittered backoff."""
        if retry_after is not None:
            seconds = parse_retry_after(retry_after, now_http_date)
            if seconds is not None:
                return seconds if seconds < self.retry_after_cap else self.retry_after_cap
        return self.backoff(attempt, rand)

    def may_retry_request(self, method: bytes, body_bytes_sent: int, body_buffered_whole: bool,
                          response_started: bool, request_bytes_written: int) -> bool:
        """Can this request be sent again, given what already happened?

        - never once any response byte went downstream (the client has it);
        - a body (body_bytes_sent > 0) only if the proxy kept all of it and it
          fits buffer_limit — otherwise there is nothing to replay;
        - a non-idempotent or unknown method only if nothing reached the
          upstream (request_bytes_written == 0), unless retry_non_idempotent.
        """
        if response_started:
            return False
        if body_bytes_sent > 0 and not (body_buffered_whole and body_bytes_sent <= self.buffer_limit):
            return False
        if method in IDEMPOTENT_METHODS or self.retry_non_idempotent:
            return True
        return request_bytes_written == 0


class RetryBudget:
    """Per-cluster cap on concurrent retries: ratio of active requests, with a
    floor of ``min_retries`` so a quiet cluster can still retry.

    The caller brackets every request with request_started/finished and every
    retry with retry_started/finished; counts never go below zero.
    """

    __slots__ = ("ratio", "min_retries", "active_requests", "active_retries", "exhausted")

    def __init__(self, ratio: float = 0.2, min_retries: int = 3) -> None:
        if ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {ratio!r}")
        if min_retries < 0:
            raise ValueError(f"min_retries must be >= 0, got {min_retries!r}")
        self.ratio = float(ratio)
        self.min_retries = min_retries
        self.active_requests = 0
        self.active_retries = 0
        self.exhausted = 0

    def request_started(self) -> None:
        self.active_requests += 1

    def request_finished(self) -> None:
        if self.active_requests > 0:
            self.active_requests -= 1

    def retry_started(self) -> None:
        self.active_retries += 1

    def retry_finished(self) -> None:
        if self.active_retries > 0:
            self.active_retries -= 1

    def limit(self) -> float:
        floor = self.min_retries
        scaled = self.ratio * self.active_requests
        return scaled if scaled > floor else floor

    def can_retry(self) -> bool:
        if self.active_retries < self.limit():
            return True
        self.exhausted += 1
        return False

    def allows(self, active_requests: int, active_retries: int) -> bool:
        """``can_retry`` on counts the caller keeps (the cluster's circuit
        breaker gauges already count active requests and retries)."""
        scaled = self.ratio * active_requests
        if active_retries < (scaled if scaled > self.min_retries else self.min_retries):
            return True
        self.exhausted += 1
        return False

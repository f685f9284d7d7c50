"""Local rate limiting: token buckets, a bounded keyed table, and the headers.

Pure: every call takes the time (or an injected clock) and returns a value;
nothing here sleeps, schedules or touches a socket. The HTTP layer calls
``LocalRateLimit.check`` (or ``allow`` when it needs no headers) once per
request, so the per-call work is a dict lookup and a few float operations.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

# A refill computed as (now - last) * rate can land a hair under a whole token
# (e.g. rate 3 after 1/3 s). Granting at 1 - EPSILON keeps "a token is due
# exactly now" from being denied by rounding; the debt it can leave is < 1e-9.
EPSILON = 1e-9


class TokenBucket:
    """Continuous refill at ``rate`` tokens/s up to ``burst``; starts full.

    Invariants: 0 - EPSILON <= tokens <= burst, and ``last`` never moves
    backwards, so a clock that steps back adds nothing and the interval it
    skipped is not counted twice when it comes forward again.
    """

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self.tokens = float(burst)
        self.last = now

    def reset(self, now: float) -> None:
        """Full again, as if new (used to recycle an evicted bucket)."""
        self.tokens = float(self.burst)
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            tokens = self.tokens + (now - self.last) * self.rate
            self.tokens = tokens if tokens < self.burst else float(self.burst)
            self.last = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else seconds until one is available."""
        tokens = self.tokens
        if now > self.last:  # _refill, inlined: this runs once per request
            tokens += (now - self.last) * self.rate
            if tokens > self.burst:
                tokens = float(self.burst)
            self.last = now
        if tokens >= 1.0 - EPSILON:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def remaining(self, now: float) -> int:
        """Whole tokens available now (RateLimit-Remaining)."""
        self._refill(now)
        return int(self.tokens) if self.tokens > 0 else 0

    def reset_after(self, now: float) -> float:
        """Seconds until the bucket is full again (RateLimit-Reset)."""
        self._refill(now)
        return (self.burst - self.tokens) / self.rate


@dataclass(slots=True)
class Decision:
    """One rate-limit answer. ``retry_after`` is 0.0 when allowed."""

    allowed: bool
    retry_after: float
    remaining: int
    reset: float


class KeyedLimiter:
    """A bounded table of buckets keyed by bytes (a header value, a peer id).

    At most ``max_keys`` keyed buckets exist; inserting one more evicts the
    least recently used key. An evicted key that comes back gets a fresh full
    bucket: bounded memory beats exactness, and ``evicted`` counts how often
    that trade was made (a steadily rising count means max_keys is too small
    for the key cardinality). A key of None (the header was absent) shares one
    "missing key" bucket that is never evicted and not counted in max_keys.
    """

    __slots__ = ("rate", "burst", "max_keys", "clock", "buckets", "missing", "evicted")

    def __init__(self, rate: float, burst: int, max_keys: int, clock: Callable[[], float]) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        now = clock()
        self.missing = TokenBucket(rate, burst, now)  # validates rate and burst
        self.rate = float(rate)
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self.buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.buckets)

    def bucket(self, key: bytes | None, now: float) -> TokenBucket:
        """The bucket for ``key``, marking it most recently used (creating it if new)."""
        if key is None:
            return self.missing
        buckets = self.buckets
        b = buckets.get(key)
        if b is not None:
            buckets.move_to_end(key)
            return b
        if len(buckets) >= self.max_keys:
            # Recycle the evicted bucket object: no allocation once the table is full.
            _, b = buckets.popitem(last=False)
            self.evicted += 1
            b.reset(now)
        else:
            b = TokenBucket(self.rate, self.burst, now)
        buckets[key] = b
        return b

    def take(self, key: bytes | None) -> float:
        """0.0 when allowed, else seconds until allowed. Allocates no Decision."""
        now = self.clock()
        return self.bucket(key, now).take(now)

    def check(self, key: bytes | None) -> Decision:
        now = self.clock()
        b = self.bucket(key, now)
        wait = b.take(now)
        # take() just refilled to `now`: read the state instead of refilling twice more.
        tokens = b.tokens
        return Decision(wait == 0.0, wait, int(tokens) if tokens > 0 else 0,
                        (b.burst - tokens) / b.rate)


class LocalRateLimit:
    """One route's (or listener's) local limit: ``rate``/s with ``burst``.

    ``key`` names what the caller extracts per request (a header name, or a
    source such as the peer identity); None means one bucket for all requests
    and the key value passed to ``check`` is ignored.

    In shadow mode every request is allowed; the ones the bucket would have
    refused are counted in ``would_limit`` so a limit can be tried on live
    traffic before it is enforced. The counters are disjoint:
    checks = allowed + limited + would_limit.
    """

    __slots__ = ("rate", "burst", "shadow", "key", "limiter",
                 "allowed", "limited", "would_limit")

    def __init__(self, rate: float, burst: int, shadow: bool, key: str | None,
                 max_keys: int, clock: Callable[[], float]) -> None:
        self.rate = float(rate)
        self.burst = burst
        self.shadow = shadow
        self.key = key
        self.limiter = KeyedLimiter(rate, burst, max_keys, clock)
        self.allowed = 0
        self.limited = 0
        self.would_limit = 0

    @property
    def evicted(self) -> int:
        return self.limiter.evicted

    def allow(self, key_value: bytes | None) -> float:
        """Hot-path form: 0.0 to admit, else the Retry-After seconds. No allocation."""
        limiter = self.limiter
        if self.key is None or key_value is None:
            wait = limiter.missing.take(limiter.clock())
        else:
            wait = limiter.take(key_value)
        if wait == 0.0:
            self.allowed += 1
            return 0.0
        if self.shadow:
            self.would_limit += 1
            return 0.0
        self.limited += 1
        return wait

    def refusal(self, key_value: bytes | None, wait: float) -> Decision:
        """The Decision of a request ``allow`` just refused (``wait`` its answer), for the 429's
        headers; takes nothing. ``allow`` + ``refusal`` is ``check`` without an allocation per
        admitted request."""
        limiter = self.limiter
        b = limiter.bucket(None if self.key is None else key_value, limiter.clock())
        tokens = b.tokens
        return Decision(False, wait, int(tokens) if tokens > 0 else 0, (b.burst - tokens) / b.rate)

    def check(self, key_value: bytes | None) -> Decision:
        """The decision with what the RateLimit headers need."""
        if self.key is None:
            key_value = None
        d = self.limiter.check(key_value)
        if d.allowed:
            self.allowed += 1
        elif self.shadow:
            self.would_limit += 1
            d.allowed = True
            d.retry_after = 0.0
        else:
            self.limited += 1
        return d


def _ceil_int(seconds: float) -> int:
    return math.ceil(seconds) if seconds > 0 else 0


def rate_limit_headers(decision: Decision, limit: int, window: float) -> list[tuple[bytes, bytes]]:
    """Response headers for ``decision`` (draft-ietf-httpapi-ratelimit-headers).

    All values are integers: remaining is floored, reset and Retry-After are
    rounded up (a client that waits the advertised time is then admitted),
    Retry-After is at least 1 and only sent on a denial. ``ratelimit-policy``
    states the quota as ``limit;w=window`` with the window in whole seconds.
    """
    headers = [
        (b"ratelimit-limit", b"%d" % limit),
        (b"ratelimit-remaining", b"%d" % max(0, decision.remaining)),
        (b"ratelimit-reset", b"%d" % _ceil_int(decision.reset)),
        (b"ratelimit-policy", b"%d;w=%d" % (limit, max(1, _ceil_int(window)))),
    ]
    if not decision.allowed:
        headers.insert(0, (b"retry-after", b"%d" % max(1, _ceil_int(decision.retry_after))))
    return headers


class RateLimiters:
    """The limiters of every route, kept across config snapshots.

    A reload that leaves a route's name and limit unchanged keeps its
    buckets (a reload must not hand every client a fresh burst); a changed
    limit starts afresh. Limiters of routes gone from the live config are
    dropped at the next commit.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._limiters: dict[tuple, LocalRateLimit] = {}

    def get(self, listener: str, route: str, limit) -> LocalRateLimit:
        """``limit``: a config ``RateLimit`` (frozen, so part of the key)."""
        key = (listener, route, limit)
        found = self._limiters.get(key)
        if found is None:
            found = self._limiters[key] = LocalRateLimit(limit.requests_per_second, limit.burst, limit.shadow,
                                                         limit.key, limit.max_keys, self.clock)
        return found

    def keep_only(self, keys: set[tuple]) -> None:
        for key in [k for k in self._limiters if k not in keys]:
            del self._limiters[key]

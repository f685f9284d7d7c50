"""Trying a request again: the per-request retry state and the exchange's retry steps.

A request whose route has a ``retry`` policy gets a :class:`RetryState`
(the others pay nothing for it). The exchange reports each failed try to
:meth:`Retries._retry` (a connection outcome) or :meth:`Retries._retry_check`
(a response the policy names, which it then reads to its end before
:meth:`Retries._retry_start`). A retry happens only when, in this order:
the policy retries that outcome; no byte of an answer went downstream; tries
are left; the body is replayable and the method allows it
(``RetryPolicy.may_retry_request``); the backoff ends before the route
timeout; the cluster's retry budget and ``max_retries`` breaker have room.
Each "no" is counted by reason in the cluster's state.
"""
from __future__ import annotations

import asyncio
import random
import time

from ...policies.retry import RetryPolicy
from ..events import Sink


class RetryState:
    """What one request's tries share.

    No ``__slots__`` on purpose: the defaults are class attributes, so a
    request whose first try succeeds (nearly all) sets one field, not
    fourteen; a field gets an instance value only when it changes.
    """

    tried: tuple = ()              # endpoints of the earlier tries (so this is try len(tried) + 1)
    replay: list[bytes] | None = None   # the body so far while it may be replayed
    body_len = 0
    wrote = False                  # a byte of the request reached an upstream on an earlier try
    interim = False                # a 1xx went downstream: a byte of an answer
    total_deadline = 0.0           # the route timeout, from the first try's request end, over every try
    timer: asyncio.TimerHandle | None = None   # the backoff before the next try
    slot = False                   # the current try holds a "retries" breaker slot
    discarding = False             # reading a retried response to its end
    discarded = 0
    delay = 0.0
    limited = False                # the attempts ran out: the final answer carries URX

    def __init__(self, policy: RetryPolicy, has_body: bool, pending: list[bytes] | None) -> None:
        self.policy = policy
        if has_body:
            self.replay = list(pending) if pending else []
            if pending:
                self.body_len = sum(map(len, pending))
                if self.body_len > policy.buffer_limit:
                    self.replay = None

    def keep(self, data: bytes) -> None:
        """Keep the body for a retry while it fits the policy's buffer_limit; past it, stop keeping."""
        self.body_len += len(data)
        replay = self.replay
        if replay is not None:
            if self.body_len <= self.policy.buffer_limit:
                replay.append(data)
            else:
                self.replay = None


class Retries(Sink):
    """The exchange's retry steps (a mixin of ``Exchange``; see the module docstring). A ``Sink`` only
    because it is the base of ``Exchange``, which is one: an extension type has a single base."""

    __slots__ = ()

    def _record(self, status: int | None, connect_failed: bool = False) -> None:
        """This try's verdict for outlier detection (connect failures and 502/504 are gateway failures)."""
        up = self.up
        if up is not None and up.state.detector is not None:
            up.state.detector.record(self.upstream_addr, status, connect_failed)

    def _retry(self, reason: str, conditions: tuple[str, ...], status: int | None = None) -> bool:
        """After a failed try (its connection already released): True when another try was started."""
        rs = self.rs
        if rs is None:
            return False
        policy = rs.policy
        if not any(policy.retriable(c, None) for c in conditions) and (
                status is None or not policy.retriable(None, status)):
            return False
        if not self._retry_check(reason, None):
            return False
        self._retry_start()
        return True

    def _retry_check(self, reason: str, retry_after: bytes | None) -> bool:
        """May a retriable outcome be tried again? Takes the retry's slot and counts the decision."""
        rs = self.rs
        if self.finished or self.resp_started or rs.interim:
            return False  # the client has a byte of an answer: never twice
        policy = rs.policy
        state = self.up.state
        breakers = state.breakers
        if rs.slot:  # the failed try was itself a retry
            rs.slot = False
            breakers.release("retries")
        skip = None
        delay = 0.0
        tries = len(rs.tried) + 1
        if tries >= policy.attempts:
            skip = "attempts"
            rs.limited = True
        elif not policy.may_retry_request(self.req.method, rs.body_len, rs.replay is not None, False,
                                          1 if rs.wrote or self.head_sent else 0):
            skip = "body_not_buffered" if rs.body_len and rs.replay is None else "non_idempotent"
        else:
            delay = policy.delay(tries, retry_after, random.random, time.time)
            if rs.total_deadline and self.session.loop.time() + delay >= rs.total_deadline:
                skip = "deadline"
            elif not state.budget.allows(breakers.active["requests"], breakers.active["retries"]):
                skip = "budget"
            elif not breakers.try_acquire("retries"):
                skip = "circuit_breaker"
        if skip is not None:
            state.skipped[skip] += 1
            return False
        state.retries[reason] += 1
        rs.slot = True
        rs.delay = delay
        return True

    def _retry_start(self) -> None:
        """The failed try is over (connection released): wait the backoff, then try again."""
        rs = self.rs
        rs.tried += (self.upstream_addr,)
        if self.head_sent:
            rs.wrote = True
        rs.discarding = False
        rs.discarded = 0
        self._reset_try(list(rs.replay) if rs.replay else None)
        rs.timer = self.session.loop.call_later(rs.delay, self._next_try)

    def _next_try(self) -> None:
        rs = self.rs
        rs.timer = None
        if self.finished:
            return
        up = self.up
        self._resume_try(self.session.relay.orig_dst if up.cluster.original_destination else up.pick(rs.tried))

    def _retry_settle(self, breakers) -> None:
        """The exchange is over while a retry holds a breaker slot or waits its backoff: both go."""
        rs = self.rs
        if rs.slot:
            rs.slot = False
            breakers.release("retries")
        if rs.timer is not None:
            rs.timer.cancel()
            rs.timer = None

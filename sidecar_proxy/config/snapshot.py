"""Versioned, immutable config snapshots and the one place that swaps them.

The event loop is single-threaded, so replacing ``SnapshotStore.current`` is
atomic: a connection reads it once when accepted and keeps that object for
its whole life. Applying an update is validate -> prepare (e.g. bind new
sockets) -> swap -> commit (e.g. close old sockets); a failure before the
swap leaves the live snapshot untouched.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

from .model import Config

log = logging.getLogger("sidecar_proxy.config")


def _canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    # Monotonic per process: 1 for the first config loaded.
    version: int
    # Where it came from: "file", "admin", "sighup", "default".
    source: str
    # sha256 of the canonical document: equal configs have equal digests.
    digest: str
    loaded_at: float = field(default_factory=time.time)
    # Control-server resource versions by type ("listeners", ...), when it came from there.
    versions: Mapping[str, str] = field(default_factory=dict)


class Preparer(Protocol):
    """A participant in an update (listener manager, ...).

    ``prepare`` acquires what the new snapshot needs and returns a commit
    callable, or raises ``UpdateRejected`` with errors naming config paths.
    ``abort`` undoes a prepare when a later participant failed.
    """

    async def prepare(self, old: Snapshot | None, new: Snapshot) -> Callable[[], Awaitable[None]]: ...

    async def abort(self, new: Snapshot) -> None: ...


class UpdateRejected(Exception):
    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))


class SnapshotStore:
    def __init__(self) -> None:
        self.current: Snapshot | None = None
        self._next_version = 1
        self._participants: list[Preparer] = []
        self._watchers: list[Callable[[Snapshot], None]] = []

    def add_participant(self, participant: Preparer) -> None:
        self._participants.append(participant)

    def watch(self, callback: Callable[[Snapshot], None]) -> None:
        """Called after every successful swap (metrics, logging)."""
        self._watchers.append(callback)

    def make(self, config: Config, source: str, versions: Mapping[str, str] | None = None) -> Snapshot:
        digest = hashlib.sha256(_canonical_json(config.source_document)).hexdigest()
        return Snapshot(config=config, version=self._next_version, source=source, digest=digest,
                        versions=dict(versions or {}))

    async def apply(self, config: Config, source: str, versions: Mapping[str, str] | None = None) -> Snapshot:
        """Make ``config`` live, all or nothing. Raises UpdateRejected.

        Callers must serialise calls (the App holds a lock), so versions are
        handed out in swap order.
        """
        new = self.make(config, source, versions)
        old = self.current
        commits: list[Callable[[], Awaitable[None]]] = []
        prepared: list[Preparer] = []
        try:
            for participant in self._participants:
                commits.append(await participant.prepare(old, new))
                prepared.append(participant)
        except Exception as exc:
            for participant in reversed(prepared):
                await participant.abort(new)
            if isinstance(exc, UpdateRejected):
                raise
            log.exception("config update failed unexpectedly; the live config is unchanged")
            raise UpdateRejected([("", f"internal error while applying: {type(exc).__name__}: {exc}")]) from exc
        self._next_version += 1
        self.current = new
        for commit in commits:
            await commit()
        for watcher in self._watchers:
            watcher(new)
        return new

import asyncio

import pytest

from sidecar_proxy.config import load
from sidecar_proxy.config.snapshot import SnapshotStore, UpdateRejected

from .test_load import BASE, mutated


class Recorder:
    """A participant that records calls and can be told to reject."""

    def __init__(self, name: str, log: list, reject: bool = False) -> None:
        self.name, self.log, self.reject = name, log, reject

    async def prepare(self, old, new):
        self.log.append((self.name, "prepare", old.version if old else None, new.version))
        if self.reject:
            raise UpdateRejected([(f"listeners.{self.name}", "cannot bind")])

        async def commit():
            self.log.append((self.name, "commit", new.version))
        return commit

    async def abort(self, new):
        self.log.append((self.name, "abort", new.version))


def run(coro):
    return asyncio.run(coro)


def test_versions_increase_and_swap_is_atomic():
    store = SnapshotStore()
    log: list = []
    store.add_participant(Recorder("a", log))
    seen = []
    store.watch(lambda snap: seen.append((snap.version, store.current is snap)))
    first = run(store.apply(load.build(BASE), "file"))
    second = run(store.apply(load.build(mutated(node__id="n2")), "admin"))
    assert (first.version, second.version) == (1, 2)
    assert store.current is second and second.source == "admin"
    assert seen == [(1, True), (2, True)]
    assert first.digest != second.digest
    assert log == [("a", "prepare", None, 1), ("a", "commit", 1), ("a", "prepare", 1, 2), ("a", "commit", 2)]


def test_equal_documents_have_equal_digests():
    store = SnapshotStore()
    assert store.make(load.build(BASE), "x").digest == store.make(load.build(mutated()), "y").digest


def test_rejected_update_aborts_prepared_participants_and_keeps_the_old_snapshot():
    store = SnapshotStore()
    log: list = []
    good, bad = Recorder("good", log), Recorder("bad", log)
    store.add_participant(good)
    store.add_participant(bad)
    first = run(store.apply(load.build(BASE), "file")) if not bad.reject else None
    bad.reject = True
    log.clear()
    with pytest.raises(UpdateRejected) as info:
        run(store.apply(load.build(mutated(node__id="n2")), "admin"))
    assert info.value.errors == [("listeners.bad", "cannot bind")]
    assert store.current is first
    assert ("good", "abort", 2) in log and not any(entry[1] == "commit" for entry in log)
    # The rejected attempt does not use up a version number.
    bad.reject = False
    assert run(store.apply(load.build(mutated(node__id="n3")), "admin")).version == 2


def test_unexpected_error_in_a_participant_is_a_rejection_not_a_crash():
    store = SnapshotStore()
    log: list = []

    class Broken(Recorder):
        async def prepare(self, old, new):
            raise RuntimeError("boom")

    store.add_participant(Recorder("good", log))
    store.add_participant(Broken("broken", log))
    with pytest.raises(UpdateRejected) as info:
        run(store.apply(load.build(BASE), "file"))
    assert "internal error while applying: RuntimeError: boom" in info.value.errors[0][1]
    assert ("good", "abort", 1) in log and store.current is None

import json

import pytest

from sidecar_proxy.control import cache
from sidecar_proxy.control.protocol import TYPES

VERSIONS = {t: f"v-{t}" for t in TYPES}
RESOURCES = {t: [{"name": t}] for t in TYPES}


def test_save_then_load(tmp_path):
    path = str(tmp_path / "sub" / "cache.json")
    cache.save(path, VERSIONS, RESOURCES)
    versions, resources, saved_at = cache.load(path)
    assert (versions, resources) == (VERSIONS, RESOURCES) and saved_at > 0
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["cache.json"]  # no temporary left


def test_missing_cache_is_none(tmp_path):
    assert cache.load(str(tmp_path / "none.json")) is None


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "Expecting"),
    (json.dumps({"format": 99}), "not a cache of format"),
    (json.dumps({"format": 1, "versions": {}, "resources": {}}), "must cover"),
])
def test_unusable_cache_says_why(tmp_path, content, fragment):
    path = tmp_path / "cache.json"
    path.write_text(content)
    with pytest.raises(cache.CacheError, match=fragment):
        cache.load(str(path))


def test_a_failed_write_leaves_the_previous_cache(tmp_path, monkeypatch):
    path = str(tmp_path / "cache.json")
    cache.save(path, VERSIONS, RESOURCES)

    def boom(*_args, **_kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache.os, "fsync", boom)
    with pytest.raises(OSError):
        cache.save(path, {t: "new" for t in TYPES}, RESOURCES)
    assert cache.load(path)[0] == VERSIONS
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]

"""The last good config from the control server, on disk.

Written after every update the proxy applied from the server, read at start
when the server cannot be reached. The write is atomic (a temporary file in
the same directory, fsync, rename), so a crash mid-write leaves the previous
cache, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from .protocol import TYPES

FORMAT = 1
MAX_BYTES = 64 << 20


class CacheError(Exception):
    """An unreadable cache file; the message says what is wrong with it."""


def save(path: str, versions: dict[str, str], resources: dict[str, list[dict]]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "saved_at": time.time(), "versions": versions, "resources": resources}
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str) -> tuple[dict[str, str], dict[str, list[dict]], float] | None:
    """(versions, resources, saved_at), or None if there is no cache. Raises CacheError."""
    target = Path(path)
    try:
        if target.stat().st_size > MAX_BYTES:
            raise CacheError(f"{path} is larger than {MAX_BYTES} bytes")
        doc = json.loads(target.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheError(f"{path}: not a cache of format {FORMAT}")
    versions, resources = doc.get("versions"), doc.get("resources")
    if (not isinstance(versions, dict) or not isinstance(resources, dict)
            or set(versions) != set(TYPES) or set(resources) != set(TYPES)
            or not all(isinstance(resources[t], list) for t in TYPES)):
        raise CacheError(f"{path}: versions and resources must cover {', '.join(TYPES)}")
    return {t: str(versions[t]) for t in TYPES}, {t: resources[t] for t in TYPES}, float(doc.get("saved_at", 0))

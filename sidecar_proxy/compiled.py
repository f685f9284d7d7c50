"""The data path compiled with Cython, and the guard that keeps a stale build out.

``pip install .`` compiles the modules in :data:`MODULES` with Cython
(``setup.py``) into extension modules beside their sources. They are the same
code as the ``.py`` files, compiled as they are, and spend about 40 % less
Python time per proxied request (``benchmarks/README.md``). Nothing else changes:
without a compiler or Cython the install falls back to the sources.

Python imports an extension module ahead of a source of the same name, even
after that source was edited. So ``setup.py`` records the SHA-256 of each
source it compiled in ``_compiled.json``, and :func:`install` (run by the
package's ``__init__``, before any of these modules is imported) has the
source imported instead of any compiled module whose source changed since the
build, and instead of every one when ``SIDECAR_PROXY_PURE_PYTHON=1`` (to rule
the compiled code out when chasing a problem). :func:`status` says which is
running; ``GET /server_info`` and the startup log show it.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys

# The modules every proxied request runs through (setup.py compiles these).
MODULES = (
    "sidecar_proxy.protocols.events",
    "sidecar_proxy.protocols.http1.session",
    "sidecar_proxy.protocols.http1.exchange",
    "sidecar_proxy.protocols.http1.retries",
    "sidecar_proxy.protocols.http1.httptools_codec",
    "sidecar_proxy.protocols.http1.strict",
    "sidecar_proxy.protocols.http1.serialize",
    "sidecar_proxy.routing.table",
    "sidecar_proxy.upstream.pool",
    "sidecar_proxy.upstream.cluster",
    "sidecar_proxy.transport.relay",
    "sidecar_proxy.telemetry.histogram",
    "sidecar_proxy.telemetry.http_metrics",
)
# Classes compiled as extension types: their ``__slots__`` become C fields,
# which the compiled methods read and write without a lookup (setup.py writes
# the ``.pxd`` that says so, from the source: see :func:`pxd_text`). Such a
# class has a literal ``__slots__`` and no base but another one listed here.
EXTENSION_TYPES = {
    "sidecar_proxy.protocols.events": ("Request", "Response"),
    "sidecar_proxy.protocols.http1.retries": ("Retries",),
    "sidecar_proxy.protocols.http1.exchange": ("Exchange",),
    "sidecar_proxy.protocols.http1.session": ("Session",),
    "sidecar_proxy.protocols.http1.httptools_codec": ("_Collector", "HttptoolsParser"),
    "sidecar_proxy.upstream.pool": ("UpstreamConn", "Pool"),
    "sidecar_proxy.transport.relay": ("_Side", "_Downstream", "_Upstream", "Relay"),
    "sidecar_proxy.telemetry.histogram": ("HistogramChild",),
    "sidecar_proxy.telemetry.http_metrics": ("RequestRecorder",),
}
MANIFEST = "_compiled.json"
PURE_ENV = "SIDECAR_PROXY_PURE_PYTHON"

COMPILED = "compiled"
NOT_BUILT = "source: not compiled"
FORCED = f"source: {PURE_ENV} is set"
STALE = "source: changed since it was compiled"

_status: dict[str, str] = {}


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pxd_text(module: str, source: str) -> str:
    """The ``.pxd`` that makes ``module``'s EXTENSION_TYPES classes extension types.

    Every slot is a ``public object`` field: any value, reachable from
    Python as before. Raises ValueError when a class cannot be one.
    """
    import ast

    owners = {cls: mod for mod, classes in EXTENSION_TYPES.items() for cls in classes}
    found = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    lines: list[str] = []
    for name in EXTENSION_TYPES[module]:
        node = found.get(name)
        if node is None:
            raise ValueError(f"{module}: no class {name}")
        slots = None
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["__slots__"]:
                try:
                    slots = ast.literal_eval(stmt.value)
                except ValueError:
                    slots = None  # computed: refused below
        if not isinstance(slots, tuple):
            raise ValueError(f"{module}.{name}: __slots__ must be a literal tuple")
        bases = [ast.unparse(base) for base in node.bases]
        if len(bases) > 1 or (bases and bases[0] not in owners):
            raise ValueError(f"{module}.{name}: an extension type's base must be another one, not {bases}")
        if bases and owners[bases[0]] != module:
            lines.insert(0, f"from {owners[bases[0]]} cimport {bases[0]}")
        lines.append(f"cdef class {name}{f'({bases[0]})' if bases else ''}:")
        lines.extend(f"    cdef public object {slot}" for slot in slots)
        if not slots:
            lines.append("    pass")
    return "\n".join(lines) + "\n"


class _SourceFirst:
    """A meta-path finder that imports the listed modules from their ``.py`` files."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.sources = sources

    def find_spec(self, name, path=None, target=None):
        source = self.sources.get(name)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(name, source)


def install(package_dir: str | None = None, modules: tuple[str, ...] = MODULES) -> dict[str, str]:
    """Decide, for each module, between its compiled form and its source; -> the decisions.

    Must run before any of ``modules`` is imported (a module already in
    ``sys.modules`` stays what it is). ``package_dir`` is the directory of
    the modules' top package (default: this package's).
    """
    package_dir = package_dir or os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(package_dir, MANIFEST)) as f:
            built = json.load(f)
    except (OSError, ValueError):
        built = {}
    pure = os.environ.get(PURE_ENV, "") not in ("", "0")
    sources: dict[str, str] = {}
    decided: dict[str, str] = {}
    for name in modules:
        base = os.path.join(package_dir, *name.split(".")[1:])
        source = base + ".py"
        if not any(os.path.exists(base + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            decided[name] = NOT_BUILT
            continue
        if pure:
            decided[name] = FORCED
        elif not os.path.exists(source) or built.get(name) == source_digest(source):
            decided[name] = COMPILED
            continue
        else:
            decided[name] = STALE
        sources[name] = source
    if sources:
        sys.meta_path.insert(0, _SourceFirst(sources))
    _status.clear()
    _status.update(decided)
    return decided


def status() -> dict:
    """``{"data_path": "compiled" | "source" | "mixed", "modules": {name: decision}}``."""
    kinds = {decision == COMPILED for decision in _status.values()}
    data_path = "mixed" if len(kinds) > 1 else "compiled" if kinds == {True} else "source"
    return {"data_path": data_path, "modules": dict(_status)}

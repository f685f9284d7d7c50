"""The data path compiled with Cython, and the guard that keeps a stale build out.

``pip install .`` compiles the modules in :data:`MODULES` with Cython
(``setup.py``) into extension modules beside their sources. They are the same
code as the ``.py`` files, compiled as they are, plus a generated ``.pxd`` per
module (:func:`pxd_text`): the classes in :data:`EXTENSION_TYPES` become
extension types, a slot annotated with one of them (``session: Session``) is a
typed C field, and their methods are ``cpdef``, so one compiled object reaches
another's fields and methods in C. That spends about half the Python time per
proxied request (``benchmarks/README.md``). The one difference from the source
is that a typed field or argument refuses a value of another type (TypeError).
Without a compiler or Cython the install falls back to the sources.

Python imports an extension module ahead of a source of the same name, even
after that source was edited. So ``setup.py`` records the SHA-256 of each
source it compiled in ``_compiled.json``, and :func:`install` (run by the
package's ``__init__``, before any of these modules is imported) has every
module's source imported as soon as one compiled module's source changed
since the build or one module is not built (they import each other's types,
so they run compiled together or not at all), and also when
``SIDECAR_PROXY_PURE_PYTHON=1`` (to rule the compiled code out when chasing a
problem). :func:`status` says which is
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
    "sidecar_proxy.protocols.http1.runtime",
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
# Compiled, a module imports the modules of the types its ``.pxd`` names
# before its own code runs: a module-level ``from x import name`` between two
# such modules can find ``name`` not yet defined (tests/test_compiled.py
# imports each module first).
EXTENSION_TYPES = {
    "sidecar_proxy.protocols.events": ("Request", "Response", "Sink", "Parser"),
    "sidecar_proxy.protocols.http1.retries": ("Retries",),
    "sidecar_proxy.protocols.http1.exchange": ("RequestIds", "Exchange"),
    "sidecar_proxy.protocols.http1.runtime": ("RouteEdits", "HttpRuntime"),
    "sidecar_proxy.routing.table": ("CompiledRoute", "RouteTable"),
    "sidecar_proxy.upstream.cluster": ("ClusterState", "Upstream"),
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
# The compiled modules import each other's extension types: a compiled module
# cannot load beside the source of a module whose types it uses, so one module
# that is not current sends every module to its source.
WITH_OTHERS = "source: another module is not current"

_status: dict[str, str] = {}


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _ext_type(annotation, owners: dict[str, str]) -> str | None:
    """The extension type an annotation names (``T``, ``T | None``,
    ``"T"``), or None when it names anything else."""
    import ast

    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        sides = [side for side in (annotation.left, annotation.right)
                 if not (isinstance(side, ast.Constant) and side.value is None)]
        annotation = sides[0] if len(sides) == 1 else None
    if isinstance(annotation, ast.Name) and annotation.id in owners:
        return annotation.id
    return None


# What a method may not contain to be a cpdef method: Cython compiles no
# closure, generator or coroutine into one.
_NOT_CPDEF = ("Lambda", "FunctionDef", "AsyncFunctionDef", "ClassDef", "GeneratorExp", "Yield", "YieldFrom",
              "Await")


def _signature(node, owners: dict[str, str]):
    """Method ``node``'s cpdef signature: ((type or None, name, has default), ...)
    and its typed locals {name: type}; None when it cannot be cpdef (a
    special method, decorated, ``*args``/keyword-only arguments, a closure
    or generator inside, ``super()``)."""
    import ast

    args = node.args
    if (node.name.startswith("__") or node.decorator_list or args.vararg or args.kwarg or args.kwonlyargs
            or args.posonlyargs or not args.args or args.args[0].arg != "self"):
        return None
    local_types = {}
    for sub in ast.walk(node):
        if sub is not node and type(sub).__name__ in _NOT_CPDEF:
            return None
        if isinstance(sub, ast.Name) and sub.id in ("super", "locals", "vars"):
            return None
        if isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
            typ = _ext_type(sub.annotation, owners)
            if typ:
                local_types[sub.target.id] = typ
    first_default = len(args.args) - len(args.defaults)
    params = tuple((_ext_type(arg.annotation, owners) if i else None, arg.arg, i >= first_default)
                   for i, arg in enumerate(args.args))
    return params, local_types


class _Classes:
    """The extension types' class statements, parsed from their modules' sources."""

    def __init__(self, read) -> None:
        self.read = read
        self.owners = {cls: mod for mod, classes in EXTENSION_TYPES.items() for cls in classes}
        self.trees: dict[str, dict] = {}

    def node(self, name: str):
        module = self.owners[name]
        if module not in self.trees:
            import ast

            self.trees[module] = {node.name: node for node in ast.parse(self.read(module)).body
                                  if isinstance(node, ast.ClassDef)}
        return self.trees[module].get(name)

    def cpdef_methods(self, name: str) -> dict:
        """{method: signature} of class ``name`` and its bases, as declared in their pxd."""
        import ast

        bases = [ast.unparse(base) for base in self.node(name).bases]
        methods = self.cpdef_methods(bases[0]) if bases and bases[0] in self.owners else {}
        return {**methods, **{method: params for method, params, _ in self.declarations(name, methods)}}

    def declarations(self, name: str, inherited: dict):
        """(method, signature, locals) of each method of class ``name`` that is cpdef."""
        import ast

        for stmt in self.node(name).body:
            if isinstance(stmt, ast.FunctionDef):
                declared = self.declaration(name, stmt, inherited.get(stmt.name))
                if declared is not None:
                    yield stmt.name, *declared

    def declaration(self, cls: str, node, inherited):
        """(signature, locals) for method ``node`` of ``cls``; an override of
        a base's cpdef method keeps that method's argument types, which Cython
        requires. Raises ValueError for an override that cannot be one."""
        found = _signature(node, self.owners)
        if inherited is None:
            return found
        if found is None or len(found[0]) != len(inherited) or \
                [d for _, _, d in found[0]] != [d for _, _, d in inherited]:
            raise ValueError(f"{self.owners[cls]}.{cls}.{node.name}: overrides a cpdef method of a base with"
                             " another signature")
        params = tuple((typ, name, default) for (typ, _, default), (_, name, _) in zip(inherited, found[0]))
        return params, found[1]


def _param(typ: str | None, name: str, default: bool) -> str:
    return f"{typ + ' ' if typ else ''}{name}{'=*' if default else ''}"


def _read_module(module: str) -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), *module.split(".")[1:]) + ".py") as f:
        return f.read()


def pxd_text(module: str, source: str, read=_read_module) -> str:
    """The ``.pxd`` that makes ``module``'s EXTENSION_TYPES classes extension types.

    Every slot is a ``public`` field, reachable from Python as before: an
    ``object`` one (any value), or typed with an extension type when the
    class annotates that slot with one (``session: Session``), so that
    compiled code reaches through it without a lookup. Every method Cython
    can compile so becomes ``cpdef``: compiled callers that know the
    receiver's type call it in C, Python callers as before (and a Python
    subclass's override still wins). Arguments and locals the method
    annotates with an extension type are typed. ``read(module)`` gives the
    source of another module (a base class's). Raises ValueError when a
    class cannot be an extension type.
    """
    import ast

    classes = _Classes(lambda name: source if name == module else read(name))
    owners = classes.owners
    used: set[str] = set()
    lines: list[str] = []
    for name in EXTENSION_TYPES[module]:
        node = classes.node(name)
        if node is None:
            raise ValueError(f"{module}: no class {name}")
        slots = None
        slot_types: dict[str, str] = {}
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["__slots__"]:
                try:
                    slots = ast.literal_eval(stmt.value)
                except ValueError:
                    slots = None  # computed: refused below
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is None:
                typ = _ext_type(stmt.annotation, owners)
                if typ:
                    slot_types[stmt.target.id] = typ
        if not isinstance(slots, tuple):
            raise ValueError(f"{module}.{name}: __slots__ must be a literal tuple")
        for slot in slot_types:
            if slot not in slots:
                raise ValueError(f"{module}.{name}: {slot!r} is annotated but not a slot")
        bases = [ast.unparse(base) for base in node.bases]
        if len(bases) > 1 or (bases and bases[0] not in owners):
            raise ValueError(f"{module}.{name}: an extension type's base must be another one, not {bases}")
        inherited = classes.cpdef_methods(bases[0]) if bases else {}
        if bases:
            used.add(bases[0])
        lines.append(f"cdef class {name}{f'({bases[0]})' if bases else ''}:")
        for slot in slots:
            typ = slot_types.get(slot)
            if typ:
                used.add(typ)
            lines.append(f"    cdef public {typ or 'object'} {slot}")
        for method, params, local_types in classes.declarations(name, inherited):
            used.update(typ for typ, _, _ in params if typ)
            used.update(local_types.values())
            if local_types:
                lines.append(f"    @cython.locals({', '.join(f'{k}={v}' for k, v in sorted(local_types.items()))})")
            lines.append(f"    cpdef {method}({', '.join(_param(*param) for param in params)})")
        if lines[-1].endswith(":"):
            lines.append("    pass")
    head = ["cimport cython"]
    for other in sorted({owners[typ] for typ in used} - {module}):
        head.append(f"from {other} cimport {', '.join(sorted(typ for typ in used if owners[typ] == other))}")
    return "\n".join(head + lines) + "\n"


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
    paths: dict[str, str] = {}
    for name in modules:
        base = os.path.join(package_dir, *name.split(".")[1:])
        source = paths[name] = base + ".py"
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
    if sources or NOT_BUILT in decided.values():
        for name, decision in decided.items():
            if decision == COMPILED:
                decided[name] = WITH_OTHERS
                sources[name] = paths[name]
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

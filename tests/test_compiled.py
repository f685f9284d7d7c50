"""The compiled data path: what the install built is what runs, and an edited source is never shadowed.

A throwaway package is compiled with Cython here (as setup.py compiles the
data path) so the guard is tested against a real extension module; each
decision is checked in a fresh interpreter, since an imported module stays.
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sidecar_proxy import compiled

SETUP = textwrap.dedent("""
    from setuptools import setup
    from Cython.Build import cythonize
    setup(ext_modules=cythonize(["pkgx/mod.py"], compiler_directives={"language_level": 3}, quiet=True),
          script_args=["build_ext", "--inplace", "--build-temp", "build_tmp"])
""")

PROBE = textwrap.dedent("""
    import json, sys
    from sidecar_proxy import compiled
    decided = compiled.install(sys.argv[1], ("pkgx.mod",))
    import pkgx.mod
    print(json.dumps({"decision": decided["pkgx.mod"], "value": pkgx.mod.VALUE,
                      "file": pkgx.mod.__file__, "status": compiled.status()}))
""")


def source_of(module: str) -> str:
    with open(os.path.join(os.path.dirname(compiled.__file__), *module.split(".")[1:]) + ".py") as f:
        return f.read()


def source(value: str) -> str:
    return f"VALUE = {value!r}\n\n\ndef twice(x):\n    return x * 2\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    pkg = root / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(source("v1"))
    (root / "setup.py").write_text(SETUP)
    result = subprocess.run([sys.executable, "setup.py"], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (pkg / compiled.MANIFEST).write_text(json.dumps({"pkgx.mod": compiled.source_digest(str(pkg / "mod.py"))}))
    return root


def probe(root, **env) -> dict:
    inherited = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}  # each test sets its own
    result = subprocess.run([sys.executable, "-c", PROBE, str(root / "pkgx")], cwd=root, capture_output=True,
                            text=True, timeout=60, env={**inherited, "PYTHONPATH": str(root), **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_a_current_build_runs_compiled(built):
    got = probe(built)
    assert got["decision"] == compiled.COMPILED and got["value"] == "v1"
    assert got["file"].endswith(".so") and got["status"]["data_path"] == "compiled"


def test_an_edited_source_is_imported_instead_of_its_stale_build(built):
    mod = built / "pkgx" / "mod.py"
    mod.write_text(source("v2"))
    try:
        got = probe(built)
        assert got["decision"] == compiled.STALE and got["value"] == "v2" and got["file"].endswith("mod.py")
        assert got["status"]["data_path"] == "source"
    finally:
        mod.write_text(source("v1"))
    assert probe(built)["decision"] == compiled.COMPILED  # the same text again: the build is current


def test_one_module_not_current_sends_every_module_to_its_source(built):
    """Compiled modules import each other's types, so a compiled one cannot run beside the source
    of another: an edited or unbuilt module sends the current ones to their sources too."""
    pkg = built / "pkgx"
    other = pkg / "other.py"
    other.write_text("VALUE = 'other'\n")
    built_other = pkg / ("other" + importlib.machinery.EXTENSION_SUFFIXES[0])
    manifest = pkg / compiled.MANIFEST
    saved = manifest.read_text()
    script = textwrap.dedent("""
        import json, sys
        from sidecar_proxy import compiled
        decided = compiled.install(sys.argv[1], ("pkgx.mod", "pkgx.other"))
        import pkgx.mod
        print(json.dumps({"decided": decided, "file": pkgx.mod.__file__, "status": compiled.status()}))
    """)

    def run() -> dict:
        result = subprocess.run([sys.executable, "-c", script, str(pkg)], cwd=built, capture_output=True,
                                text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(built)})
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    try:
        got = run()  # other.py is not built
        assert got["decided"] == {"pkgx.mod": compiled.WITH_OTHERS, "pkgx.other": compiled.NOT_BUILT}
        assert got["file"].endswith("mod.py") and got["status"]["data_path"] == "source"
        built_other.write_bytes(b"")  # only its presence counts here: other is never imported
        manifest.write_text(json.dumps({**json.loads(saved), "pkgx.other": "0" * 64}))
        got = run()  # other.py changed since its build
        assert got["decided"] == {"pkgx.mod": compiled.WITH_OTHERS, "pkgx.other": compiled.STALE}
        assert got["file"].endswith("mod.py")
        manifest.write_text(json.dumps({**json.loads(saved), "pkgx.other": compiled.source_digest(str(other))}))
        got = run()  # both current
        assert got["decided"] == {"pkgx.mod": compiled.COMPILED, "pkgx.other": compiled.COMPILED}
        assert got["file"].endswith(".so")
    finally:
        manifest.write_text(saved)
        other.unlink()
        built_other.unlink(missing_ok=True)


def test_the_environment_can_rule_the_compiled_code_out(built):
    got = probe(built, **{compiled.PURE_ENV: "1"})
    assert got["decision"] == compiled.FORCED and got["file"].endswith("mod.py") and got["value"] == "v1"
    assert probe(built, **{compiled.PURE_ENV: "0"})["decision"] == compiled.COMPILED


def test_no_manifest_means_no_trust(built):
    manifest = built / "pkgx" / compiled.MANIFEST
    saved = manifest.read_text()
    manifest.unlink()
    try:
        got = probe(built)
        assert got["decision"] == compiled.STALE and got["file"].endswith("mod.py")
    finally:
        manifest.write_text(saved)


def test_nothing_built_is_plain_source(tmp_path):
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(source("v1"))
    got = probe(tmp_path)
    assert got["decision"] == compiled.NOT_BUILT and got["file"].endswith("mod.py")


def test_every_extension_type_is_generated_from_its_slots():
    """What setup.py writes for each listed class: one C field per slot, typed where the class
    annotates the slot with an extension type, the base and the field types cimported."""
    import ast
    import importlib

    for module, classes in compiled.EXTENSION_TYPES.items():
        assert module in compiled.MODULES
        mod = importlib.import_module(module)
        text = compiled.pxd_text(module, source_of(module))
        for name in classes:
            cls = getattr(mod, name)
            block = text.split(f"cdef class {name}", 1)[1].split("cdef class", 1)[0]
            fields = [line.split()[2:] for line in block.splitlines()[1:] if line.startswith("    cdef public ")]
            assert [field for _, field in fields] == list(cls.__slots__), name
            node = next(n for n in ast.parse(source_of(module)).body if getattr(n, "name", None) == name)
            annotated = {stmt.target.id: ast.unparse(stmt.annotation).split(" | ")[0] for stmt in node.body
                         if isinstance(stmt, ast.AnnAssign)}
            assert {field: typ for typ, field in fields if typ != "object"} == annotated, name
    exchange = compiled.pxd_text("sidecar_proxy.protocols.http1.exchange",
                                 source_of("sidecar_proxy.protocols.http1.exchange"))
    assert "from sidecar_proxy.protocols.http1.retries cimport Retries\n" in exchange
    assert "from sidecar_proxy.protocols.http1.session cimport Session\n" in exchange
    assert "cdef class Exchange(Retries):" in exchange
    assert "    cdef public Session session\n" in exchange


def test_methods_become_cpdef_where_cython_can_compile_them_so():
    body = textwrap.dedent("""
        class Session:
            __slots__ = ("a", "ex")
            ex: Exchange | None

            def plain(self, x, y=1):
                pass
            def typed(self, ex: Exchange, other: int):
                local: Exchange = ex
            def _private(self):
                pass
            def __repr__(self):
                return ""
            @property
            def prop(self):
                return 1
            def star(self, *args):
                pass
            def closure(self):
                return lambda: self.a
            def generator(self):
                yield 1
            def gen_expr(self):
                return sum(x for x in self.a)
            async def coroutine(self):
                pass
            def uses_super(self):
                return super().plain()
    """)
    text = compiled.pxd_text("sidecar_proxy.protocols.http1.session", body)
    assert text.splitlines() == [
        "cimport cython",
        "from sidecar_proxy.protocols.http1.exchange cimport Exchange",
        "cdef class Session:",
        "    cdef public object a",
        "    cdef public Exchange ex",
        "    cpdef plain(self, x, y=*)",
        "    @cython.locals(local=Exchange)",
        "    cpdef typed(self, Exchange ex, other)",
        "    cpdef _private(self)",
    ]


def test_an_override_keeps_the_argument_types_of_its_base():
    """Cython requires an overriding cpdef method to take what the base's does."""
    base = "class Sink:\n    __slots__ = ()\n    def on_head(self, head: Request):\n        pass\n"
    session = ("class Session(Sink):\n    __slots__ = ()\n"
               "    def on_head(self, req: Response):\n        pass\n")
    sources = {"sidecar_proxy.protocols.events": base + "class Request:\n    __slots__ = ()\n"
               + "class Response:\n    __slots__ = ()\nclass Parser:\n    __slots__ = ()\n"}
    text = compiled.pxd_text("sidecar_proxy.protocols.http1.session", session, read=sources.__getitem__)
    assert "    cpdef on_head(self, Request req)" in text.splitlines()
    other = session.replace("(self, req: Response)", "(self, req, extra)")
    with pytest.raises(ValueError, match="overrides a cpdef method of a base with another signature"):
        compiled.pxd_text("sidecar_proxy.protocols.http1.session", other, read=sources.__getitem__)


@pytest.mark.parametrize("module", compiled.MODULES)
def test_each_compiled_module_imports_first(module):
    """Compiled, modules import the modules of the types they use before their own code runs, so
    a module-level import of a name from one of those could find it not yet defined. Each module,
    imported first in a fresh interpreter, must load."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-1500:]


@pytest.mark.parametrize("body, error", [
    ("import asyncio\nclass Session(asyncio.Protocol):\n    __slots__ = ('a',)\n", "base must be another one"),
    ("class Session:\n    __slots__ = ['a'] + ['b']\n", "literal tuple"),
    ("class Session:\n    pass\n", "literal tuple"),
    ("class Other:\n    __slots__ = ()\n", "no class Session"),
    ("class Session:\n    __slots__ = ('a',)\n    b: Exchange\n", "'b' is annotated but not a slot"),
])
def test_a_class_that_cannot_be_an_extension_type_fails_the_build(body, error):
    with pytest.raises(ValueError, match=error):
        compiled.pxd_text("sidecar_proxy.protocols.http1.session", body)


def test_this_install_runs_what_it_reports():
    """Every module's reported decision is what was imported; on CI (a fresh `pip install -e .`,
    which compiles) every module must be compiled and current."""
    import importlib

    status = compiled.status()
    assert set(status["modules"]) == set(compiled.MODULES)
    for name, decision in status["modules"].items():
        loaded = importlib.import_module(name).__file__
        assert loaded.endswith(".py") == (decision != compiled.COMPILED), (name, decision, loaded)
    if os.environ.get("CI") == "true":
        assert status["data_path"] == "compiled", status

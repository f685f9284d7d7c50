"""The compiled data path: what the install built is what runs, and an edited source is never shadowed.

A throwaway package is compiled with Cython here (as setup.py compiles the
data path) so the guard is tested against a real extension module; each
decision is checked in a fresh interpreter, since an imported module stays.
"""
from __future__ import annotations

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
    """What setup.py writes for each listed class: one C field per slot, the base cimported."""
    import importlib

    for module, classes in compiled.EXTENSION_TYPES.items():
        assert module in compiled.MODULES
        mod = importlib.import_module(module)
        text = compiled.pxd_text(module, source_of(module))
        for name in classes:
            cls = getattr(mod, name)
            block = text.split(f"cdef class {name}", 1)[1].split("cdef class", 1)[0]
            assert [line.split()[-1] for line in block.splitlines()[1:] if "cdef public object" in line] == \
                list(cls.__slots__), name
    exchange = compiled.pxd_text("sidecar_proxy.protocols.http1.exchange",
                                 source_of("sidecar_proxy.protocols.http1.exchange"))
    assert exchange.startswith("from sidecar_proxy.protocols.http1.retries cimport Retries\n")
    assert "cdef class Exchange(Retries):" in exchange


@pytest.mark.parametrize("body, error", [
    ("import asyncio\nclass Session(asyncio.Protocol):\n    __slots__ = ('a',)\n", "base must be another one"),
    ("class Session:\n    __slots__ = ['a'] + ['b']\n", "literal tuple"),
    ("class Session:\n    pass\n", "literal tuple"),
    ("class Other:\n    __slots__ = ()\n", "no class Session"),
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

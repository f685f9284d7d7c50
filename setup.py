"""Compiles the data path with Cython (see sidecar_proxy/compiled.py); everything else is in pyproject.toml.

The compiled modules are the .py sources as they are, plus a generated .pxd
per module that lists classes whose slots become C fields. Without Cython or a C
compiler, or with SIDECAR_PROXY_NO_COMPILE=1, the install is pure Python and
works the same, only slower. Each compiled source's SHA-256 goes into
sidecar_proxy/_compiled.json so that an edited source is never shadowed by
its stale compiled form.
"""
import importlib.util
import json
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiled_module():
    # Loaded by path: importing the package would need its dependencies at build time.
    spec = importlib.util.spec_from_file_location("_sidecar_compiled", os.path.join(HERE, "sidecar_proxy", "compiled.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compiled = _compiled_module()


class BuildExtRecording(build_ext):
    """build_ext that also writes the manifest of what it compiled, next to the modules."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self):
        super().run()
        digests = {}
        for ext in self.extensions:
            if os.path.exists(self.get_ext_fullpath(ext.name)):
                digests[ext.name] = compiled.source_digest(os.path.join(HERE, *ext.name.split(".")) + ".py")
        target = HERE if self.inplace else os.path.abspath(self.build_lib)
        path = os.path.join(target, "sidecar_proxy", compiled.MANIFEST)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(digests, f, indent=1, sort_keys=True)
        missing = sorted(set(compiled.MODULES) - set(digests))
        if missing:
            print(f"sidecar_proxy: not compiled (pure Python): {', '.join(missing)}", file=sys.stderr)

    def get_outputs(self):
        target = HERE if self.inplace else os.path.abspath(self.build_lib)
        return super().get_outputs() + [os.path.join(target, "sidecar_proxy", compiled.MANIFEST)]


def extensions():
    if os.environ.get("SIDECAR_PROXY_NO_COMPILE", "") not in ("", "0"):
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:
        print("sidecar_proxy: Cython is not installed; the data path stays pure Python", file=sys.stderr)
        return []
    for name in compiled.EXTENSION_TYPES:
        # Generated from the source each build, so the C fields never drift from __slots__.
        path = os.path.join(HERE, *name.split("."))
        with open(path + ".py") as f:
            text = compiled.pxd_text(name, f.read())
        with open(path + ".pxd", "w") as f:
            f.write(text)
    modules = [Extension(name, [name.replace(".", "/") + ".py"], optional=True) for name in compiled.MODULES]
    return cythonize(modules, compiler_directives={"language_level": 3, "annotation_typing": False}, quiet=True,
                     nthreads=os.cpu_count() or 1)


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtRecording})

"""sidecar_proxy: a transparent L4/L7 sidecar proxy on uvloop."""

from .compiled import install as _use_compiled_if_current

__version__ = "0.1.0"

# Before any data-path module is imported: a compiled module whose source
# changed since the build is not used (see compiled.py).
_use_compiled_if_current()

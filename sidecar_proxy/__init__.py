"""sidecar_proxy: a transparent L4/L7 sidecar proxy on uvloop."""

__version__ = "0.1.0"

"""The HTTP settings of listeners (``listeners.X.http``) and clusters (``clusters.X.pool``)."""
from __future__ import annotations

from typing import Any

from ..protocols.http1 import CODECS
from . import model
from .fields import Errors, check_keys, describe, get, get_parsed, parse_duration, parse_size

_HTTP_KEYS = {"codec", "max_request_header_bytes", "max_request_headers", "max_uri_length",
              "request_header_timeout", "x_forwarded_for", "x_forwarded_proto", "request_id"}
HTTP1_CODECS = (model.HTTP1_CODEC_AUTO, *CODECS)


def listener_http(err: Errors, path: str, doc: Any) -> model.HttpOptions | None:
    if doc is None:
        return model.HttpOptions()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, _HTTP_KEYS)
    d = model.HttpOptions()
    # Whether the codec is installed is a run-time matter (the listener says so when it starts).
    codec = get(err, path, doc, "codec", str, default=d.codec,
                check=lambda v: None if v in HTTP1_CODECS else
                f"'{v}' is not an HTTP/1.1 codec (one of: {', '.join(HTTP1_CODECS)})")
    header_bytes = get_parsed(err, path, doc, "max_request_header_bytes", parse_size, d.max_request_header_bytes,
                              lambda v: None if (1 << 10) <= v <= (1 << 20) else "must be 1KiB..1MiB")
    headers = get(err, path, doc, "max_request_headers", int, default=d.max_request_headers,
                  check=lambda v: None if 1 <= v <= 1000 else "must be 1..1000")
    uri = get_parsed(err, path, doc, "max_uri_length", parse_size, d.max_uri_length,
                     lambda v: None if 256 <= v <= (64 << 10) else "must be 256B..64KiB")
    header_timeout = get_parsed(err, path, doc, "request_header_timeout", parse_duration, d.request_header_timeout,
                                lambda v: None if 0 < v <= 3600 else "must be greater than 0 and at most 1h")
    flags = {key: get(err, path, doc, key, bool, default=getattr(d, key))
             for key in ("x_forwarded_for", "x_forwarded_proto", "request_id")}
    if len(err.items) > before:
        return None
    return model.HttpOptions(codec=codec, max_request_header_bytes=header_bytes, max_request_headers=headers,
                             max_uri_length=uri, request_header_timeout=header_timeout, **flags)


def cluster_pool(err: Errors, path: str, doc: Any) -> model.PoolOptions | None:
    if doc is None:
        return model.PoolOptions()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"max_idle_per_endpoint", "idle_timeout"})
    d = model.PoolOptions()
    max_idle = get(err, path, doc, "max_idle_per_endpoint", int, default=d.max_idle_per_endpoint,
                   check=lambda v: None if 0 <= v <= 10_000 else "must be 0..10000 (0 disables reuse)")
    idle = get_parsed(err, path, doc, "idle_timeout", parse_duration, d.idle_timeout,
                      lambda v: None if 0 < v <= 3600 else "must be greater than 0 and at most 1h")
    if len(err.items) > before:
        return None
    return model.PoolOptions(max_idle_per_endpoint=max_idle, idle_timeout=idle)

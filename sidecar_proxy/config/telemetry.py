"""The top-level ``telemetry`` section: ``metrics``, ``access_log`` and ``tracing``.

Tracing keys left out stay None in the model rather than taking their
default here: the OTEL_* environment variables fill them in when the proxy
starts (``sidecar_proxy.telemetry.tracing.resolve``), and a key written in
the config must win over the environment, so the model has to remember which
keys were written.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import model
from .fields import Errors, check_keys, describe, get, header_value_check, ip_check, join

MAX_QUEUE_SIZE = 1 << 20          # spans; 2048 ~ a few MiB of span objects, this ~ a GiB
MAX_SERVICE_NAME = 255
OTLP_TRACES_PATH = "/v1/traces"


def telemetry(err: Errors, doc: Any) -> model.Telemetry | None:
    if doc is None:
        return model.Telemetry()
    if not isinstance(doc, dict):
        err.add("telemetry", f"must be a mapping with metrics, access_log, tracing, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, "telemetry", doc, {"metrics", "access_log", "tracing"})
    metrics = _metrics(err, "telemetry.metrics", doc.get("metrics"))
    access_log = _access_log(err, "telemetry.access_log", doc.get("access_log"))
    tracing = _tracing(err, "telemetry.tracing", doc.get("tracing"))
    if len(err.items) > before:
        return None
    return model.Telemetry(metrics=metrics, access_log=access_log, tracing=tracing)


def _section(err: Errors, path: str, doc: Any, keys: set[str]) -> bool:
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with {', '.join(sorted(keys))}, got {describe(doc)}")
        return False
    check_keys(err, path, doc, keys)
    return True


def _metrics(err: Errors, path: str, doc: Any) -> model.MetricsOptions | None:
    if doc is None:
        return model.MetricsOptions()
    if not _section(err, path, doc, {"enabled", "port", "address"}):
        return None
    d = model.MetricsOptions()
    enabled = get(err, path, doc, "enabled", bool, default=d.enabled)
    port = get(err, path, doc, "port", int, default=d.port,
               check=lambda v: None if 0 <= v <= 65535 else f"port must be 0..65535 (0: no scrape listener), got {v}")
    address = get(err, path, doc, "address", str, default=d.address, check=ip_check)
    if enabled is None or port is None or address is None:
        return None
    return model.MetricsOptions(enabled=enabled, port=port, address=address)


def _access_log(err: Errors, path: str, doc: Any) -> model.AccessLogOptions | None:
    if doc is None:
        return model.AccessLogOptions()
    if not _section(err, path, doc, {"enabled", "format"}):
        return None
    d = model.AccessLogOptions()
    enabled = get(err, path, doc, "enabled", bool, default=d.enabled)
    fmt = doc.get("format")
    if fmt is False or fmt == "off":
        # YAML 1.1 reads an unquoted `off` as false: the old spelling of "no access log".
        err.add(join(path, "format"), "must be text or json (enabled: false turns the access log off)")
        fmt = None
    else:
        fmt = get(err, path, doc, "format", str, default=d.format,
                  check=lambda v: None if v in model.ACCESS_LOG_FORMATS else
                  f"'{v}' is not an access log format (one of: {', '.join(model.ACCESS_LOG_FORMATS)})")
    if enabled is None or fmt is None:
        return None
    return model.AccessLogOptions(enabled=enabled, format=fmt)


def _ratio(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else f"must be a ratio 0..1 (0.01 = 1 %), got {value}"


def _service_name(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if len(value) > MAX_SERVICE_NAME:
        return f"must be at most {MAX_SERVICE_NAME} characters"
    return header_value_check(value)


def normalize_endpoint(value: str) -> str:
    """An OTLP/HTTP traces URL, with ``/v1/traces`` added when it has no path. Raises ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{value}' is not an http:// or https:// URL with a host")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"'{value}' has an invalid port") from None
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (use OTEL_EXPORTER_OTLP_TRACES_HEADERS)")
    if header_value_check(value):
        raise ValueError("must not contain control characters")
    if parts.path in ("", "/"):
        parts = parts._replace(path=OTLP_TRACES_PATH)
    return urlunsplit(parts)


def _tracing(err: Errors, path: str, doc: Any) -> model.TracingOptions | None:
    if doc is None:
        return model.TracingOptions()
    if not _section(err, path, doc, {"enabled", "sampling", "endpoint", "max_queue_size", "service_name"}):
        return None
    before = len(err.items)
    enabled = get(err, path, doc, "enabled", bool, default=False)
    sampling = doc.get("sampling")
    if sampling is not None:
        if isinstance(sampling, bool) or not isinstance(sampling, (int, float)):
            err.add(join(path, "sampling"), f"must be a number 0..1, got {describe(sampling)}")
        elif _ratio(sampling):
            err.add(join(path, "sampling"), _ratio(sampling))
    endpoint = get(err, path, doc, "endpoint", str, default=None)
    if endpoint is not None:
        try:
            endpoint = normalize_endpoint(endpoint)
        except ValueError as exc:
            err.add(join(path, "endpoint"), str(exc))
    queue = get(err, path, doc, "max_queue_size", int, default=None,
                check=lambda v: None if 1 <= v <= MAX_QUEUE_SIZE else f"must be 1..{MAX_QUEUE_SIZE}")
    service = get(err, path, doc, "service_name", str, default=None, check=_service_name)
    if len(err.items) > before:
        return None
    return model.TracingOptions(enabled=enabled, sampling=None if sampling is None else float(sampling),
                                endpoint=endpoint, max_queue_size=queue, service_name=service)


def to_document(t: model.Telemetry) -> dict:
    """The section with every default filled in; tracing keys left to the environment stay null."""
    tr = t.tracing
    return {"metrics": {"enabled": t.metrics.enabled, "port": t.metrics.port, "address": t.metrics.address},
            "access_log": {"enabled": t.access_log.enabled, "format": t.access_log.format},
            "tracing": {"enabled": tr.enabled, "sampling": tr.sampling, "endpoint": tr.endpoint,
                        "max_queue_size": tr.max_queue_size, "service_name": tr.service_name}}

"""Tracing settings: ``telemetry.tracing`` from the config, the standard OTEL_* variables, defaults.

Precedence: a ``telemetry.tracing`` key written in the config, else the OTEL_* variable, else the
default. ``enabled`` comes from the config only, but OTEL_SDK_DISABLED=true turns tracing off (the
spec's kill switch). Read here: OTEL_TRACES_SAMPLER/_ARG, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
OTEL_EXPORTER_OTLP_ENDPOINT (+ /v1/traces), OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE,
OTEL_BSP_SCHEDULE_DELAY (ms), OTEL_SERVICE_NAME, service.name in OTEL_RESOURCE_ATTRIBUTES,
OTEL_PROPAGATORS (tracecontext, b3, b3multi; baggage needs nothing from a proxy; none). The
exporter reads the rest itself: OTEL_EXPORTER_OTLP_(TRACES_)HEADERS, _COMPRESSION, _TIMEOUT
(seconds, in the Python SDK), _CERTIFICATE, _CLIENT_KEY, _CLIENT_CERTIFICATE; the SDK's Resource
reads OTEL_RESOURCE_ATTRIBUTES. Values that cannot be used are reported in ``warnings`` (for the
caller to log once) and replaced by the default, never fatal: the proxy starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote

from . import propagation

DEFAULT_RATIO = 0.01
DEFAULT_ENDPOINT = "http://localhost:4318/v1/traces"
DEFAULT_QUEUE = 2048
DEFAULT_BATCH = 512
DEFAULT_DELAY = 5.0
DEFAULT_SERVICE = "sidecar-proxy"
DEFAULT_PROPAGATORS = (propagation.TRACECONTEXT,)

# OTEL_TRACES_SAMPLER -> (parent based, ratio or None for OTEL_TRACES_SAMPLER_ARG)
_SAMPLERS = {"always_on": (False, 1.0), "always_off": (False, 0.0), "traceidratio": (False, None),
             "parentbased_always_on": (True, 1.0), "parentbased_always_off": (True, 0.0),
             "parentbased_traceidratio": (True, None)}


@dataclass(frozen=True)
class TracingSettings:
    """The effective tracing settings: config, environment and defaults resolved."""

    enabled: bool = False
    parent_based: bool = True
    ratio: float = DEFAULT_RATIO
    endpoint: str = DEFAULT_ENDPOINT
    max_queue_size: int = DEFAULT_QUEUE
    max_export_batch_size: int = DEFAULT_BATCH
    schedule_delay: float = DEFAULT_DELAY           # seconds between exports when no batch is full
    service_name: str = DEFAULT_SERVICE
    propagators: tuple[str, ...] = DEFAULT_PROPAGATORS
    resource_attributes: Mapping[str, str] = field(default_factory=dict)   # extra, e.g. service.instance.id
    warnings: tuple[str, ...] = ()                  # environment values ignored, for the caller to log


def _env_int(environ: Mapping[str, str], name: str, default: int, warnings: list[str], low: int = 1) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low:
        warnings.append(f"{name}={raw!r} is not an integer >= {low}; using {default}")
        return default
    return value


def _env_sampler(environ: Mapping[str, str], warnings: list[str]) -> tuple[bool, float]:
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return True, DEFAULT_RATIO
    if name not in _SAMPLERS:
        warnings.append(f"OTEL_TRACES_SAMPLER={name!r} is not supported (one of {', '.join(_SAMPLERS)}); "
                        f"using parentbased_traceidratio {DEFAULT_RATIO}")
        return True, DEFAULT_RATIO
    parent_based, ratio = _SAMPLERS[name]
    if ratio is None:
        raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(raw) if raw else 1.0   # the SDK's default for a ratio sampler without an argument
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            warnings.append(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a ratio 0..1; using 1.0")
            ratio = 1.0
    return parent_based, ratio


def _env_propagators(environ: Mapping[str, str], warnings: list[str]) -> tuple[str, ...]:
    raw = environ.get("OTEL_PROPAGATORS")
    if raw is None or not raw.strip():
        return DEFAULT_PROPAGATORS
    out: list[str] = []
    for item in (p.strip().lower() for p in raw.split(",")):
        if item == "none":
            return ()
        if item in propagation.SUPPORTED:
            if item not in out:
                out.append(item)
        elif item and item not in propagation.PASSIVE:
            warnings.append(f"OTEL_PROPAGATORS: {item!r} is not supported (tracecontext, b3, b3multi); ignored")
    return tuple(out)


def _env_service_name(environ: Mapping[str, str]) -> str:
    name = environ.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "service.name" and value.strip():
            return unquote(value.strip())
    return DEFAULT_SERVICE


def resolve(options, environ: Mapping[str, str] | None = None, **resource_attributes: str) -> TracingSettings:
    """``options``: a config.model.TracingOptions. Config keys written win over the environment."""
    env = os.environ if environ is None else environ
    warnings: list[str] = []
    enabled = bool(options.enabled)
    if enabled and env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        warnings.append("OTEL_SDK_DISABLED=true: tracing is off although telemetry.tracing.enabled is true")
        enabled = False
    if options.sampling is not None:
        parent_based, ratio = True, float(options.sampling)
    else:
        parent_based, ratio = _env_sampler(env, warnings)
    if options.endpoint is not None:
        endpoint = options.endpoint
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        endpoint = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].strip()
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"].strip().removesuffix("/") + "/v1/traces"
    else:
        endpoint = DEFAULT_ENDPOINT
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            warnings.append(f"{name}={protocol!r}: the proxy exports OTLP over http/protobuf only")
            break
    queue = options.max_queue_size or _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE, warnings)
    batch = min(_env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_BATCH, warnings), queue)
    delay = _env_int(env, "OTEL_BSP_SCHEDULE_DELAY", int(DEFAULT_DELAY * 1000), warnings) / 1000
    service = options.service_name or _env_service_name(env)
    return TracingSettings(enabled=enabled, parent_based=parent_based, ratio=ratio, endpoint=endpoint,
                           max_queue_size=queue, max_export_batch_size=batch, schedule_delay=delay,
                           service_name=service, propagators=_env_propagators(env, warnings),
                           resource_attributes=dict(resource_attributes), warnings=tuple(warnings))

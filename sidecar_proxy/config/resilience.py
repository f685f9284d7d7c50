"""Retries of a route (``route_tables.T[i].retry``) and the resilience settings of a cluster
(``clusters.X.circuit_breakers``, ``.retry_budget``, ``.outlier_detection``)."""
from __future__ import annotations

import difflib
from typing import Any

from . import model
from .dump import format_duration
from .fields import Errors, check_keys, describe, get, get_parsed, join, parse_duration, parse_size

_RETRY_KEYS = {"on", "statuses", "attempts", "per_try_timeout", "backoff", "max_retry_after", "buffer_limit",
               "retry_non_idempotent"}
MAX_ATTEMPTS = 10
MAX_BACKOFF = 60.0
MAX_PER_TRY_TIMEOUT = 86_400.0
MAX_RETRY_AFTER = 300.0
MAX_RETRY_BUFFER = 16 << 20


def route_retry(err: Errors, path: str, doc: Any) -> model.Retry | None:
    """None when absent; ``{}`` retries with the defaults."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping (retry: {{}} for the defaults), got {describe(doc)}")
        return None
    before = len(err.items)
    # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean true; nobody means that here.
    if any(key is True for key in doc):
        if "on" in doc:
            err.add(join(path, "on"), "is given twice (once quoted)")
        doc = {"on" if key is True else key: value for key, value in doc.items()}
    check_keys(err, path, doc, _RETRY_KEYS)
    d = model.Retry()
    on = _conditions(err, join(path, "on"), list(d.on) if doc.get("on") is None else doc["on"])
    statuses = _statuses(err, join(path, "statuses"), [] if doc.get("statuses") is None else doc["statuses"])
    if on == () and statuses == ():
        err.add(join(path, "on"), "is empty and so is statuses: the route would never retry")
    attempts = get(err, path, doc, "attempts", int, default=d.attempts,
                   check=lambda v: None if 1 <= v <= MAX_ATTEMPTS else f"must be 1..{MAX_ATTEMPTS}")
    per_try = get_parsed(err, path, doc, "per_try_timeout", parse_duration, d.per_try_timeout,
                         lambda v: None if v <= MAX_PER_TRY_TIMEOUT else "must be at most 24h (0s: none)")
    base, cap = _backoff(err, join(path, "backoff"), doc.get("backoff"), d)
    max_retry_after = get_parsed(err, path, doc, "max_retry_after", parse_duration, d.max_retry_after,
                                 lambda v: None if v <= MAX_RETRY_AFTER else "must be at most 300s")
    buffer_limit = get_parsed(err, path, doc, "buffer_limit", parse_size, d.buffer_limit,
                              lambda v: None if v <= MAX_RETRY_BUFFER else "must be 0..16MiB")
    non_idempotent = get(err, path, doc, "retry_non_idempotent", bool, default=d.retry_non_idempotent)
    if len(err.items) > before:
        return None
    return model.Retry(on=on, statuses=statuses, attempts=attempts, per_try_timeout=per_try, backoff_base=base,
                       backoff_cap=cap, max_retry_after=max_retry_after, buffer_limit=buffer_limit,
                       retry_non_idempotent=non_idempotent)


def _conditions(err: Errors, path: str, value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        err.add(path, f"must be a list of conditions ({', '.join(model.RETRY_CONDITIONS)}), got {describe(value)}")
        return None
    out: list[str] = []
    for i, item in enumerate(value):
        ipath = f"{path}[{i}]"
        if item in out:
            err.add(ipath, f"'{item}' is listed twice")
        elif isinstance(item, str) and item in model.RETRY_CONDITIONS:
            out.append(item)
        elif (isinstance(item, int) and not isinstance(item, bool)) or (isinstance(item, str) and item.isdigit()):
            # The schema's first draft took codes here ('on: [reset, "503"]'); say where they went.
            err.add(ipath, f"'{item}' is not a retry condition; list response codes in statuses")
        else:
            hint = difflib.get_close_matches(str(item), model.RETRY_CONDITIONS, n=1)
            err.add(ipath, f"'{item}' is not a retry condition" + (f" (did you mean '{hint[0]}'?)" if hint else
                                                                  f" (one of: {', '.join(model.RETRY_CONDITIONS)})"))
    return tuple(out) if len(out) == len(value) else None


def _statuses(err: Errors, path: str, value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list):
        err.add(path, f"must be a list of response codes, got {describe(value)}")
        return None
    out: list[int] = []
    for i, code in enumerate(value):
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            err.add(f"{path}[{i}]", f"must be a response code 100..599, got {code!r}")
        elif code in out:
            err.add(f"{path}[{i}]", f"{code} is listed twice")
        else:
            out.append(code)
    return tuple(out) if len(out) == len(value) else None


def _backoff(err: Errors, path: str, doc: Any, d: model.Retry) -> tuple[float | None, float | None]:
    if doc is None:
        return d.backoff_base, d.backoff_cap
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with base and cap, got {describe(doc)}")
        return None, None
    check_keys(err, path, doc, {"base", "cap"})
    base = get_parsed(err, path, doc, "base", parse_duration, d.backoff_base,
                      lambda v: None if 0 < v <= MAX_BACKOFF else "must be greater than 0 and at most 60s")
    # Without a cap, a base above the default cap raises the cap to it: the user asked for that base.
    cap_default = max(d.backoff_cap, base) if base is not None else d.backoff_cap
    cap = get_parsed(err, path, doc, "cap", parse_duration, cap_default,
                     lambda v: None if v <= MAX_BACKOFF else "must be at most 60s")
    if base is not None and cap is not None and cap < base:
        err.add(join(path, "cap"), f"must be at least base ({format_duration(base)})")
        return base, None
    return base, cap


# --- clusters


_BREAKER_KEYS = ("max_connections", "max_pending_requests", "max_requests", "max_retries")


def cluster_circuit_breakers(err: Errors, path: str, doc: Any) -> model.CircuitBreakers | None:
    if doc is None:
        return model.CircuitBreakers()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with {', '.join(_BREAKER_KEYS)}, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, set(_BREAKER_KEYS))
    d = model.CircuitBreakers()
    limits = {key: get(err, path, doc, key, int, default=getattr(d, key),
                       check=lambda v: None if 0 <= v <= 1_000_000 else "must be 0..1000000")
              for key in _BREAKER_KEYS}
    if len(err.items) > before:
        return None
    return model.CircuitBreakers(**limits)


def cluster_retry_budget(err: Errors, path: str, doc: Any) -> model.RetryBudget | None:
    if doc is None:
        return model.RetryBudget()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with percent and min_retries, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"percent", "min_retries"})
    d = model.RetryBudget()
    percent = d.percent if doc.get("percent") is None else doc["percent"]
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
        err.add(join(path, "percent"), f"must be a number 0..100, got {percent!r}")
    min_retries = get(err, path, doc, "min_retries", int, default=d.min_retries,
                      check=lambda v: None if 0 <= v <= 10_000 else "must be 0..10000")
    if len(err.items) > before:
        return None
    return model.RetryBudget(percent=float(percent), min_retries=min_retries)


def cluster_outlier_detection(err: Errors, path: str, doc: Any) -> model.OutlierDetection | None:
    """None when absent (disabled); ``{}`` enables it with the defaults."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping (outlier_detection: {{}} for the defaults), got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"consecutive_5xx", "consecutive_gateway_failure", "base_ejection_time",
                                "max_ejection_time", "max_ejection_percent"})
    d = model.OutlierDetection()
    runs = {key: get(err, path, doc, key, int, default=getattr(d, key),
                     check=lambda v: None if 1 <= v <= 1000 else "must be 1..1000")
            for key in ("consecutive_5xx", "consecutive_gateway_failure")}
    base = get_parsed(err, path, doc, "base_ejection_time", parse_duration, d.base_ejection_time,
                      lambda v: None if 0 < v <= 3600 else "must be greater than 0 and at most 1h")
    longest = get_parsed(err, path, doc, "max_ejection_time", parse_duration, d.max_ejection_time,
                         lambda v: None if v <= 86_400 else "must be at most 24h")
    if base is not None and longest is not None and longest < base:
        err.add(join(path, "max_ejection_time"), f"must be at least base_ejection_time ({format_duration(base)})")
    percent = get(err, path, doc, "max_ejection_percent", int, default=d.max_ejection_percent,
                  check=lambda v: None if 0 <= v <= 100 else "must be 0..100")
    if len(err.items) > before:
        return None
    return model.OutlierDetection(base_ejection_time=base, max_ejection_time=longest, max_ejection_percent=percent,
                                  **runs)

"""``route_tables``: document -> ``tuple[model.Route, ...]``, and the checks between tables and listeners.

A route is ``match`` + exactly one action (``cluster``, ``weighted_clusters``,
``direct_response``, ``redirect``) + optional header rewrites, host rewrite,
timeout, rate limit, retry (resilience.py) and authorization (mtls.py).
Errors name the document path, e.g.
``route_tables.outbound[2].match.path_regex: invalid regex: ...``.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Collection

from . import model
from .dump import format_duration
from .fields import (Errors, check_keys, describe, get, get_parsed, header_value_check, join, parse_duration,
                     split_host_pattern, token_check)
from .matches import authority_check, match as parse_match, normal_authority, path_check
from .mtls import route_authorization
from .resilience import route_retry

# Keys of later issues: "not supported by this build yet", not "unknown key".
_PLANNED_ROUTE: frozenset[str] = frozenset()
_ROUTE_KEYS = {"name", "match", "cluster", "weighted_clusters", "direct_response", "redirect",
               "request_headers", "response_headers", "host_rewrite", "timeout", "rate_limit", "retry",
               "authorization"}
_REWRITE_KEYS = {"add", "set", "remove"}

# Connection-level and framing fields: the codec and the session own them,
# a rewrite would corrupt the message or the connection. Host has its own
# key (host_rewrite) so it stays a valid authority.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", "host"})

MAX_DIRECT_BODY = 64 << 10
MAX_WEIGHT = 10_000
MAX_ROUTE_NAME = 128
MAX_TIMEOUT = 86_400.0
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*\Z")


def route_table(err: Errors, name: str, doc: Any, cluster_names: Collection[str] = ()) -> tuple[model.Route, ...] | None:
    """Parse one table. ``cluster_names``: the clusters of the document (even invalid ones), for references."""
    path = f"route_tables.{name}"
    if not isinstance(doc, list) or not doc:
        err.add(path, "must be a non-empty list of routes")
        return None
    routes = []
    names: dict[str, int] = {}
    for i, item in enumerate(doc):
        route = _route(err, f"{path}[{i}]", f"{name}[{i}]", item, cluster_names)
        if route is None:
            continue
        if route.name in names:
            err.add(f"{path}[{i}].name", f"'{route.name}' is also the name of {path}[{names[route.name]}]")
            continue
        names[route.name] = i
        routes.append(route)
    return tuple(routes)


def _route(err: Errors, path: str, default_name: str, doc: Any, cluster_names: Collection[str]) -> model.Route | None:
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with 'match' and an action such as 'cluster', got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, _ROUTE_KEYS, _PLANNED_ROUTE)
    name = get(err, path, doc, "name", str, default=default_name, check=_name_check)
    raw_match = get(err, path, doc, "match", dict)
    match = parse_match(err, join(path, "match"), raw_match) if raw_match is not None else None

    actions = [a for a in model.ACTIONS if doc.get(a) is not None]
    if not actions:
        err.add(path, "needs an action: one of cluster, weighted_clusters, direct_response, redirect")
    elif len(actions) > 1:
        err.add(path, f"has {len(actions)} actions ({', '.join(actions)}); a route takes exactly one")
    cluster = get(err, path, doc, "cluster", str, default=None,
                  check=lambda v: _reference(v, cluster_names))
    weighted = _weighted(err, join(path, "weighted_clusters"), doc.get("weighted_clusters"), cluster_names)
    direct = _direct_response(err, join(path, "direct_response"), doc.get("direct_response"))
    redirect = _redirect(err, join(path, "redirect"), doc.get("redirect"))

    forwards = bool(actions) and actions[0] in ("cluster", "weighted_clusters")
    if actions and not forwards:
        for key in ("request_headers", "host_rewrite", "timeout", "retry"):
            if doc.get(key) is not None:
                err.add(join(path, key), f"applies only to routes that send to a cluster, not to {actions[0]}")
    request_headers = _rewrite(err, join(path, "request_headers"), doc.get("request_headers"))
    response_headers = _rewrite(err, join(path, "response_headers"), doc.get("response_headers"))
    host_rewrite = get(err, path, doc, "host_rewrite", str, default=None, check=authority_check)
    timeout = get_parsed(err, path, doc, "timeout", parse_duration, model.DEFAULT_ROUTE_TIMEOUT,
                         lambda v: None if v <= MAX_TIMEOUT else "must be at most 24h (0s disables it)")
    rate_limit = _rate_limit(err, join(path, "rate_limit"), doc.get("rate_limit"))
    retry = route_retry(err, join(path, "retry"), doc.get("retry"))
    # Any action: a client may be refused a direct_response or a redirect too.
    authorization = route_authorization(err, join(path, "authorization"), doc.get("authorization"))
    if retry is not None and timeout and retry.per_try_timeout > timeout:
        err.add(join(path, "retry.per_try_timeout"), f"is longer than the route timeout ({format_duration(timeout)}), "
                                                     "which bounds all the tries together")
    if len(err.items) > before:
        return None
    return model.Route(match=match, cluster=cluster, weighted_clusters=weighted or (), direct_response=direct,
                       redirect=redirect, name=name, request_headers=request_headers,
                       response_headers=response_headers,
                       host_rewrite=normal_authority(host_rewrite) if host_rewrite is not None else None,
                       timeout=timeout, rate_limit=rate_limit, retry=retry, authorization=authorization)


def _rate_limit(err: Errors, path: str, doc: Any) -> model.RateLimit | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with 'requests_per_second', got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"requests_per_second", "burst", "key", "shadow", "max_keys"})
    rps = doc.get("requests_per_second")
    if rps is None:
        err.add(join(path, "requests_per_second"), "is required")
    elif isinstance(rps, bool) or not isinstance(rps, (int, float)) or not 0 < rps <= 1_000_000:
        err.add(join(path, "requests_per_second"), f"must be a number greater than 0 and at most 1000000, got {rps!r}")
    default_burst = max(1, math.ceil(rps)) if isinstance(rps, (int, float)) and not isinstance(rps, bool) else 1
    burst = get(err, path, doc, "burst", int, default=default_burst,
                check=lambda v: None if 1 <= v <= 1_000_000 else "must be 1..1000000")
    key = get(err, path, doc, "key", str, default=None, check=_rate_limit_key_check)
    shadow = get(err, path, doc, "shadow", bool, default=False)
    max_keys = get(err, path, doc, "max_keys", int, default=10_000,
                   check=lambda v: None if 1 <= v <= 1_000_000 else "must be 1..1000000")
    if len(err.items) > before:
        return None
    if key is not None and key.startswith("header:"):
        key = "header:" + key[7:].lower()
    return model.RateLimit(requests_per_second=float(rps), burst=burst, key=key, shadow=shadow, max_keys=max_keys)


def _rate_limit_key_check(value: str) -> str | None:
    if value in ("client_ip", "peer_identity"):
        return None
    if value.startswith("header:") and token_check(value[7:]) is None:
        return None
    return f"'{value}' is not a rate limit key: 'client_ip', 'peer_identity' or 'header:<field name>'"


def _name_check(value: str) -> str | None:
    if not value.strip() or len(value) > MAX_ROUTE_NAME or header_value_check(value):
        return f"must be 1-{MAX_ROUTE_NAME} printable characters"
    return None


def _reference(name: str, cluster_names: Collection[str]) -> str | None:
    if name in cluster_names:
        return None
    hint = difflib.get_close_matches(name, list(cluster_names), n=1)
    return f"no cluster named '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")


# --- actions


def _weighted(err: Errors, path: str, value: Any, cluster_names: Collection[str]) -> tuple[model.WeightedCluster, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        err.add(path, f"must be a non-empty list of {{cluster, weight}}, got {describe(value)}")
        return None
    out = []
    seen: set[str] = set()
    for i, doc in enumerate(value):
        wpath = f"{path}[{i}]"
        if not isinstance(doc, dict):
            err.add(wpath, f"must be a mapping with 'cluster' and 'weight', got {describe(doc)}")
            continue
        check_keys(err, wpath, doc, {"cluster", "weight"})
        cluster = get(err, wpath, doc, "cluster", str, check=lambda v: _reference(v, cluster_names))
        weight = get(err, wpath, doc, "weight", int,
                     check=lambda v: None if 1 <= v <= MAX_WEIGHT else f"must be 1..{MAX_WEIGHT}")
        if cluster in seen:
            err.add(join(wpath, "cluster"), f"'{cluster}' is listed twice")
            continue
        if cluster is not None and weight is not None:
            seen.add(cluster)
            out.append(model.WeightedCluster(cluster, weight))
    return tuple(out)


def _direct_response(err: Errors, path: str, doc: Any) -> model.DirectResponse | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with 'status' (and 'body', 'content_type'), got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"status", "body", "content_type"})
    status = get(err, path, doc, "status", int, check=lambda v: None if 200 <= v <= 599 else "must be 200..599")
    body = get(err, path, doc, "body", str, default="",
               check=lambda v: None if len(v.encode()) <= MAX_DIRECT_BODY else
               f"must be at most {MAX_DIRECT_BODY} bytes (UTF-8)")
    content_type = get(err, path, doc, "content_type", str, default="text/plain",
                       check=lambda v: header_value_check(v) or (None if v.strip() else "must not be empty"))
    if len(err.items) > before:
        return None
    return model.DirectResponse(status=status, body=body, content_type=content_type)


def _redirect(err: Errors, path: str, doc: Any) -> model.Redirect | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with at least one of scheme, host, port, path, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, {"status", "scheme", "host", "port", "path", "strip_query"})
    status = get(err, path, doc, "status", int, default=301,
                 check=lambda v: None if v in model.REDIRECT_STATUSES else
                 f"must be one of {', '.join(map(str, model.REDIRECT_STATUSES))}")
    scheme = get(err, path, doc, "scheme", str, default=None,
                 check=lambda v: None if _SCHEME_RE.match(v.lower()) else f"'{v}' is not a URL scheme")
    host = get(err, path, doc, "host", str, default=None, check=_redirect_host_check)
    port = get(err, path, doc, "port", int, default=None,
               check=lambda v: None if 1 <= v <= 65535 else f"port must be 1..65535, got {v}")
    new_path = get(err, path, doc, "path", str, default=None, check=path_check)
    strip_query = get(err, path, doc, "strip_query", bool, default=False)
    if all(doc.get(k) is None for k in ("scheme", "host", "port", "path")):
        err.add(path, "changes nothing, which would redirect to the same URL: "
                      "give at least one of scheme, host, port, path")
    if len(err.items) > before:
        return None
    return model.Redirect(status=status, scheme=scheme.lower() if scheme else None,
                          host=split_host_pattern(host)[0] if host else None, port=port, path=new_path,
                          strip_query=strip_query)


def _redirect_host_check(value: str) -> str | None:
    try:
        _, port = split_host_pattern(value)
    except ValueError as exc:
        return str(exc)
    return "must not have a port (use redirect.port)" if port is not None else None


# --- header rewrites


def _rewrite(err: Errors, path: str, doc: Any) -> model.HeaderRewrite:
    if doc is None:
        return model.HeaderRewrite()
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping with add, set, remove, got {describe(doc)}")
        return model.HeaderRewrite()
    check_keys(err, path, doc, _REWRITE_KEYS)
    seen: dict[str, str] = {}

    def field_name(npath: str, name: Any, where: str) -> str | None:
        if not isinstance(name, str):
            err.add(npath, f"field name must be a string, got {describe(name)}")
            return None
        problem = token_check(name)
        lower = name.lower()
        if problem is None and lower in HOP_BY_HOP:
            problem = (f"'{lower}' is a hop-by-hop or framing field the proxy manages"
                       + ("; use host_rewrite" if lower == "host" else ""))
        if problem is None and lower in seen:
            problem = f"'{lower}' is also in {seen[lower]}; a field goes in one of add, set, remove"
        if problem:
            err.add(npath, problem)
            return None
        seen[lower] = where
        return lower

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        value = doc.get(key)
        if value is None:
            return ()
        kpath = join(path, key)
        if not isinstance(value, dict):
            err.add(kpath, f"must be a mapping of field name to value, got {describe(value)}")
            return ()
        out = []
        for name, field_value in value.items():
            npath = join(kpath, str(name))
            lower = field_name(npath, name, key)
            if isinstance(field_value, (int, float)) and not isinstance(field_value, bool):
                field_value = str(field_value)
            if not isinstance(field_value, str):
                err.add(npath, f"must be a string, got {describe(field_value)}")
                continue
            problem = header_value_check(field_value)
            if problem:
                err.add(npath, problem)
                continue
            if lower is not None:
                out.append((lower, field_value))
        return tuple(out)

    add, set_ = pairs("add"), pairs("set")
    remove = []
    raw_remove = doc.get("remove")
    if raw_remove is not None:
        if not isinstance(raw_remove, list):
            err.add(join(path, "remove"), f"must be a list of field names, got {describe(raw_remove)}")
        else:
            for i, name in enumerate(raw_remove):
                lower = field_name(f"{path}.remove[{i}]", name, "remove")
                if lower is not None:
                    remove.append(lower)
    return model.HeaderRewrite(add=add, set=set_, remove=tuple(remove))


# --- across sections


def check_listener_tables(err: Errors, listeners: dict[str, model.Listener],
                          tables: dict[str, tuple[model.Route, ...]], clusters: dict[str, model.Cluster]) -> None:
    """What a listener needs of its table.

    Non-HTTP connections take the table's first catch-all route that sends to
    a cluster (``Config.tcp_route``): a "tcp" listener needs one, and so does
    an "auto" listener unless it is transparent (then such connections go to
    their original destination). An "http" listener needs none: a request no
    route matches is answered 404 (or, when transparent, goes where it was
    going). A non-transparent listener has no original destination, so none
    of its routes may send to an original_destination cluster.
    """
    for lname, listener in listeners.items():
        routes = tables.get(listener.routes)
        if routes is None:
            continue
        rpath = f"listeners.{lname}.routes"
        needs_tcp = listener.protocol == "tcp" or (listener.protocol == "auto" and not listener.transparent)
        if needs_tcp and not any(r.forwards and r.match.is_catch_all for r in routes):
            why = ("which a tcp listener needs" if listener.protocol == "tcp" else
                   "which a non-transparent auto listener needs for what is not HTTP")
            err.add(rpath, f"route table '{listener.routes}' has no catch-all route (match: {{}}) that sends to "
                           f"a cluster, {why}")
        if listener.transparent:
            continue
        for route in routes:
            od = next((c for c in route.clusters if c in clusters and clusters[c].original_destination), None)
            if od is not None:
                err.add(rpath, f"route '{route.name}' sends to original_destination cluster '{od}', but the "
                               "listener is not transparent, so there is no original destination")
                break

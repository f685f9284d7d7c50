"""Config -> the document a user would write, with every default filled in.

``/config_dump`` shows this, so an operator sees the values actually in
force (idle timeouts, buffer limits), and ``load.build(to_document(c)) == c``
holds, so a dump can be edited and posted back.
"""
from __future__ import annotations

from dataclasses import asdict

from .model import Cluster, ClusterTls, Config, HeaderRewrite, HttpOptions, Listener, ListenerTls, Match, Retry, Route
from ..addr import format_addr
from .telemetry import to_document as _telemetry


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        value = seconds / scale
        if value >= 1 and abs(value - round(value)) < 1e-9:
            return f"{round(value)}{unit}"
    return f"{round(seconds * 1e6)}us" if seconds < 1e-3 else f"{seconds:g}s"


def _http(h: HttpOptions) -> dict:
    return {"codec": h.codec, "max_request_header_bytes": h.max_request_header_bytes,
            "max_request_headers": h.max_request_headers, "max_uri_length": h.max_uri_length,
            "request_header_timeout": format_duration(h.request_header_timeout),
            "x_forwarded_for": h.x_forwarded_for, "x_forwarded_proto": h.x_forwarded_proto,
            "request_id": h.request_id}


def _listener(l: Listener) -> dict:
    doc = {"address": l.address, "port": l.port, "transparent": l.transparent,
           "interception": l.interception, "protocol": l.protocol,
           "routes": l.routes, "idle_timeout": format_duration(l.idle_timeout),
           "max_connections": l.max_connections, "buffer_limit": l.buffer_limit,
           "detection_timeout": format_duration(l.detection_timeout), "opaque_ports": sorted(l.opaque_ports)}
    if l.protocol != "tcp":  # a tcp listener has no http section
        doc["http"] = _http(l.http)
    if l.tls != ListenerTls():
        doc["tls"] = {"mode": l.tls.mode}
    return doc


def _cluster(c: Cluster) -> dict:
    doc = {"original_destination": c.original_destination,
           "connect_timeout": format_duration(c.connect_timeout), "lb": c.lb,
           "pool": {"max_idle_per_endpoint": c.pool.max_idle_per_endpoint,
                    "idle_timeout": format_duration(c.pool.idle_timeout)},
           "circuit_breakers": asdict(c.circuit_breakers), "retry_budget": asdict(c.retry_budget)}
    if c.outlier_detection is not None:
        o = c.outlier_detection
        doc["outlier_detection"] = {
            "consecutive_5xx": o.consecutive_5xx, "consecutive_gateway_failure": o.consecutive_gateway_failure,
            "base_ejection_time": format_duration(o.base_ejection_time),
            "max_ejection_time": format_duration(o.max_ejection_time), "max_ejection_percent": o.max_ejection_percent}
    if c.tls != ClusterTls():
        doc["tls"] = {"mode": c.tls.mode, "peer_identity": list(c.tls.peer_identity)}
        if c.tls.sni is not None:
            doc["tls"]["sni"] = c.tls.sni
    if c.endpoints:
        doc["endpoints"] = [{"address": format_addr((e.host, e.port)), "weight": e.weight} for e in c.endpoints]
    return doc


def _match(m: Match) -> dict:
    doc: dict = {}
    if m.host:
        doc["host"] = list(m.host)
    for key in ("path", "path_prefix", "path_regex"):
        if getattr(m, key) is not None:
            doc[key] = getattr(m, key)
    if m.method:
        doc["method"] = list(m.method)
    if m.headers:
        doc["headers"] = [{"name": h.name, h.kind: True if h.kind == "present" else h.value, "invert": h.invert}
                          for h in m.headers]
    if m.peer_identity:
        doc["peer_identity"] = list(m.peer_identity)
    return doc


def _rewrite(r: HeaderRewrite) -> dict:
    return {"add": dict(r.add), "set": dict(r.set), "remove": list(r.remove)}


def _retry(r: Retry) -> dict:
    return {"on": list(r.on), "statuses": list(r.statuses), "attempts": r.attempts,
            "per_try_timeout": format_duration(r.per_try_timeout),
            "backoff": {"base": format_duration(r.backoff_base), "cap": format_duration(r.backoff_cap)},
            "max_retry_after": format_duration(r.max_retry_after), "buffer_limit": r.buffer_limit,
            "retry_non_idempotent": r.retry_non_idempotent}


def _route(r: Route) -> dict:
    doc: dict = {"name": r.name, "match": _match(r.match)}
    if r.cluster is not None:
        doc["cluster"] = r.cluster
    elif r.weighted_clusters:
        doc["weighted_clusters"] = [{"cluster": w.cluster, "weight": w.weight} for w in r.weighted_clusters]
    elif r.direct_response is not None:
        d = r.direct_response
        doc["direct_response"] = {"status": d.status, "body": d.body, "content_type": d.content_type}
    else:
        rd = r.redirect
        doc["redirect"] = {"status": rd.status, "strip_query": rd.strip_query}
        doc["redirect"].update({k: getattr(rd, k) for k in ("scheme", "host", "port", "path")
                                if getattr(rd, k) is not None})
    # Forwarding-only keys (the validator refuses them on the other actions).
    if r.forwards:
        doc["timeout"] = format_duration(r.timeout)
        if r.host_rewrite is not None:
            doc["host_rewrite"] = r.host_rewrite
        if r.request_headers:
            doc["request_headers"] = _rewrite(r.request_headers)
        if r.retry is not None:
            doc["retry"] = _retry(r.retry)
    if r.response_headers:
        doc["response_headers"] = _rewrite(r.response_headers)
    if r.rate_limit is not None:
        rl = r.rate_limit
        doc["rate_limit"] = {"requests_per_second": rl.requests_per_second, "burst": rl.burst,
                             "shadow": rl.shadow, "max_keys": rl.max_keys}
        if rl.key is not None:
            doc["rate_limit"]["key"] = rl.key
    if r.authorization is not None:
        doc["authorization"] = {"allow_identities": list(r.authorization.allow_identities)}
    return doc


def to_document(config: Config) -> dict:
    doc = {
        "version": config.version,
        "node": {"id": config.node.id},
        "admin": {"address": config.admin.address, "port": config.admin.port},
        "listeners": {n: _listener(l) for n, l in config.listeners.items()},
        "clusters": {n: _cluster(c) for n, c in config.clusters.items()},
        "route_tables": {n: [_route(r) for r in routes] for n, routes in config.route_tables.items()},
        "telemetry": _telemetry(config.telemetry),
    }
    if config.node.identity:
        doc["node"]["identity"] = config.node.identity
    if config.control is not None:
        c = config.control
        doc["control"] = {"server": c.server, "initial_fetch_timeout": format_duration(c.initial_fetch_timeout),
                          "backoff_max": format_duration(c.backoff_max)}
        if c.cache:
            doc["control"]["cache"] = c.cache
    if config.tls is not None:
        t = config.tls
        doc["tls"] = {"cert_chain": t.cert_chain, "private_key": t.private_key, "trust_bundle": t.trust_bundle,
                      "poll_interval": format_duration(t.poll_interval),
                      "handshake_timeout": format_duration(t.handshake_timeout)}
    return doc

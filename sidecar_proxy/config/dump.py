"""Config -> the document a user would write, with every default filled in.

``/config_dump`` shows this, so an operator sees the values actually in
force (idle timeouts, buffer limits), and ``load.build(to_document(c)) == c``
holds, so a dump can be edited and posted back.
"""
from __future__ import annotations

from .model import Cluster, Config, Listener
from ..addr import format_addr


def format_duration(seconds: float) -> str:
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        value = seconds / scale
        if value >= 1 and abs(value - round(value)) < 1e-9:
            return f"{round(value)}{unit}"
    return f"{round(seconds * 1e6)}us" if seconds < 1e-3 else f"{seconds:g}s"


def _listener(l: Listener) -> dict:
    return {"address": l.address, "port": l.port, "transparent": l.transparent,
            "interception": l.interception, "protocol": l.protocol,
            "routes": l.routes, "idle_timeout": format_duration(l.idle_timeout),
            "max_connections": l.max_connections, "buffer_limit": l.buffer_limit,
            "detection_timeout": format_duration(l.detection_timeout), "opaque_ports": sorted(l.opaque_ports)}


def _cluster(c: Cluster) -> dict:
    doc = {"original_destination": c.original_destination,
           "connect_timeout": format_duration(c.connect_timeout), "lb": c.lb}
    if c.endpoints:
        doc["endpoints"] = [{"address": format_addr((e.host, e.port)), "weight": e.weight} for e in c.endpoints]
    return doc


def to_document(config: Config) -> dict:
    doc = {
        "version": config.version,
        "node": {"id": config.node.id},
        "admin": {"address": config.admin.address, "port": config.admin.port},
        "listeners": {n: _listener(l) for n, l in config.listeners.items()},
        "clusters": {n: _cluster(c) for n, c in config.clusters.items()},
        "route_tables": {n: [{"match": {}, "cluster": r.cluster} for r in routes]
                         for n, routes in config.route_tables.items()},
    }
    if config.node.identity:
        doc["node"]["identity"] = config.node.identity
    if config.control is not None:
        c = config.control
        doc["control"] = {"server": c.server, "initial_fetch_timeout": format_duration(c.initial_fetch_timeout),
                          "backoff_max": format_duration(c.backoff_max)}
        if c.cache:
            doc["control"]["cache"] = c.cache
    return doc

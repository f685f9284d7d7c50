"""Text (YAML or JSON) -> validated :class:`~.model.Config`, or every error.

Validation never stops at the first problem: it walks the whole document and
collects ``(path, message)`` pairs such as
``clusters.payments.endpoints[1]: port must be 1..65535``, so an operator
fixes a config in one round. Nothing here raises anything but
:class:`ConfigError`.
"""
from __future__ import annotations

import difflib
import functools
import ipaddress
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml

from ..addr import split_host_port
from . import http_options, model, mtls, resilience, routes as route_tables, telemetry as telemetry_section
from .fields import (ConfigError, Errors, check_keys as _check_fields, describe, get, get_parsed, ip_check, join,
                     mapping_section, name_check, parse_duration, parse_size, port_check, positive)

MAX_DOCUMENT_BYTES = 4 << 20

# Keys of the schema that later releases serve. Naming them lets the
# validator say "not supported by this build yet" instead of "unknown key",
# and a config written for a newer proxy fails loudly instead of silently
# running without, say, tracing. (Those of routes are in routes.py.) Empty
# while every top-level section is served.
_PLANNED: dict[str, set[str]] = {}


def check_keys(err: Errors, path: str, doc: dict, allowed: set[str], kind: str) -> None:
    _check_fields(err, path, doc, allowed, _PLANNED.get(kind, frozenset()))


def _node(err: Errors, doc: Any) -> model.Node | None:
    if not isinstance(doc, dict):
        err.add("node", "is required (a mapping with at least 'id')" if doc is None else
                f"must be a mapping, got {describe(doc)}")
        return None
    check_keys(err, "node", doc, {"id", "identity"}, "node")
    node_id = get(err, "node", doc, "id", str, check=lambda v: None if v.strip() else "must not be empty")
    identity = get(err, "node", doc, "identity", str, default=None,
                    check=lambda v: None if v.startswith("spiffe://") else "must be a spiffe:// URI")
    return model.Node(node_id, identity) if node_id is not None else None


def _admin(err: Errors, doc: Any) -> model.Admin | None:
    if doc is None:
        return model.Admin()
    if not isinstance(doc, dict):
        err.add("admin", f"must be a mapping, got {describe(doc)}")
        return None
    check_keys(err, "admin", doc, {"address", "port"}, "admin")
    address = get(err, "admin", doc, "address", str, default="127.0.0.1", check=ip_check)
    port = get(err, "admin", doc, "port", int, default=15000, check=port_check)
    if address is None or port is None:
        return None
    return model.Admin(address, port)


_LISTENER_KEYS = {"address", "port", "transparent", "interception", "protocol", "routes", "idle_timeout",
                  "max_connections", "buffer_limit", "detection_timeout", "opaque_ports", "http", "tls"}


def _listener(err: Errors, name: str, doc: Any, has_identity: bool = False) -> model.Listener | None:
    """``has_identity``: the document has a top-level tls section, which an mTLS mode needs."""
    path = f"listeners.{name}"
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, _LISTENER_KEYS, "listener")
    address = get(err, path, doc, "address", str, check=ip_check)
    port = get(err, path, doc, "port", int, check=port_check)
    routes = get(err, path, doc, "routes", str)
    transparent = get(err, path, doc, "transparent", bool, default=False)
    interception = get(err, path, doc, "interception", str, default="redirect",
                        check=lambda v: None if v in model.INTERCEPTION_MODES else
                        f"'{v}' is not an interception mode (one of: {', '.join(model.INTERCEPTION_MODES)})")
    if interception == "tproxy" and transparent is False:
        err.add(join(path, "interception"), "tproxy needs transparent: true")

    def protocol_check(value: str) -> str | None:
        if value in model.PROTOCOLS_SUPPORTED:
            return None
        if value in model.PROTOCOLS_PLANNED:
            return f"'{value}' is not supported by this build yet (supported: {', '.join(model.PROTOCOLS_SUPPORTED)})"
        return f"'{value}' is not a protocol (one of: {', '.join(model.PROTOCOLS_SUPPORTED + model.PROTOCOLS_PLANNED)})"

    protocol = get(err, path, doc, "protocol", str, default="tcp", check=protocol_check)
    idle = get_parsed(err, path, doc, "idle_timeout", parse_duration, 3600.0, positive)
    detection = get_parsed(err, path, doc, "detection_timeout", parse_duration, 0.1,
                           lambda v: None if 0 < v <= 10 else "must be greater than 0 and at most 10s")
    opaque = _ports(err, join(path, "opaque_ports"), doc.get("opaque_ports", sorted(model.DEFAULT_OPAQUE_PORTS)))
    max_conn = get(err, path, doc, "max_connections", int, default=100_000,
                    check=lambda v: None if 1 <= v <= 10_000_000 else "must be 1..10000000")
    buffer_limit = get_parsed(err, path, doc, "buffer_limit", parse_size, 1 << 20,
                               lambda v: None if 4096 <= v <= (256 << 20) else "must be 4KiB..256MiB")
    if protocol == "tcp" and doc.get("http") is not None:
        err.add(join(path, "http"), "applies only to listeners with protocol auto or http")
    http = http_options.listener_http(err, join(path, "http"), doc.get("http"))
    tls = mtls.listener_tls(err, join(path, "tls"), doc.get("tls"), has_identity)
    if len(err.items) > before:
        return None
    return model.Listener(name=name, address=address, port=port, routes=routes,
                          transparent=transparent, interception=interception, protocol=protocol,
                          idle_timeout=idle, detection_timeout=detection, opaque_ports=opaque,
                          max_connections=max_conn, buffer_limit=buffer_limit, http=http, tls=tls)


def _ports(err: Errors, path: str, value: Any) -> frozenset[int] | None:
    if not isinstance(value, list):
        err.add(path, f"must be a list of ports, got {describe(value)}")
        return None
    ports = set()
    for i, port in enumerate(value):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            err.add(f"{path}[{i}]", f"port must be 1..65535, got {port!r}")
        else:
            ports.add(port)
    return frozenset(ports)


def _endpoint(err: Errors, path: str, doc: Any) -> model.Endpoint | None:
    weight = 1
    if isinstance(doc, dict):
        check_keys(err, path, doc, {"address", "weight"}, "endpoint")
        weight = get(err, path, doc, "weight", int, default=1,
                      check=lambda v: None if 1 <= v <= 1000 else "weight must be 1..1000")
        doc = doc.get("address")
        path = join(path, "address")
        if doc is None:
            err.add(path, "is required")
            return None
    if not isinstance(doc, str):
        err.add(path, f"must be 'host:port' or a mapping with 'address', got {describe(doc)}")
        return None
    try:
        host, port = split_host_port(doc)
    except ValueError as exc:
        err.add(path, str(exc))
        return None
    if weight is None:
        return None
    return model.Endpoint(host, port, weight)


_CLUSTER_KEYS = {"endpoints", "original_destination", "connect_timeout", "lb", "pool", "circuit_breakers",
                 "retry_budget", "outlier_detection", "tls"}


def _cluster(err: Errors, name: str, doc: Any, has_identity: bool = False) -> model.Cluster | None:
    """``has_identity``: the document has a top-level tls section, which mode mutual needs."""
    path = f"clusters.{name}"
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, path, doc, _CLUSTER_KEYS, "cluster")
    original = get(err, path, doc, "original_destination", bool, default=False)
    raw_endpoints = get(err, path, doc, "endpoints", list, default=[])
    endpoints = []
    for i, item in enumerate(raw_endpoints or ()):
        ep = _endpoint(err, f"{path}.endpoints[{i}]", item)
        if ep is not None:
            endpoints.append(ep)
    if original and raw_endpoints:
        err.add(join(path, "endpoints"), "must be empty when original_destination is true")
    elif original is False and raw_endpoints is not None and not raw_endpoints:
        err.add(path, "needs endpoints, or original_destination: true")
    timeout = get_parsed(err, path, doc, "connect_timeout", parse_duration, 5.0,
                          lambda v: None if 0 < v <= 300 else "must be greater than 0 and at most 300s")

    def lb_check(value: str) -> str | None:
        if value in model.LB_POLICIES_SUPPORTED:
            return None
        if value in model.LB_POLICIES_PLANNED:
            return f"'{value}' is not supported by this build yet (supported: {', '.join(model.LB_POLICIES_SUPPORTED)})"
        return f"'{value}' is not a load balancing policy (one of: {', '.join(model.LB_POLICIES_SUPPORTED)})"

    lb = get(err, path, doc, "lb", str, default="round_robin", check=lb_check)
    pool = http_options.cluster_pool(err, join(path, "pool"), doc.get("pool"))
    breakers = resilience.cluster_circuit_breakers(err, join(path, "circuit_breakers"), doc.get("circuit_breakers"))
    budget = resilience.cluster_retry_budget(err, join(path, "retry_budget"), doc.get("retry_budget"))
    outliers = resilience.cluster_outlier_detection(err, join(path, "outlier_detection"), doc.get("outlier_detection"))
    tls = mtls.cluster_tls(err, join(path, "tls"), doc.get("tls"), has_identity)
    if len(err.items) > before:
        return None
    return model.Cluster(name=name, endpoints=tuple(endpoints), original_destination=original,
                         connect_timeout=timeout, lb=lb, pool=pool, circuit_breakers=breakers, retry_budget=budget,
                         outlier_detection=outliers, tls=tls)


def _bind_conflicts(err: Errors, admin: model.Admin | None, listeners: dict[str, model.Listener],
                    telemetry: model.Telemetry | None = None) -> None:
    """Two sockets on one port conflict if their addresses overlap in one family."""
    binds = [("admin", admin.address, admin.port)] if admin is not None else []
    binds += [(f"listeners.{n}", l.address, l.port) for n, l in listeners.items()]
    if telemetry is not None and telemetry.metrics.enabled and telemetry.metrics.port:
        # Last, so a clash is reported on the scrape port rather than on the listener.
        binds.append(("telemetry.metrics", telemetry.metrics.address, telemetry.metrics.port))
    for i, (path_a, addr_a, port_a) in enumerate(binds):
        for path_b, addr_b, port_b in binds[:i]:
            if port_a != port_b:
                continue
            a, b = ipaddress.ip_address(addr_a), ipaddress.ip_address(addr_b)
            if a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified):
                err.add(f"{path_a}.port", f"{addr_a}:{port_a} overlaps {path_b} ({addr_b}:{port_b})")


_TOP_KEYS = {"version", "node", "admin", "listeners", "clusters", "route_tables", "control", "tls", "telemetry"}

# With a control section these may be absent: the server provides them.
_DYNAMIC_SECTIONS = ("listeners", "clusters", "route_tables")


def _control(err: Errors, doc: Any) -> model.Control | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add("control", f"must be a mapping, got {describe(doc)}")
        return None
    before = len(err.items)
    check_keys(err, "control", doc, {"server", "cache", "initial_fetch_timeout", "backoff_max"}, "control")
    server = get(err, "control", doc, "server", str)
    host = port = None
    if server is not None:
        parts = urlsplit(server)
        try:
            port = parts.port or 80
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/"):
            err.add("control.server", f"'{server}' is not http://host:port (https arrives with mTLS)")
        host = parts.hostname
    cache = get(err, "control", doc, "cache", str, default=None,
                 check=lambda v: None if v.startswith("/") else "must be an absolute path")
    initial = get_parsed(err, "control", doc, "initial_fetch_timeout", parse_duration, 10.0, positive)
    backoff = get_parsed(err, "control", doc, "backoff_max", parse_duration, 10.0, positive)
    if len(err.items) > before:
        return None
    return model.Control(server=server, host=host, port=port, cache=cache, initial_fetch_timeout=initial,
                         backoff_max=backoff)


def build(doc: Any) -> model.Config:
    """A parsed document -> Config. Raises ConfigError with every problem.

    With a ``control`` section the listeners, clusters and route tables in
    the document are the static part (all optional); the control client adds
    the server's resources to them and validates the whole again.
    """
    err = Errors()
    if not isinstance(doc, dict):
        raise ConfigError([("", f"the config must be a mapping at the top level, got {describe(doc)}")])
    check_keys(err, "", doc, _TOP_KEYS, "")
    control = _control(err, doc.get("control"))
    dynamic = "control" in doc
    if dynamic:
        doc = {**{section: {} for section in _DYNAMIC_SECTIONS}, **doc}
    get(err, "", doc, "version", int, check=lambda v: None if v == model.SCHEMA_VERSION else
         f"unsupported schema version {v} (this build reads version {model.SCHEMA_VERSION})")
    node = _node(err, doc.get("node"))
    admin = _admin(err, doc.get("admin"))
    tls = mtls.identity(err, doc.get("tls"))
    telemetry = telemetry_section.telemetry(err, doc.get("telemetry"))
    # Present, even if with errors of its own: those are reported there, not again at every user.
    has_identity = doc.get("tls") is not None

    def named(section: str, kind: str, parse: Callable) -> dict:
        out = {}
        for name, item in mapping_section(err, doc, section).items():
            problem = name_check(kind, name)
            if problem:
                err.add(f"{section}.{name}", problem)
                continue
            parsed = parse(err, name, item)
            if parsed is not None:
                out[name] = parsed
        return out

    raw_tables = doc.get("route_tables") if isinstance(doc.get("route_tables"), dict) else {}
    raw_clusters = doc.get("clusters") if isinstance(doc.get("clusters"), dict) else {}
    raw_listeners = doc.get("listeners") if isinstance(doc.get("listeners"), dict) else {}
    listeners = named("listeners", "listener", functools.partial(_listener, has_identity=has_identity))
    clusters = named("clusters", "cluster", functools.partial(_cluster, has_identity=has_identity))
    # Routes check their cluster names against the raw section: naming a
    # cluster that exists but has an error of its own is not an error too.
    tables = named("route_tables", "route table",
                   functools.partial(route_tables.route_table, cluster_names=frozenset(raw_clusters)))

    if isinstance(doc.get("listeners"), dict) and not raw_listeners and not dynamic:
        err.add("listeners", "must define at least one listener")
    # References are checked on the raw documents too, so a listener with an
    # error elsewhere still gets its dangling reference reported.
    for lname, raw in raw_listeners.items():
        table = raw.get("routes") if isinstance(raw, dict) else None
        if isinstance(table, str) and table not in raw_tables:
            hint = difflib.get_close_matches(table, list(raw_tables), n=1)
            err.add(f"listeners.{lname}.routes", f"no route table named '{table}'"
                    + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    route_tables.check_listener_tables(err, listeners, tables, clusters)
    _bind_conflicts(err, admin, listeners, telemetry)
    if err.items:
        raise ConfigError(err.items)
    return model.Config(node=node, admin=admin, listeners=MappingProxyType(listeners),
                        clusters=MappingProxyType(clusters), route_tables=MappingProxyType(tables),
                        control=control, tls=tls, telemetry=telemetry, source_document=MappingProxyType(doc))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML lets a repeated key silently win; in a proxy config that hides mistakes."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen[key] = 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def parse_text(text: str | bytes) -> Any:
    """YAML or JSON text -> a plain document. Raises ConfigError on syntax."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ConfigError([("", f"the config is larger than {MAX_DOCUMENT_BYTES} bytes")])
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([("", f"the config is not UTF-8: {exc.reason} at byte {exc.start}")]) from None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs)
        except ValueError as exc:
            raise ConfigError([("", f"invalid JSON: {exc}")]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([("", f"invalid YAML: {where}{problem}")]) from None


def load_text(text: str | bytes) -> model.Config:
    return build(parse_text(text))


def load_file(path: str | Path) -> model.Config:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror or exc}")]) from None
    return load_text(data)


def default_config_path() -> Path:
    return Path(__file__).with_name("default.yaml")

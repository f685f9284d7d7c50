"""Text (YAML or JSON) -> validated :class:`~.model.Config`, or every error.

Validation never stops at the first problem: it walks the whole document and
collects ``(path, message)`` pairs such as
``clusters.payments.endpoints[1]: port must be 1..65535``, so an operator
fixes a config in one round. Nothing here raises anything but
:class:`ConfigError`.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable
from urllib.parse import urlsplit

import yaml

from ..addr import split_host_port
from . import model

MAX_DOCUMENT_BYTES = 4 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
               "KB": 10**3, "MB": 10**6, "GB": 10**9}

# Keys of the schema that later releases serve. Naming them lets the
# validator say "not supported by this build yet" instead of "unknown key",
# and a config written for a newer proxy fails loudly instead of silently
# running without, say, mTLS.
_PLANNED = {
    "": {"tls", "telemetry"},
    "listener": {"opaque_ports", "tls"},
    "cluster": {"circuit_breakers", "outlier_detection", "tls"},
    "route": {"timeout", "retry", "rate_limit", "authorization", "weighted_clusters",
              "direct_response", "redirect", "request_headers", "response_headers",
              "host_rewrite"},
    "match": {"host", "path", "path_prefix", "path_regex", "method", "headers"},
}


class ConfigError(Exception):
    """All validation errors of one document, each with its path."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in errors))

    def as_json(self) -> list[dict[str, str]]:
        return [{"path": p, "error": m} for p, m in self.errors]


class _Errors:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


# --- leaf parsers: each returns the parsed value or None after adding an error


def parse_duration(value: Any) -> float:
    """'250ms' / '1.5s' / '2m' / '1h' / '100us' -> seconds. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"must be a duration string with a unit such as '250ms' or '1s', got {_describe(value)}")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"'{value}' is not a duration: use a number and one of us, ms, s, m, h (e.g. '250ms')")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any) -> int:
    """1048576 / '64KiB' / '1MiB' -> bytes. Raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"'{value}' is not a size: use bytes or a number with B, KiB, MiB, GiB")


def _check_keys(err: _Errors, path: str, doc: dict, allowed: set[str], planned_kind: str) -> None:
    planned = _PLANNED.get(planned_kind, set())
    for key in doc:
        if key in allowed:
            continue
        kpath = _join(path, str(key))
        if key in planned:
            err.add(kpath, "is part of the schema but not supported by this build yet")
            continue
        hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        err.add(kpath, "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else
                                          f"; allowed: {', '.join(sorted(allowed))}"))


def _get(err: _Errors, path: str, doc: dict, key: str, kind: type | tuple, default: Any = ...,
         check: Callable[[Any], str | None] | None = None) -> Any:
    """Fetch ``doc[key]`` of ``kind``; add an error and return None if wrong."""
    kpath = _join(path, key)
    if key not in doc or doc[key] is None:
        if default is ...:
            err.add(kpath, "is required")
            return None
        return default
    value = doc[key]
    # bool is an int subclass; a port of `true` is a mistake, not 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(_describe(k()) if k is not type(None) else "empty" for k in _as_tuple(kind))
        err.add(kpath, f"must be {names}, got {_describe(value)}")
        return None
    if check is not None:
        problem = check(value)
        if problem:
            err.add(kpath, problem)
            return None
    return value


def _as_tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _get_parsed(err: _Errors, path: str, doc: dict, key: str, parser: Callable[[Any], Any],
                default: Any, check: Callable[[Any], str | None] | None = None) -> Any:
    kpath = _join(path, key)
    if key not in doc or doc[key] is None:
        return default
    try:
        value = parser(doc[key])
    except ValueError as exc:
        err.add(kpath, str(exc))
        return None
    problem = check(value) if check else None
    if problem:
        err.add(kpath, problem)
        return None
    return value


def _port_check(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"port must be 1..65535, got {value}"


def _ip_check(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"'{value}' is not an IP address (listeners bind IP literals, e.g. 0.0.0.0 or ::)"
    return None


def _name_check(kind: str, name: Any) -> str | None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return (f"{kind} name '{name}' must be 1-63 characters of letters, digits, '_', '.', '-' "
                "starting with a letter or digit")
    return None


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than zero"


def _mapping_section(err: _Errors, doc: dict, key: str) -> dict:
    value = doc.get(key)
    if value is None:
        err.add(key, "is required")
        return {}
    if not isinstance(value, dict):
        err.add(key, f"must be a mapping of name to {key[:-1]}, got {_describe(value)}")
        return {}
    return value


# --- sections


def _node(err: _Errors, doc: Any) -> model.Node | None:
    if not isinstance(doc, dict):
        err.add("node", "is required (a mapping with at least 'id')" if doc is None else
                f"must be a mapping, got {_describe(doc)}")
        return None
    _check_keys(err, "node", doc, {"id", "identity"}, "node")
    node_id = _get(err, "node", doc, "id", str, check=lambda v: None if v.strip() else "must not be empty")
    identity = _get(err, "node", doc, "identity", str, default=None,
                    check=lambda v: None if v.startswith("spiffe://") else "must be a spiffe:// URI")
    return model.Node(node_id, identity) if node_id is not None else None


def _admin(err: _Errors, doc: Any) -> model.Admin | None:
    if doc is None:
        return model.Admin()
    if not isinstance(doc, dict):
        err.add("admin", f"must be a mapping, got {_describe(doc)}")
        return None
    _check_keys(err, "admin", doc, {"address", "port"}, "admin")
    address = _get(err, "admin", doc, "address", str, default="127.0.0.1", check=_ip_check)
    port = _get(err, "admin", doc, "port", int, default=15000, check=_port_check)
    if address is None or port is None:
        return None
    return model.Admin(address, port)


_LISTENER_KEYS = {"address", "port", "transparent", "interception", "protocol", "routes", "idle_timeout",
                  "max_connections", "buffer_limit"}


def _listener(err: _Errors, name: str, doc: Any) -> model.Listener | None:
    path = f"listeners.{name}"
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping, got {_describe(doc)}")
        return None
    before = len(err.items)
    _check_keys(err, path, doc, _LISTENER_KEYS, "listener")
    address = _get(err, path, doc, "address", str, check=_ip_check)
    port = _get(err, path, doc, "port", int, check=_port_check)
    routes = _get(err, path, doc, "routes", str)
    transparent = _get(err, path, doc, "transparent", bool, default=False)
    interception = _get(err, path, doc, "interception", str, default="redirect",
                        check=lambda v: None if v in model.INTERCEPTION_MODES else
                        f"'{v}' is not an interception mode (one of: {', '.join(model.INTERCEPTION_MODES)})")
    if interception == "tproxy" and transparent is False:
        err.add(_join(path, "interception"), "tproxy needs transparent: true")

    def protocol_check(value: str) -> str | None:
        if value in model.PROTOCOLS_SUPPORTED:
            return None
        if value in model.PROTOCOLS_PLANNED:
            return f"'{value}' is not supported by this build yet (supported: {', '.join(model.PROTOCOLS_SUPPORTED)})"
        return f"'{value}' is not a protocol (one of: {', '.join(model.PROTOCOLS_SUPPORTED + model.PROTOCOLS_PLANNED)})"

    protocol = _get(err, path, doc, "protocol", str, default="tcp", check=protocol_check)
    idle = _get_parsed(err, path, doc, "idle_timeout", parse_duration, 3600.0, _positive)
    max_conn = _get(err, path, doc, "max_connections", int, default=100_000,
                    check=lambda v: None if 1 <= v <= 10_000_000 else "must be 1..10000000")
    buffer_limit = _get_parsed(err, path, doc, "buffer_limit", parse_size, 1 << 20,
                               lambda v: None if 4096 <= v <= (256 << 20) else "must be 4KiB..256MiB")
    if len(err.items) > before:
        return None
    return model.Listener(name=name, address=address, port=port, routes=routes,
                          transparent=transparent, interception=interception, protocol=protocol,
                          idle_timeout=idle,
                          max_connections=max_conn, buffer_limit=buffer_limit)


def _endpoint(err: _Errors, path: str, doc: Any) -> model.Endpoint | None:
    weight = 1
    if isinstance(doc, dict):
        _check_keys(err, path, doc, {"address", "weight"}, "endpoint")
        weight = _get(err, path, doc, "weight", int, default=1,
                      check=lambda v: None if 1 <= v <= 1000 else "weight must be 1..1000")
        doc = doc.get("address")
        path = _join(path, "address")
        if doc is None:
            err.add(path, "is required")
            return None
    if not isinstance(doc, str):
        err.add(path, f"must be 'host:port' or a mapping with 'address', got {_describe(doc)}")
        return None
    try:
        host, port = split_host_port(doc)
    except ValueError as exc:
        err.add(path, str(exc))
        return None
    if weight is None:
        return None
    return model.Endpoint(host, port, weight)


_CLUSTER_KEYS = {"endpoints", "original_destination", "connect_timeout", "lb"}


def _cluster(err: _Errors, name: str, doc: Any) -> model.Cluster | None:
    path = f"clusters.{name}"
    if not isinstance(doc, dict):
        err.add(path, f"must be a mapping, got {_describe(doc)}")
        return None
    before = len(err.items)
    _check_keys(err, path, doc, _CLUSTER_KEYS, "cluster")
    original = _get(err, path, doc, "original_destination", bool, default=False)
    raw_endpoints = _get(err, path, doc, "endpoints", list, default=[])
    endpoints = []
    for i, item in enumerate(raw_endpoints or ()):
        ep = _endpoint(err, f"{path}.endpoints[{i}]", item)
        if ep is not None:
            endpoints.append(ep)
    if original and raw_endpoints:
        err.add(_join(path, "endpoints"), "must be empty when original_destination is true")
    elif original is False and raw_endpoints is not None and not raw_endpoints:
        err.add(path, "needs endpoints, or original_destination: true")
    timeout = _get_parsed(err, path, doc, "connect_timeout", parse_duration, 5.0,
                          lambda v: None if 0 < v <= 300 else "must be greater than 0 and at most 300s")

    def lb_check(value: str) -> str | None:
        if value in model.LB_POLICIES_SUPPORTED:
            return None
        if value in model.LB_POLICIES_PLANNED:
            return f"'{value}' is not supported by this build yet (supported: {', '.join(model.LB_POLICIES_SUPPORTED)})"
        return f"'{value}' is not a load balancing policy"

    lb = _get(err, path, doc, "lb", str, default="round_robin", check=lb_check)
    if len(err.items) > before:
        return None
    return model.Cluster(name=name, endpoints=tuple(endpoints), original_destination=original,
                         connect_timeout=timeout, lb=lb)


def _route_table(err: _Errors, name: str, doc: Any) -> tuple[model.Route, ...] | None:
    path = f"route_tables.{name}"
    if not isinstance(doc, list) or not doc:
        err.add(path, "must be a non-empty list of routes")
        return None
    routes = []
    for i, item in enumerate(doc):
        rpath = f"{path}[{i}]"
        if not isinstance(item, dict):
            err.add(rpath, f"must be a mapping with 'match' and 'cluster', got {_describe(item)}")
            continue
        _check_keys(err, rpath, item, {"match", "cluster"}, "route")
        match = _get(err, rpath, item, "match", dict)
        if match:
            _check_keys(err, f"{rpath}.match", match, set(), "match")
        cluster = _get(err, rpath, item, "cluster", str)
        if match is not None and cluster is not None:
            routes.append(model.Route(model.Match(), cluster))
    return tuple(routes)


def _bind_conflicts(err: _Errors, admin: model.Admin | None, listeners: dict[str, model.Listener]) -> None:
    """Two sockets on one port conflict if their addresses overlap in one family."""
    binds = [("admin", admin.address, admin.port)] if admin is not None else []
    binds += [(f"listeners.{n}", l.address, l.port) for n, l in listeners.items()]
    for i, (path_a, addr_a, port_a) in enumerate(binds):
        for path_b, addr_b, port_b in binds[:i]:
            if port_a != port_b:
                continue
            a, b = ipaddress.ip_address(addr_a), ipaddress.ip_address(addr_b)
            if a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified):
                err.add(f"{path_a}.port", f"{addr_a}:{port_a} overlaps {path_b} ({addr_b}:{port_b})")


# With a control section these may be absent: the server provides them.
_DYNAMIC_SECTIONS = ("listeners", "clusters", "route_tables")


def _control(err: _Errors, doc: Any) -> model.Control | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        err.add("control", f"must be a mapping, got {_describe(doc)}")
        return None
    before = len(err.items)
    _check_keys(err, "control", doc, {"server", "cache", "initial_fetch_timeout", "backoff_max"}, "control")
    server = _get(err, "control", doc, "server", str)
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
    cache = _get(err, "control", doc, "cache", str, default=None,
                 check=lambda v: None if v.startswith("/") else "must be an absolute path")
    initial = _get_parsed(err, "control", doc, "initial_fetch_timeout", parse_duration, 10.0, _positive)
    backoff = _get_parsed(err, "control", doc, "backoff_max", parse_duration, 10.0, _positive)
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
    err = _Errors()
    if not isinstance(doc, dict):
        raise ConfigError([("", f"the config must be a mapping at the top level, got {_describe(doc)}")])
    _check_keys(err, "", doc, {"version", "node", "admin", "listeners", "clusters", "route_tables", "control"}, "")
    control = _control(err, doc.get("control"))
    dynamic = "control" in doc
    if dynamic:
        doc = {**{section: {} for section in _DYNAMIC_SECTIONS}, **doc}
    _get(err, "", doc, "version", int, check=lambda v: None if v == model.SCHEMA_VERSION else
         f"unsupported schema version {v} (this build reads version {model.SCHEMA_VERSION})")
    node = _node(err, doc.get("node"))
    admin = _admin(err, doc.get("admin"))

    def named(section: str, kind: str, parse: Callable) -> dict:
        out = {}
        for name, item in _mapping_section(err, doc, section).items():
            problem = _name_check(kind, name)
            if problem:
                err.add(f"{section}.{name}", problem)
                continue
            parsed = parse(err, name, item)
            if parsed is not None:
                out[name] = parsed
        return out

    listeners = named("listeners", "listener", _listener)
    clusters = named("clusters", "cluster", _cluster)
    tables = named("route_tables", "route table", _route_table)
    raw_tables = doc.get("route_tables") if isinstance(doc.get("route_tables"), dict) else {}
    raw_clusters = doc.get("clusters") if isinstance(doc.get("clusters"), dict) else {}
    raw_listeners = doc.get("listeners") if isinstance(doc.get("listeners"), dict) else {}

    for tname, routes in tables.items():
        for i, route in enumerate(routes):
            if route.cluster not in raw_clusters:
                hint = difflib.get_close_matches(route.cluster, list(raw_clusters), n=1)
                err.add(f"route_tables.{tname}[{i}].cluster", f"no cluster named '{route.cluster}'"
                        + (f" (did you mean '{hint[0]}'?)" if hint else ""))
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
    for lname, listener in listeners.items():
        rpath = f"listeners.{lname}.routes"
        routes = tables.get(listener.routes)
        if routes is None:
            continue
        catch_all = next((r for r in routes if r.match.is_catch_all), None)
        if catch_all is None:
            err.add(rpath, f"route table '{listener.routes}' has no catch-all route (match: {{}}), "
                           "which a tcp listener needs")
            continue
        cluster = clusters.get(catch_all.cluster)
        if cluster is not None and cluster.original_destination and not listener.transparent:
            err.add(rpath, f"sends to original_destination cluster '{cluster.name}', "
                           "but the listener is not transparent, so there is no original destination")
    _bind_conflicts(err, admin, listeners)
    if err.items:
        raise ConfigError(err.items)
    return model.Config(node=node, admin=admin, listeners=MappingProxyType(listeners),
                        clusters=MappingProxyType(clusters), route_tables=MappingProxyType(tables),
                        control=control, source_document=MappingProxyType(doc))


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

"""The discovery protocol shared by the control client and the control server.

The envelope is Envoy's REST-JSON xDS: ``POST /v3/discovery:<type>`` with a
DiscoveryRequest (``version_info``, ``node``, ``resource_names``,
``type_url``, ``response_nonce``, ``error_detail``) answered by a
DiscoveryResponse (``version_info``, ``resources``, ``type_url``,
``nonce``). ACK and NACK ride on the next request: the version it now
runs and the nonce it answers, plus ``error_detail`` on a NACK. A request
whose client has already seen the server's current version (its
``version_info`` on an ACK; the version of the nonce it answers on a NACK,
so a rejected version is not sent again) is held (long-poll) until that
changes or the wait is over, then answered 304 Not Modified.

The resources are this proxy's own config sections, one named object each,
not Envoy's protobuf types: the envelope is compatible, the payload is not.
"""
from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any

TYPE_PREFIX = "type.sidecar-proxy.dev/"

# Path suffix -> (type URL, config section, the key naming a resource).
LISTENERS = "listeners"
ROUTES = "routes"
CLUSTERS = "clusters"
ENDPOINTS = "endpoints"
TYPES = (LISTENERS, ROUTES, CLUSTERS, ENDPOINTS)
TYPE_URLS = {t: f"{TYPE_PREFIX}{t}" for t in TYPES}
_NAME_KEY = {LISTENERS: "name", ROUTES: "name", CLUSTERS: "name", ENDPOINTS: "cluster_name"}

DISCOVERY_PATH = "/v3/discovery:{}"
# gRPC's INVALID_ARGUMENT, which Envoy puts in error_detail.code on a NACK.
INVALID_ARGUMENT = 3


class ProtocolError(Exception):
    """A message that does not follow the protocol; the message says how."""


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def type_from_path(path: str) -> str | None:
    prefix = DISCOVERY_PATH.format("")
    if not path.startswith(prefix):
        return None
    kind = path[len(prefix):]
    return kind if kind in TYPES else None


def new_nonce() -> str:
    return uuid.uuid4().hex[:16]


# --- requests and responses ----------------------------------------------------------------


@dataclass
class DiscoveryRequest:
    type: str
    node_id: str
    version_info: str = ""
    response_nonce: str = ""
    error: str | None = None  # set on a NACK

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"version_info": self.version_info, "node": {"id": self.node_id},
                               "resource_names": [], "type_url": TYPE_URLS[self.type],
                               "response_nonce": self.response_nonce}
        if self.error is not None:
            doc["error_detail"] = {"code": INVALID_ARGUMENT, "message": self.error}
        return doc

    @classmethod
    def from_json(cls, kind: str, doc: Any) -> DiscoveryRequest:
        if not isinstance(doc, dict):
            raise ProtocolError("a DiscoveryRequest is a JSON object")
        node = doc.get("node")
        node_id = node.get("id") if isinstance(node, dict) else None
        if not isinstance(node_id, str) or not node_id:
            raise ProtocolError("node.id is required")
        type_url = doc.get("type_url", TYPE_URLS[kind])
        if type_url != TYPE_URLS[kind]:
            raise ProtocolError(f"type_url {type_url!r} does not match the path ({TYPE_URLS[kind]!r})")
        detail = doc.get("error_detail")
        error = None
        if isinstance(detail, dict):
            error = str(detail.get("message", ""))
        return cls(kind, node_id, _text(doc.get("version_info")), _text(doc.get("response_nonce")), error)

    @property
    def is_nack(self) -> bool:
        return self.error is not None


@dataclass
class DiscoveryResponse:
    type: str
    version_info: str
    resources: list[dict] = field(default_factory=list)
    nonce: str = field(default_factory=new_nonce)

    def to_json(self) -> dict:
        return {"version_info": self.version_info, "type_url": TYPE_URLS[self.type], "nonce": self.nonce,
                "resources": [{**r, "@type": TYPE_URLS[self.type]} for r in self.resources]}

    @classmethod
    def from_json(cls, kind: str, doc: Any) -> DiscoveryResponse:
        if not isinstance(doc, dict):
            raise ProtocolError("a DiscoveryResponse is a JSON object")
        if doc.get("type_url") != TYPE_URLS[kind]:
            raise ProtocolError(f"type_url {doc.get('type_url')!r} is not {TYPE_URLS[kind]!r}")
        version, nonce, resources = doc.get("version_info"), doc.get("nonce"), doc.get("resources", [])
        if not isinstance(version, str) or not version:
            raise ProtocolError("version_info must be a non-empty string")
        if not isinstance(nonce, str) or not isinstance(resources, list):
            raise ProtocolError("nonce must be a string and resources a list")
        plain = []
        for i, resource in enumerate(resources):
            if not isinstance(resource, dict):
                raise ProtocolError(f"resources[{i}] is not an object")
            if resource.get("@type", TYPE_URLS[kind]) != TYPE_URLS[kind]:
                raise ProtocolError(f"resources[{i}] has @type {resource.get('@type')!r}")
            plain.append({k: v for k, v in resource.items() if k != "@type"})
        return cls(kind, version, plain, nonce)


# --- resources <-> the config document --------------------------------------------------------


def resource_name(kind: str, resource: dict) -> str:
    return str(resource.get(_NAME_KEY[kind], ""))


def merge(base: dict, resources: dict[str, list[dict]]) -> tuple[dict, list[tuple[str, str]]]:
    """The config document: the bootstrap ``base`` plus the resources of each type.

    ``base`` may hold static listeners, route tables and clusters of its own;
    a resource may not reuse one of their names. Returns the document and
    the problems that are about the resources as such (no name, a name
    twice); everything else is left to the config validator, whose errors
    name the document path.
    """
    doc = copy.deepcopy(base)
    problems: list[tuple[str, str]] = []
    sections = {LISTENERS: "listeners", ROUTES: "route_tables", CLUSTERS: "clusters"}
    for kind, section in sections.items():
        static = doc.get(section) if isinstance(doc.get(section), dict) else {}
        doc[section] = dict(static)
        for i, resource in enumerate(resources.get(kind, [])):
            name = resource_name(kind, resource)
            body = {k: v for k, v in resource.items() if k != _NAME_KEY[kind]}
            if not name:
                problems.append((f"{kind}[{i}]", f"has no '{_NAME_KEY[kind]}'"))
            elif name in static:
                problems.append((f"{kind}[{i}]", f"'{name}' is also defined statically in the bootstrap file"))
            elif name in doc[section]:
                problems.append((f"{kind}[{i}]", f"a second resource named '{name}'"))
            else:
                doc[section][name] = body.get("routes") if kind == ROUTES else body
    for i, resource in enumerate(resources.get(ENDPOINTS, [])):
        name = resource_name(ENDPOINTS, resource)
        cluster = doc["clusters"].get(name)
        if not isinstance(cluster, dict):
            problems.append((f"endpoints[{i}]", f"no cluster named '{name}' for these endpoints"))
        else:
            cluster["endpoints"] = resource.get("endpoints", [])
    return doc, problems


def split(doc: dict) -> dict[str, list[dict]]:
    """The inverse of :func:`merge` for one config document (the control server's files)."""
    return {
        LISTENERS: [{"name": n, **body} for n, body in doc.get("listeners", {}).items()],
        ROUTES: [{"name": n, "routes": routes} for n, routes in doc.get("route_tables", {}).items()],
        CLUSTERS: [{"name": n, **{k: v for k, v in body.items() if k != "endpoints"}}
                   for n, body in doc.get("clusters", {}).items()],
        ENDPOINTS: [{"cluster_name": n, "endpoints": body["endpoints"]}
                    for n, body in doc.get("clusters", {}).items() if "endpoints" in body],
    }

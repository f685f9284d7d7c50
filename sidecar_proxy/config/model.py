"""The validated configuration: frozen objects only ``load.py`` builds.

Every object here is immutable, so a snapshot can be shared by every
connection accepted under it without copying or locking. Durations are float
seconds; sizes are int bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

SCHEMA_VERSION = 1

# Protocols a listener may declare. Only "tcp" is served by this build; the
# others are part of the schema so the validator can say so by name.
PROTOCOLS_SUPPORTED = ("tcp", "auto")
PROTOCOLS_PLANNED = ("http",)

# Destination ports where the server speaks first (SMTP, MySQL, PostgreSQL,
# Redis, memcached, ...): an "auto" listener relays them at once instead of
# waiting detection_timeout for a first client byte that never comes.
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})

INTERCEPTION_MODES = ("redirect", "tproxy")

LB_POLICIES_SUPPORTED = ("round_robin",)
LB_POLICIES_PLANNED = ("least_request", "random")


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Admin:
    address: str = "127.0.0.1"
    port: int = 15000


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    address: str
    port: int
    routes: str
    transparent: bool = False
    # How a transparent listener receives connections: "redirect" (nat
    # REDIRECT; destination from SO_ORIGINAL_DST) or "tproxy" (mangle
    # TPROXY; the socket is IP_TRANSPARENT and the destination is the
    # accepted socket's own local address).
    interception: str = "redirect"
    protocol: str = "tcp"
    # protocol "auto": how long to wait for the client's first bytes before
    # treating the connection as opaque TCP, and the ports never sniffed.
    detection_timeout: float = 0.1
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    # A connection with no byte either way for this long is closed.
    idle_timeout: float = 3600.0
    # Accepted connections beyond this are closed at once (counted).
    max_connections: int = 100_000
    # Per direction: reading from the sender pauses when this many bytes are
    # waiting to be written to the receiver, and resumes at a quarter of it.
    buffer_limit: int = 1 << 20

    @property
    def bind_key(self) -> tuple:
        """What the listening socket depends on; a change means a rebind.

        Not ``transparent`` (it only changes how we read the destination) nor
        ``interception`` (IP_TRANSPARENT is a flag set on the live socket).
        """
        return (self.address, self.port)

    @property
    def tproxy(self) -> bool:
        return self.transparent and self.interception == "tproxy"


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...] = ()
    original_destination: bool = False
    connect_timeout: float = 5.0
    lb: str = "round_robin"


@dataclass(frozen=True, slots=True)
class Match:
    """An empty match (the only kind this build serves) matches everything."""

    @property
    def is_catch_all(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Route:
    match: Match
    cluster: str


@dataclass(frozen=True, slots=True)
class Control:
    """Where listeners, route tables, clusters and endpoints come from instead of the file."""

    server: str  # http://host:port
    host: str
    port: int
    # The last good config from the server, used at start while it is unreachable.
    cache: str | None = None
    # How long startup waits for the server before falling back to the cache.
    initial_fetch_timeout: float = 10.0
    # Reconnect delays grow exponentially (with full jitter) up to this.
    backoff_max: float = 10.0


@dataclass(frozen=True, slots=True)
class Config:
    node: Node
    admin: Admin
    listeners: Mapping[str, Listener]
    clusters: Mapping[str, Cluster]
    route_tables: Mapping[str, tuple[Route, ...]]
    version: int = SCHEMA_VERSION
    control: Control | None = None
    # The document as the user wrote it (after parsing), for /config_dump.
    source_document: Mapping = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def catch_all_cluster(self, table: str) -> Cluster:
        """The cluster of a table's first catch-all route (validated to exist)."""
        for route in self.route_tables[table]:
            if route.match.is_catch_all:
                return self.clusters[route.cluster]
        raise KeyError(table)  # load.py rejects a table without one

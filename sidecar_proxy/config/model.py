"""The validated configuration: frozen objects only ``load.py`` builds.

Every object here is immutable, so a snapshot can be shared by every
connection accepted under it without copying or locking. Durations are float
seconds; sizes are int bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..protocols.events import Limits

SCHEMA_VERSION = 1

# Protocols a listener may declare. Planned ones would be part of the schema
# so the validator can say "not supported by this build yet" by name.
PROTOCOLS_SUPPORTED = ("tcp", "auto", "http")
PROTOCOLS_PLANNED: tuple[str, ...] = ()

# listener http.codec: "auto" picks the fastest installed one at run time.
HTTP1_CODEC_AUTO = "auto"

# Destination ports where the server speaks first (SMTP, MySQL, PostgreSQL,
# Redis, memcached, ...): an "auto" listener relays them at once instead of
# waiting detection_timeout for a first client byte that never comes.
DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})

INTERCEPTION_MODES = ("redirect", "tproxy")

# Seconds from a request's end to its response head, then 504: a route's
# `timeout` default, and what requests that matched no route get.
DEFAULT_ROUTE_TIMEOUT = 15.0

LB_POLICIES_SUPPORTED = ("round_robin", "least_request", "random")
LB_POLICIES_PLANNED: tuple[str, ...] = ()

# Outcomes a route's retry may name in `on` (status codes go in `statuses`).
RETRY_CONDITIONS = ("connect-failure", "refused-stream", "reset", "5xx", "gateway-error")

# listeners.X.tls.mode: plaintext only; mTLS and plaintext side by side (while
# clients migrate); mTLS only. clusters.X.tls.mode: plaintext, or mTLS.
TLS_LISTENER_MODES = ("disable", "permissive", "strict")
TLS_CLUSTER_MODES = ("disable", "mutual")


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Admin:
    address: str = "127.0.0.1"
    port: int = 15000


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """The workload's certificate (top-level ``tls``), which mTLS listeners and clusters present.

    Paths rather than PEM in the config: SPIRE, cert-manager's CSI driver and
    secret volumes rotate the files in place, so they are checked every
    ``poll_interval`` and a new certificate is used without a reload.
    """

    cert_chain: str     # absolute path: the leaf certificate, then its intermediates (PEM)
    private_key: str    # absolute path (PEM)
    trust_bundle: str   # absolute path: the CAs a peer's certificate must chain to (PEM)
    poll_interval: float = 1.0
    # Inbound and outbound: a peer that stalls mid-handshake holds a connection for at most this.
    handshake_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class ListenerTls:
    mode: str = "disable"   # one of TLS_LISTENER_MODES


@dataclass(frozen=True, slots=True)
class ClusterTls:
    """How the proxy connects to a cluster's endpoints.

    With ``mutual`` the server must present a SPIFFE ID matching
    ``peer_identity`` (never empty then): chaining to the trust bundle alone
    would accept any workload of the trust domain.
    """

    mode: str = "disable"                 # one of TLS_CLUSTER_MODES
    peer_identity: tuple[str, ...] = ()   # SPIFFE IDs or patterns (tls.spiffe.check_pattern)
    sni: str | None = None                # server_name sent (lower-case DNS name), None: none


@dataclass(frozen=True, slots=True)
class Authorization:
    """The clients a route serves: SPIFFE IDs or patterns (tls.spiffe) their certificate must match.

    Never empty: an empty list would refuse every client, more likely a
    mistake than the intent (a direct_response 403 says that plainly).
    """

    allow_identities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """HTTP/1.1 settings of a listener with protocol "auto" or "http"."""

    # "auto" | one of protocols.http1.CODECS; whether it is installed is
    # checked when the listener starts, not by the validator.
    codec: str = HTTP1_CODEC_AUTO
    max_request_header_bytes: int = 60 * 1024   # request line + fields (431)
    max_request_headers: int = 100              # fields in the head (431)
    max_uri_length: int = 8 * 1024              # request target (414)
    # From the connection's first byte (or the end of the previous response)
    # to the end of the request head; then 408. Bounds slowloris clients.
    request_header_timeout: float = 10.0
    x_forwarded_for: bool = True     # append the peer's address
    x_forwarded_proto: bool = True   # set the scheme the client used
    request_id: bool = True          # generate x-request-id when the request has none

    @property
    def limits(self) -> Limits:
        return Limits(max_header_bytes=self.max_request_header_bytes, max_header_count=self.max_request_headers,
                      max_uri_bytes=self.max_uri_length)


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
    # Used by "auto" (for what it detects as HTTP/1) and "http" listeners; a
    # "tcp" listener always has the defaults (the validator refuses the key).
    http: HttpOptions = HttpOptions()
    tls: ListenerTls = ListenerTls()

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
class PoolOptions:
    """Idle upstream HTTP/1.1 connections kept for reuse, per endpoint."""

    # 0 disables reuse: one connection per request. The default is high on
    # purpose: with fewer idle slots than concurrent requests the pool closes
    # connections it needs a moment later (measured: 64 concurrent clients
    # over 32 slots opened 100 connections a second and cost 3x the CPU).
    max_idle_per_endpoint: int = 1024
    # Just under Node.js's 5 s keep-alive timeout, the shortest default among
    # common servers: the pool closes an idle connection before the server
    # does, so a request is not sent on a connection the server is closing
    # (a race that loses the request or forces a retry).
    idle_timeout: float = 4.0


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Caps on what a cluster has in flight; beyond one, the request fails fast instead of queueing.

    Envoy's defaults, except max_retries: the retry budget is what bounds
    retries by default, this only a hard ceiling over it.
    """

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 1024


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Concurrent retries allowed as ``percent`` of the cluster's active requests, at least ``min_retries``.

    Scales with load, unlike a fixed cap, so a failing upstream cannot be
    hit with attempts-times its traffic (a retry storm).
    """

    percent: float = 20.0
    min_retries: int = 3   # lets a quiet cluster retry at all


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Eject an endpoint after consecutive failures (passive health checking).

    An ejection lasts base_ejection_time times the endpoint's number of
    ejections, at most max_ejection_time; at most max_ejection_percent of the
    endpoints are out at once.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5   # 502, 503, 504 and connect failures
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    endpoints: tuple[Endpoint, ...] = ()
    original_destination: bool = False
    connect_timeout: float = 5.0
    lb: str = "round_robin"
    pool: PoolOptions = PoolOptions()
    circuit_breakers: CircuitBreakers = CircuitBreakers()
    retry_budget: RetryBudget = RetryBudget()
    outlier_detection: OutlierDetection | None = None   # None: disabled
    tls: ClusterTls = ClusterTls()


# Where transparent traffic that no route claims goes: the connection's
# original destination. Not in Config.clusters; a route never names it.
PASSTHROUGH = Cluster(name="passthrough", original_destination=True)

HEADER_MATCH_KINDS = ("exact", "prefix", "regex", "present")


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str            # lower-case
    kind: str            # one of HEADER_MATCH_KINDS
    value: str = ""      # "" for "present"
    # True: the request matches when NO field of this name matches (for
    # "present": when the field is absent).
    invert: bool = False


@dataclass(frozen=True, slots=True)
class Match:
    """All given conditions must hold; an empty match matches everything.

    ``host`` holds lower-case patterns: exact names or ``*.suffix``, either
    with ``:port`` (then the whole authority must match) or without (any
    port). At most one of path / path_prefix / path_regex is set.
    """

    host: tuple[str, ...] = ()
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None   # re, must match the whole path (fullmatch, like Envoy)
    method: tuple[str, ...] = ()    # case-sensitive, as HTTP methods are
    headers: tuple[HeaderMatch, ...] = ()
    # The client's SPIFFE ID (mTLS) matches one of these patterns; a client without one never matches.
    peer_identity: tuple[str, ...] = ()

    @property
    def is_catch_all(self) -> bool:
        return not (self.host or self.path is not None or self.path_prefix is not None
                    or self.path_regex is not None or self.method or self.headers or self.peer_identity)


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: str = ""
    content_type: str = "text/plain"


REDIRECT_STATUSES = (301, 302, 303, 307, 308)


@dataclass(frozen=True, slots=True)
class Redirect:
    """The request's URL with the given parts replaced (at least one is given)."""

    status: int = 301
    scheme: str | None = None   # lower-case
    host: str | None = None     # without port
    port: int | None = None
    path: str | None = None
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class HeaderRewrite:
    """Names are lower-case HTTP tokens; a name appears in at most one of the three."""

    add: tuple[tuple[str, str], ...] = ()   # appended
    set: tuple[tuple[str, str], ...] = ()   # replaces every field of that name
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.set or self.remove)


# Route actions; exactly one is set on a Route.
ACTIONS = ("cluster", "weighted_clusters", "direct_response", "redirect")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A local token bucket on a route: ``requests_per_second`` refill, ``burst`` capacity.

    ``key``: None (one bucket for the route), ``client_ip`` (one per client
    address), ``peer_identity`` (one per client SPIFFE ID) or
    ``header:<name>`` (one per value of that request field). Requests without
    the key (no field, no client certificate) share one bucket. Keyed
    buckets live in a table of at most ``max_keys`` (least recently used
    evicted). ``shadow`` counts what would be refused but refuses nothing.
    """

    requests_per_second: float
    burst: int
    key: str | None = None
    shadow: bool = False
    max_keys: int = 10_000


@dataclass(frozen=True, slots=True)
class Retry:
    """When and how a forwarding route tries again.

    ``attempts`` counts every try, the first included, so 1 means never
    retry. A request body is replayed only if it fit in ``buffer_limit``;
    without ``retry_non_idempotent`` a POST, PATCH or unknown method is
    retried only when none of its bytes reached the upstream (it cannot have
    had an effect there).
    """

    on: tuple[str, ...] = ("connect-failure", "refused-stream", "reset")   # of RETRY_CONDITIONS
    statuses: tuple[int, ...] = ()       # response codes retried besides those `on` implies
    attempts: int = 2
    per_try_timeout: float = 0.0         # 0: only the route timeout bounds the tries
    # Full-jitter exponential backoff between tries, capped; YAML backoff: {base, cap}.
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    # An upstream's Retry-After is honoured up to this, so it cannot park a request.
    max_retry_after: float = 1.0
    buffer_limit: int = 65536
    retry_non_idempotent: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    match: Match
    cluster: str | None = None
    weighted_clusters: tuple[WeightedCluster, ...] = ()
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None
    # For logs and metrics; the loader fills in "{table}[{index}]" when absent.
    name: str = ""
    request_headers: HeaderRewrite = HeaderRewrite()
    response_headers: HeaderRewrite = HeaderRewrite()
    host_rewrite: str | None = None   # host[:port] sent upstream instead of the request's
    # Upstream response timeout (to the response head), then 504; 0 = none.
    timeout: float = DEFAULT_ROUTE_TIMEOUT
    rate_limit: RateLimit | None = None
    retry: Retry | None = None   # None: one try
    authorization: Authorization | None = None   # None: every client

    @property
    def action(self) -> str:
        """One of ACTIONS."""
        if self.cluster is not None:
            return "cluster"
        if self.weighted_clusters:
            return "weighted_clusters"
        if self.direct_response is not None:
            return "direct_response"
        return "redirect"

    @property
    def clusters(self) -> tuple[str, ...]:
        """The names of the clusters this route may send to."""
        if self.cluster is not None:
            return (self.cluster,)
        return tuple(w.cluster for w in self.weighted_clusters)

    @property
    def forwards(self) -> bool:
        """True when the route sends to a cluster (so it can carry TCP too)."""
        return self.cluster is not None or bool(self.weighted_clusters)


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


ACCESS_LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class MetricsOptions:
    """``telemetry.metrics``: the per-request histograms and the dedicated scrape listener.

    The admin endpoint's /metrics serves whatever the switches say; ``port``
    is a second, plain listener for Prometheus on the pod's address, so a
    scraper need not reach the admin endpoint (kept on loopback).
    """

    enabled: bool = True        # false: no per-request histograms and no scrape listener
    port: int = 15090           # 0: no dedicated scrape listener
    address: str = "0.0.0.0"


@dataclass(frozen=True, slots=True)
class AccessLogOptions:
    """``telemetry.access_log``: one line per HTTP request on stdout."""

    enabled: bool = True
    format: str = "text"        # one of ACCESS_LOG_FORMATS


@dataclass(frozen=True, slots=True)
class TracingOptions:
    """``telemetry.tracing``: OpenTelemetry spans exported over OTLP/HTTP.

    Every key but ``enabled`` may be left out (None): the standard OTEL_*
    environment variable then decides, else the default in brackets. A key
    given here wins over the environment. (telemetry.tracing.resolve does it.)
    """

    enabled: bool = False
    # Ratio 0..1 of new traces sampled, parent-based (an incoming traceparent's
    # decision is followed). [OTEL_TRACES_SAMPLER/_ARG, else 0.01]
    sampling: float | None = None
    # OTLP/HTTP traces URL. [OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces,
    # else http://localhost:4318/v1/traces]
    endpoint: str | None = None
    # Finished spans held for export; beyond it spans are dropped and counted. [OTEL_BSP_MAX_QUEUE_SIZE, else 2048]
    max_queue_size: int | None = None
    service_name: str | None = None   # [OTEL_SERVICE_NAME, service.name in OTEL_RESOURCE_ATTRIBUTES, "sidecar-proxy"]


@dataclass(frozen=True, slots=True)
class Telemetry:
    metrics: MetricsOptions = MetricsOptions()
    access_log: AccessLogOptions = AccessLogOptions()
    tracing: TracingOptions = TracingOptions()


@dataclass(frozen=True, slots=True)
class Config:
    node: Node
    admin: Admin
    listeners: Mapping[str, Listener]
    clusters: Mapping[str, Cluster]
    route_tables: Mapping[str, tuple[Route, ...]]
    version: int = SCHEMA_VERSION
    control: Control | None = None
    tls: TlsIdentity | None = None   # None: no listener or cluster may use mTLS
    telemetry: Telemetry = Telemetry()
    # The document as the user wrote it (after parsing), for /config_dump.
    source_document: Mapping = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def tcp_route(self, listener: str) -> Route | None:
        """The route for a listener's non-HTTP connections, or None.

        It is the first catch-all route that sends to a cluster (a
        direct_response or redirect cannot answer TCP). None means: the
        connection goes to its original destination on a transparent
        listener, and is refused on an "http" listener. The validator makes
        sure "tcp" listeners, and non-transparent "auto" ones, have one.
        """
        for route in self.route_tables[self.listeners[listener].routes]:
            if route.forwards and route.match.is_catch_all:
                return route
        return None

    def catch_all_cluster(self, table: str) -> Cluster | None:
        """Deprecated: use :meth:`tcp_route` (this stays until the TCP relay moves to it).

        The cluster of the table's TCP route (see tcp_route). None when that
        route has weighted_clusters (one cluster per connection must be
        picked by weight; tcp_route gives the route). PASSTHROUGH when the
        table has no TCP route, which the validator only allows for
        transparent "auto" listeners and "http" listeners.
        """
        for route in self.route_tables[table]:
            if route.forwards and route.match.is_catch_all:
                return self.clusters[route.cluster] if route.cluster is not None else None
        return PASSTHROUGH

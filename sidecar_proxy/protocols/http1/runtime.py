"""What every HTTP session of one listener under one snapshot shares.

Built once per snapshot (with the listener's ``ListenerRuntime``), so a
request does no config lookups: the route table is compiled, endpoint
pickers and metric children are bound, the codec is resolved.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from ...config.model import DEFAULT_ROUTE_TIMEOUT, PASSTHROUGH, Cluster, Config, Listener
from ...logs import Throttle
from ...policies.rate_limit import RateLimiters
from ...routing.table import RouteTable
from ...upstream.cluster import ClusterStates, Upstream
from ...upstream.pool import Pool, PoolManager
from . import resolve_codec
# The module, not its names: compiled, exchange and this module import each
# other's types first (compiled.pxd_text), so exchange may not have run yet.
from . import exchange
from .serialize import HOP_BY_HOP, field_lines

if TYPE_CHECKING:
    from .exchange import RequestIds
    from ...transport.listeners import ListenerState


class RouteEdits:
    __slots__ = ("request_drop", "request_lines", "response_drop", "response_lines", "request_drop_traced")

    def __init__(self, request_drop: frozenset[bytes], request_lines: bytes, response_drop: frozenset[bytes],
                 response_lines: bytes, trace_fields: frozenset[bytes] = frozenset()) -> None:
        self.request_drop = request_drop
        # ... and the client's trace context fields, for a request the proxy injects its own into.
        self.request_drop_traced = request_drop | trace_fields
        self.request_lines = request_lines
        self.response_drop = response_drop
        self.response_lines = response_lines


class HttpRuntime:
    __slots__ = ("name", "loop", "state", "codec", "limits", "table", "clusters", "upstreams", "passthrough",
                 "own_ports", "pools", "buffer_limit", "header_timeout", "default_timeout", "add_xff", "add_xfp",
                 "add_request_id", "request_ids", "log_throttle", "connect_seconds", "connect_failures", "_pool_cache",
                 "edits", "rate_limits", "mesh", "tracing", "access_log", "recorders", "timing", "epoch")
    # Typed C fields when compiled (compiled.pxd_text): reached without a lookup.
    table: RouteTable
    request_ids: RequestIds
    passthrough: Upstream

    def __init__(self, listener: Listener, config: Config, state: ListenerState, loop: asyncio.AbstractEventLoop,
                 own_ports: frozenset[int], pools: PoolManager, log_throttle: Throttle, request_ids: RequestIds,
                 connect_seconds: Callable[[str], object], connect_failures: Callable[[str, str], None],
                 rate_limiters: RateLimiters, cluster_states: ClusterStates, mesh=None, telemetry=None,
                 codec_override: str | None = None) -> None:
        opts = listener.http
        self.name = listener.name
        self.mesh = mesh  # tls.mesh.MeshTls: originating mTLS to clusters with tls.mode mutual
        # Telemetry (telemetry.pipeline.TelemetryView); each part None when off, so it costs nothing.
        self.tracing = telemetry.tracing if telemetry is not None else None
        self.access_log = telemetry.access_log if telemetry is not None else None
        self.recorders = telemetry.recorders if telemetry is not None else None
        self.timing = telemetry.timing if telemetry is not None else False
        self.epoch = telemetry.epoch if telemetry is not None else 0.0
        self.loop = loop
        self.state = state
        self.codec = resolve_codec(codec_override or opts.codec)
        self.limits = opts.limits
        self.table = RouteTable(listener.routes, config.route_tables[listener.routes])
        self.clusters: dict[str, Cluster] = dict(config.clusters)
        # Each cluster's picker (this snapshot's endpoints) and shared state (breakers, budget, outliers).
        self.upstreams: dict[str, Upstream] = {name: Upstream(c, cluster_states.get(c), pools)
                                               for name, c in config.clusters.items()}
        self.passthrough = Upstream(PASSTHROUGH, cluster_states.get(PASSTHROUGH))
        self.own_ports = own_ports
        self.pools = pools
        self.buffer_limit = listener.buffer_limit
        self.header_timeout = opts.request_header_timeout
        self.default_timeout = DEFAULT_ROUTE_TIMEOUT  # requests that matched no route (transparent passthrough)
        self.add_xff = opts.x_forwarded_for
        self.add_xfp = opts.x_forwarded_proto
        self.add_request_id = opts.request_id
        self.request_ids = request_ids
        self.log_throttle = log_throttle
        # The listener runtime's metric children, shared with its TCP relay.
        self.connect_seconds = connect_seconds
        self.connect_failures = connect_failures
        self._pool_cache: dict[tuple, Pool] = {}
        # What forwarding needs of each route, made once: the field names to
        # drop and the checked field lines to add, each way. Key None: no route.
        trace_fields = self.tracing.drop_fields if self.tracing is not None else frozenset()
        self.edits: dict = {None: RouteEdits(HOP_BY_HOP, b"", HOP_BY_HOP, b"", trace_fields)}
        # Routes with a rate_limit: (limiter, key kind, header name, ratelimit-* quota and window);
        # key kinds: RL_ROUTE one bucket, RL_CLIENT_IP, RL_HEADER (that field's value), RL_PEER (SPIFFE ID).
        self.rate_limits: dict = {}
        for route in self.table.routes:
            rl = route.route.rate_limit
            if rl is not None:
                limiter = rate_limiters.get(listener.name, route.name, rl)
                header = rl.key[7:].encode() if rl.key is not None and rl.key.startswith("header:") else None
                kind = (exchange.RL_HEADER if header is not None else exchange.RL_CLIENT_IP if rl.key == "client_ip"
                        else exchange.RL_PEER if rl.key == "peer_identity" else exchange.RL_ROUTE)
                self.rate_limits[route] = (limiter, kind, header, rl.burst, rl.burst / rl.requests_per_second)
        for route in self.table.routes:
            self.edits[route] = RouteEdits(HOP_BY_HOP | route.request_remove,
                                           field_lines(route.request_set + route.request_add),
                                           HOP_BY_HOP | route.response_remove,
                                           field_lines(route.response_set + route.response_add), trace_fields)

    def pool_for(self, cluster: Cluster, target: tuple[str, int]) -> Pool:
        key = (cluster.name, target)
        pool = self._pool_cache.get(key)
        if pool is None or self.pools.pools.get(pool.key) is not pool:
            opts = cluster.pool
            pool = self.pools.pool(cluster.name, target, opts.max_idle_per_endpoint, opts.idle_timeout)
            if len(self._pool_cache) < 4096:  # original-destination targets are unbounded
                self._pool_cache[key] = pool
        return pool

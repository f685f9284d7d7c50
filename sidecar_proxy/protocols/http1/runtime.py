"""What every HTTP session of one listener under one snapshot shares.

Built once per snapshot (with the listener's ``ListenerRuntime``), so a
request does no config lookups: the route table is compiled, endpoint
pickers and metric children are bound, the codec is resolved.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

from ...config.model import PASSTHROUGH, Cluster, Config, Listener
from ...logs import Throttle
from ...routing.table import RouteTable
from ...upstream.balancer import make_picker
from ...upstream.pool import Pool, PoolManager
from . import resolve_codec
from .exchange import HOP_BY_HOP, RequestIds
from .serialize import field_lines

if TYPE_CHECKING:
    from ...transport.listeners import ListenerState


class HttpRuntime:
    __slots__ = ("name", "loop", "state", "codec", "limits", "table", "clusters", "pickers", "passthrough",
                 "own_ports", "pools", "buffer_limit", "header_timeout", "default_timeout", "add_xff", "add_xfp",
                 "add_request_id", "request_ids", "log_throttle", "connect_seconds", "connect_failures", "_pool_cache",
                 "_req_drop", "_resp_drop", "_req_lines", "_resp_lines")

    def __init__(self, listener: Listener, config: Config, state: ListenerState, loop: asyncio.AbstractEventLoop,
                 own_ports: frozenset[int], pools: PoolManager, log_throttle: Throttle, request_ids: RequestIds,
                 connect_seconds: Callable[[str], object], connect_failures: Callable[[str, str], None],
                 codec_override: str | None = None) -> None:
        opts = listener.http
        self.name = listener.name
        self.loop = loop
        self.state = state
        self.codec = resolve_codec(codec_override or opts.codec)
        self.limits = opts.limits
        self.table = RouteTable(listener.routes, config.route_tables[listener.routes])
        self.clusters: dict[str, Cluster] = dict(config.clusters)
        self.pickers: dict[str, Callable[[], tuple[str, int]]] = {
            name: make_picker(c) for name, c in config.clusters.items() if not c.original_destination}
        self.passthrough = PASSTHROUGH
        self.own_ports = own_ports
        self.pools = pools
        self.buffer_limit = listener.buffer_limit
        self.header_timeout = opts.request_header_timeout
        self.default_timeout = 15.0  # requests that matched no route (transparent passthrough)
        self.add_xff = opts.x_forwarded_for
        self.add_xfp = opts.x_forwarded_proto
        self.add_request_id = opts.request_id
        self.request_ids = request_ids
        self.log_throttle = log_throttle
        # The listener runtime's metric children, shared with its TCP relay.
        self.connect_seconds = connect_seconds
        self.connect_failures = connect_failures
        self._pool_cache: dict[tuple, Pool] = {}
        self._req_drop: dict = {None: HOP_BY_HOP}
        self._resp_drop: dict = {None: HOP_BY_HOP}
        self._req_lines: dict = {None: b""}
        self._resp_lines: dict = {None: b""}

    def pool_for(self, cluster: Cluster, target: tuple[str, int]) -> Pool:
        key = (cluster.name, target)
        pool = self._pool_cache.get(key)
        if pool is None or self.pools.pools.get(pool.key) is not pool:
            opts = cluster.pool
            pool = self.pools.pool(cluster.name, target, opts.max_idle_per_endpoint, opts.idle_timeout)
            if len(self._pool_cache) < 4096:  # original-destination targets are unbounded
                self._pool_cache[key] = pool
        return pool

    def request_lines(self, route) -> bytes:
        """The route's request_headers set/add as checked field lines, made once per snapshot."""
        lines = self._req_lines.get(route)
        if lines is None:
            lines = self._req_lines[route] = field_lines(route.request_set + route.request_add)
        return lines

    def response_lines(self, route) -> bytes:
        lines = self._resp_lines.get(route)
        if lines is None:
            lines = self._resp_lines[route] = field_lines(route.response_set + route.response_add)
        return lines

    def request_drop(self, route) -> frozenset[bytes]:
        drop = self._req_drop.get(route)
        if drop is None:
            drop = self._req_drop[route] = HOP_BY_HOP | route.request_remove
        return drop

    def response_drop(self, route) -> frozenset[bytes]:
        drop = self._resp_drop.get(route)
        if drop is None:
            drop = self._resp_drop[route] = HOP_BY_HOP | route.response_remove
        return drop

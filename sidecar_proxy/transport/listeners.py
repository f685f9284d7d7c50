"""Listening sockets, reconciled with each snapshot without dropping anything.

A listener whose address and port (``bind_key``) are unchanged keeps its
socket: its new settings apply to connections accepted after the swap,
because the accept path reads the runtime of the current snapshot. A new or
moved listener is bound during ``prepare`` (so a bind failure rejects the
whole update while the old snapshot stays live) and starts serving at
commit, after which the socket it replaces stops accepting. Established
connections are never touched by a reload.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

from ..config.model import PASSTHROUGH, Cluster, Config, Listener
from ..config.snapshot import Snapshot, UpdateRejected
from ..protocols.http1.runtime import HttpRuntime
from ..protocols.http1.exchange import RequestIds
from ..policies.rate_limit import RateLimiters
from ..routing.table import RouteTable
from ..telemetry.pipeline import TelemetryPipeline, TelemetryView, scrape_routes
from ..tls.mesh import MeshTls
from ..upstream.cluster import ClusterStates, Upstream
from ..upstream.pool import PoolManager
from ..addr import format_addr
from ..logs import Throttle
from .relay import Relay

if TYPE_CHECKING:
    from ..telemetry.metrics import Metrics

log = logging.getLogger("sidecar_proxy.listeners")

LISTEN_BACKLOG = 4096


class ListenerState:
    """Per listener name; outlives snapshots so counters and /connections stay continuous.

    Plain ints: a scrape reads them (see telemetry.metrics), the hot path only adds.
    """

    __slots__ = ("name", "connections", "opened", "closed", "closed_rx", "closed_tx", "refused", "detections",
                 "http_requests", "http_resends", "rate_limits", "tls")

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections: set[Relay] = set()
        self.opened = 0
        self.closed: dict[str, int] = {}  # by relay.CLOSE_REASONS
        self.closed_rx = 0  # bytes read from downstream by finished connections
        self.closed_tx = 0  # bytes sent to downstream by finished connections
        self.refused: dict[str, int] = {}
        self.detections: dict[str, int] = {}  # "auto" listeners: tls/http2/http1/opaque/timeout/opaque_port
        # (route, cluster, status // 100, response flag or "-"); "none" where there was no route / cluster.
        self.http_requests: dict[tuple[str, str, int, str], int] = {}
        self.http_resends = 0  # requests sent again after a reused upstream connection closed under them
        self.rate_limits: dict = {}  # route name -> LocalRateLimit (its counters are read at scrape time)
        self.tls: dict[str, int] = {}  # mTLS terminations: "ok" or the refusal reason (tls.reasons)

    def count_refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_detection(self, outcome: str) -> None:
        self.detections[outcome] = self.detections.get(outcome, 0) + 1

    def count_tls(self, outcome: str) -> None:
        self.tls[outcome] = self.tls.get(outcome, 0) + 1


class ListenerRuntime:
    """Everything a connection accepted on one listener under one snapshot uses.

    Built once per snapshot so the accept path does no config lookups and
    binds no metric labels.
    """

    __slots__ = ("listener", "state", "loop", "own_ports", "snapshot_version", "log_throttle", "http",
                 "tcp_cluster", "tcp_route", "clusters", "pickers", "_metrics", "_failures", "_connect_seconds",
                 "mesh", "tls_mode", "upstreams")

    def __init__(self, listener: Listener, config: Config, state: ListenerState,
                 loop: asyncio.AbstractEventLoop, own_ports: frozenset[int], snapshot_version: int,
                 metrics: Metrics, log_throttle: Throttle, pools: PoolManager,
                 request_ids: RequestIds | None = None, codec_override: str | None = None,
                 rate_limiters: RateLimiters | None = None, cluster_states: ClusterStates | None = None,
                 mesh: MeshTls | None = None, telemetry: TelemetryView | None = None) -> None:
        self.listener = listener
        self.mesh = mesh  # the workload identity (None without a tls section)
        self.tls_mode = listener.tls.mode
        self.state = state
        self.loop = loop
        self.own_ports = own_ports
        self.snapshot_version = snapshot_version
        self.log_throttle = log_throttle
        self._metrics = metrics
        self._failures: dict[tuple[str, str], object] = {}
        self._connect_seconds: dict[str, object] = {}
        self.http = None
        if listener.protocol in ("http", "auto"):
            self.http = HttpRuntime(listener, config, state, loop, own_ports, pools, log_throttle,
                                    request_ids or RequestIds(), self.connect_seconds, self.connect_failures,
                                    rate_limiters or RateLimiters(time.monotonic),
                                    cluster_states or ClusterStates(), mesh, telemetry, codec_override)
            table = self.http.table
            self.clusters = self.http.clusters
            self.upstreams = self.http.upstreams
        else:
            table = RouteTable(listener.routes, config.route_tables[listener.routes])
            self.clusters = dict(config.clusters)
            states = cluster_states or ClusterStates()
            self.upstreams = {name: Upstream(c, states.get(c)) for name, c in config.clusters.items()}
        self.pickers = {name: up.picker for name, up in self.upstreams.items() if up.picker is not None}
        # Bytes that are not HTTP go to the table's first catch-all route
        # (the validator makes tcp listeners have one), or where they were going.
        self.tcp_route = table.tcp_route()
        if self.tcp_route is None:
            self.tcp_cluster = PASSTHROUGH if listener.transparent else None
        elif self.tcp_route.route.cluster is not None:
            self.tcp_cluster = config.clusters[self.tcp_route.route.cluster]
        else:
            self.tcp_cluster = None  # weighted: chosen per connection

    def tcp_target(self, orig_dst: tuple[str, int] | None) -> tuple[Cluster | None, tuple[str, int] | None]:
        cluster = self.tcp_cluster
        if cluster is None:
            if self.tcp_route is None:
                return None, None
            cluster = self.clusters[self.tcp_route.pick_cluster()]
        if cluster.original_destination:
            # The validator allows original_destination clusters on transparent listeners only.
            return cluster, orig_dst
        return cluster, self.pickers[cluster.name]()

    def connect_seconds(self, cluster: str):
        child = self._connect_seconds.get(cluster)
        if child is None:
            child = self._connect_seconds[cluster] = self._metrics.upstream_connect_seconds.labels(cluster=cluster)
        return child

    def connect_failures(self, cluster: str, reason: str) -> None:
        key = (cluster, reason)
        child = self._failures.get(key)
        if child is None:
            child = self._failures[key] = self._metrics.upstream_connect_failures.labels(cluster=cluster,
                                                                                          reason=reason)
        child.inc()


class _Bound:
    __slots__ = ("listener", "sock", "server")

    def __init__(self, listener: Listener, sock: socket.socket, server: asyncio.AbstractServer) -> None:
        self.listener = listener
        self.sock = sock
        self.server = server


# linux/in.h IP_TRANSPARENT, linux/in6.h IPV6_TRANSPARENT: TPROXY only hands
# connections to listeners that carry this flag (it needs CAP_NET_ADMIN).
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75


def set_transparent(sock: socket.socket, on: bool) -> None:
    """Raises PermissionError without CAP_NET_ADMIN (or CAP_NET_RAW)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, int(on))
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, int(on))


def check_transparent_allowed(address: str) -> None:
    """Try the flag on a throwaway socket, so a missing capability rejects an update."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        set_transparent(probe, True)


def bind_socket(address: str, port: int, tproxy: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if tproxy:
            set_transparent(sock, True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" means IPv6 only; IPv4 has its own listener. Mapped
            # addresses would need the IPv4 SO_ORIGINAL_DST on an IPv6 socket.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenerManager:
    """The snapshot participant that owns every listening socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics, codec_override: str | None = None) -> None:
        self.loop = loop
        self.metrics = metrics
        self.codec_override = codec_override  # `run --http1-codec`: every listener's http.codec
        self.pools = PoolManager(loop)
        self.request_ids = RequestIds()  # one x-request-id sequence per process, across snapshots
        self.rate_limiters = RateLimiters(time.monotonic)  # route buckets, across snapshots
        self.cluster_states = ClusterStates()  # breakers, retry budgets, outlier detectors, across snapshots
        self.mesh: MeshTls | None = None       # the workload identity of the live config's tls section
        self.telemetry = TelemetryPipeline(loop, metrics.registry, lambda: scrape_routes(metrics.render))
        self._staged = None                    # the telemetry a prepared snapshot would use
        self.states: dict[str, ListenerState] = {}
        self._bound: dict[str, _Bound] = {}
        self._runtimes: dict[str, ListenerRuntime] = {}
        self._pending: dict[str, _Bound] = {}
        self.log_throttle = Throttle(1.0)
        self.accepting = True

    # --- snapshot participant

    async def prepare(self, old: Snapshot | None, new: Snapshot) -> Callable[[], Awaitable[None]]:
        if not self.accepting:
            raise UpdateRejected([("", "the proxy is draining; config updates are refused")])
        config = new.config
        own_ports = frozenset(l.port for l in config.listeners.values())
        # The same tls section keeps its identity source (and its rotations); another one is loaded
        # now, so a config naming unreadable or invalid certificates is refused, not half applied.
        mesh = self.mesh
        if config.tls is None:
            mesh = None
        elif mesh is None or mesh.settings != config.tls:
            from ..tls.identity import IdentityError  # cryptography: loaded once mTLS is configured
            mesh = MeshTls(config.tls)
            try:
                mesh.source.load()
            except IdentityError as exc:
                raise UpdateRejected([("tls", f"the workload identity cannot be used ({exc.reason}): "
                                              f"{exc.detail}")]) from None
            except (ssl.SSLError, OSError) as exc:  # OpenSSL refused what cryptography accepted
                raise UpdateRejected([("tls", f"the workload identity cannot be used: {exc}")]) from None
        staged = self._staged = await self.telemetry.prepare(config.telemetry)
        runtimes = {}
        for name, listener in config.listeners.items():
            state = self.states.get(name) or ListenerState(name)
            try:
                runtimes[name] = ListenerRuntime(listener, config, state, self.loop, own_ports, new.version,
                                                 self.metrics, self.log_throttle, self.pools, self.request_ids,
                                                 self.codec_override, self.rate_limiters, self.cluster_states,
                                                 mesh, self.telemetry.view(name, [*config.clusters, PASSTHROUGH.name],
                                                                           config.telemetry, staged))
            except ValueError as exc:  # an http1 codec that is not installed
                await self.abort(new)
                raise UpdateRejected([(f"listeners.{name}.http.codec", str(exc))]) from None
        to_bind = [l for n, l in config.listeners.items()
                   if n not in self._bound or self._bound[n].listener.bind_key != l.bind_key]
        errors = []
        for listener in config.listeners.values():
            if listener.tproxy:
                try:
                    check_transparent_allowed(listener.address)
                except OSError as exc:
                    errors.append((f"listeners.{listener.name}.interception",
                                   f"tproxy needs CAP_NET_ADMIN for IP_TRANSPARENT: {exc.strerror or exc}"))
        for listener in to_bind if not errors else ():
            try:
                sock = bind_socket(listener.address, listener.port, listener.tproxy)
            except OSError as exc:
                hint = ""
                if exc.errno == errno.EADDRINUSE and self._holds_port(listener.port):
                    hint = (" (another of this proxy's listeners holds an overlapping address on this "
                            "port; move a listener in two updates: first to a free port)")
                errors.append((f"listeners.{listener.name}",
                               f"cannot bind {format_addr((listener.address, listener.port))}: "
                               f"{exc.strerror or exc}{hint}"))
                continue
            server = await self.loop.create_server(self._factory(listener.name), sock=sock,
                                                   backlog=LISTEN_BACKLOG, start_serving=False)
            self._pending[listener.name] = _Bound(listener, sock, server)
        if errors:
            await self.abort(new)
            raise UpdateRejected(errors)

        async def commit() -> None:
            for name, rt in runtimes.items():
                self.states.setdefault(name, rt.state)
                rt.state.rate_limits = {route.name: limit[0] for route, limit in rt.http.rate_limits.items()} \
                    if rt.http is not None else {}
            self.rate_limiters.keep_only({(name, route.name, route.route.rate_limit)
                                          for name, rt in runtimes.items() if rt.http is not None
                                          for route in rt.http.rate_limits})
            self.cluster_states.apply([*config.clusters.values(), PASSTHROUGH])
            self.telemetry.commit(staged)
            self._staged = None
            if mesh is not self.mesh:
                if self.mesh is not None:
                    self.mesh.stop()  # connections keep the contexts they were made with
                if mesh is not None:
                    mesh.start(self.loop)
                self.mesh = mesh
            self._runtimes = runtimes
            pending, self._pending = self._pending, {}
            for name, bound in pending.items():
                await bound.server.start_serving()
                replaced = self._bound.get(name)
                self._bound[name] = bound
                if replaced is not None:
                    replaced.server.close()
                log.info("listener serving", extra={"fields": {
                    "listener": name, "address": format_addr((bound.listener.address, bound.listener.port)),
                    "transparent": bound.listener.transparent,
                    "interception": bound.listener.interception if bound.listener.transparent else ""}})
            for name in [n for n in self._bound if n not in config.listeners]:
                self._bound.pop(name).server.close()
                log.info("listener removed; its connections continue", extra={"fields": {"listener": name}})
            # A removed listener's counters go once its last connection has.
            for name in [n for n, s in self.states.items() if n not in config.listeners and not s.connections]:
                del self.states[name]
            for name, bound in self._bound.items():
                if bound.listener.tproxy != config.listeners[name].tproxy:
                    set_transparent(bound.sock, config.listeners[name].tproxy)  # allowed: checked in prepare
                bound.listener = config.listeners[name]

        return commit

    async def abort(self, new: Snapshot) -> None:
        if self._staged is not None:
            self.telemetry.abort(self._staged)
            self._staged = None
        pending, self._pending = self._pending, {}
        for bound in pending.values():
            bound.server.close()

    def _holds_port(self, port: int) -> bool:
        return any(b.listener.port == port for b in self._bound.values())

    def _factory(self, name: str) -> Callable[[], asyncio.Protocol]:
        runtimes = self  # read at accept time: the snapshot current at accept

        def accept() -> asyncio.Protocol:
            return Relay(runtimes._runtimes[name]).down

        return accept

    # --- lifecycle and introspection

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        return {name: b.sock.getsockname()[:2] for name, b in self._bound.items()}

    def stop_accepting(self) -> None:
        """Close every listening socket; established connections continue.

        HTTP connections are asked to finish: an idle one closes now, a busy
        one after its response (which says ``connection: close``). Idle
        upstream connections are closed.
        """
        self.accepting = False
        if self.mesh is not None:
            self.mesh.stop()
        for bound in self._bound.values():
            bound.server.close()
        for relay in list(self.connections()):
            relay.drain()
        self.pools.close_idle()

    def connections(self) -> Iterator[Relay]:
        for state in self.states.values():
            yield from state.connections

    def active_count(self) -> int:
        return sum(len(s.connections) for s in self.states.values())

    def abort_all(self, reason: str) -> int:
        victims = list(self.connections())
        for relay in victims:
            relay.abort(reason)
        return len(victims)

"""Route tables compiled once per snapshot; ``RouteTable.match`` runs per request.

Compilation turns each :class:`~sidecar_proxy.config.model.Route` into a
:class:`CompiledRoute`: the action's parts as bytes ready to write, and a
tuple of small check closures (host, path, method, headers; only those the
match uses, cheapest-to-reject first). A catch-all route has no checks.
Matching lower-cases the authority and strips its port once per request,
and only when some route of the table looks at the host.

Semantics (the config reference in config/example-full.yaml says the same):

* host: a pattern without a port matches the authority's host on any port;
  one with ``:port`` matches the whole authority. ``*.suffix`` matches any
  name ending in ``.suffix`` (not ``suffix`` itself). Case-insensitive. A
  request without an authority matches no host pattern.
* path / path_prefix / path_regex look at the path as sent (no query, not
  percent-decoded or normalised). path_regex must match the whole path
  (re ``fullmatch``, as Envoy's safe_regex does): ``/v[0-9]+/.*``, not ``/v[0-9]+/``.
* method: case-sensitive, as HTTP methods are.
* headers: a check holds when ANY field of that name (repeated fields
  included) matches; ``invert`` makes it hold when none does (for
  ``present``: when the field is absent). A header regex must match the
  whole value too.
"""
from __future__ import annotations

import random
import re
from bisect import bisect_right
from typing import Callable, Mapping

from ..config import model
from ..policies.retry import RetryPolicy
from ..tls.spiffe import IdentityMatcher
from ..protocols.events import Request

# check(req, host, authority) -> bool. host: the lower-case authority without
# its port; authority: the lower-case authority. Both None when the request
# has none, or when no route of the table looks at the host.
Check = Callable[[Request, "bytes | None", "bytes | None"], bool]

_DEFAULT_PORTS = {b"http": b"80", b"https": b"443", b"ws": b"80", b"wss": b"443"}


def _b(text: str) -> bytes:
    return text.encode()


class CompiledRoute:
    """A route's decision and actions, as bytes. Immutable after construction."""

    __slots__ = ("name", "route", "kind", "timeout", "retry", "allow", "host_rewrite",
                 "request_add", "request_set", "request_remove", "response_add", "response_set", "response_remove",
                 "direct_status", "direct_body", "direct_content_type",
                 "redirect_status", "_cluster", "_clusters", "_cumulative", "_total", "_rand",
                 "_rd_scheme", "_rd_host", "_rd_port", "_rd_path", "_rd_strip_query")

    def __init__(self, route: model.Route, rand: Callable[[], float] = random.random) -> None:
        self.name = route.name
        self.route = route
        self.timeout = route.timeout
        r = route.retry
        # The retry decisions, compiled once (None: one try).
        self.retry = None if r is None else RetryPolicy(
            frozenset(r.on), frozenset(r.statuses), r.attempts, r.per_try_timeout, r.backoff_base, r.backoff_cap,
            r.max_retry_after, r.buffer_limit, r.retry_non_idempotent)
        # authorization.allow_identities as a matcher (None: every client, with or without mTLS).
        self.allow = (IdentityMatcher(route.authorization.allow_identities)
                      if route.authorization is not None else None)
        self.host_rewrite = _b(route.host_rewrite) if route.host_rewrite is not None else None
        self.request_add, self.request_set, self.request_remove = _rewrite(route.request_headers)
        self.response_add, self.response_set, self.response_remove = _rewrite(route.response_headers)
        self._cluster: str | None = None
        self._clusters: tuple[str, ...] = ()
        self._cumulative: list[float] | None = None
        self._total = 0.0
        self._rand = rand
        self.direct_status = 0
        self.direct_body = self.direct_content_type = b""
        self.redirect_status = 0
        self._rd_scheme = self._rd_host = self._rd_port = self._rd_path = None
        self._rd_strip_query = False
        action = route.action
        if action in ("cluster", "weighted_clusters"):
            self.kind = "cluster"
            if route.cluster is not None or len(route.weighted_clusters) == 1:
                self._cluster = route.clusters[0]
            else:
                self._clusters = route.clusters
                cumulative, total = [], 0
                for w in route.weighted_clusters:
                    total += w.weight
                    cumulative.append(float(total))
                self._cumulative, self._total = cumulative, float(total)
        elif action == "direct_response":
            self.kind = "direct_response"
            d = route.direct_response
            self.direct_status = d.status
            self.direct_body = _b(d.body)
            self.direct_content_type = _b(d.content_type)
        else:
            self.kind = "redirect"
            rd = route.redirect
            self.redirect_status = rd.status
            self._rd_scheme = _b(rd.scheme) if rd.scheme else None
            self._rd_host = _b(rd.host) if rd.host else None
            self._rd_port = str(rd.port).encode() if rd.port is not None else None
            self._rd_path = _b(rd.path) if rd.path is not None else None
            self._rd_strip_query = rd.strip_query

    def pick_cluster(self) -> str:
        """Kind "cluster": the cluster for this request (by weight when there are several)."""
        cumulative = self._cumulative
        if cumulative is None:
            return self._cluster
        return self._clusters[bisect_right(cumulative, self._rand() * self._total)]

    def redirect_location(self, req: Request, scheme: bytes) -> bytes:
        """Kind "redirect": the request's absolute URL with the configured parts replaced.

        ``scheme`` is the one the client used (b"http" / b"https"). The port
        is left out when it is the new scheme's default, and dropped when
        the scheme changes and it was the old scheme's default. Without an
        authority and a configured host the result is a relative reference
        (path and query), which Location allows.
        """
        new_scheme = self._rd_scheme or scheme
        host = port = None
        authority = req.authority
        if authority is not None:
            i = authority.rfind(b":")
            if i >= 0 and authority.find(b"]", i) < 0:
                host, port = authority[:i], authority[i + 1:] or None
            else:
                host = authority
        if self._rd_host is not None:
            host = self._rd_host
        if self._rd_port is not None:
            port = self._rd_port
        elif new_scheme != scheme and port == _DEFAULT_PORTS.get(scheme):
            port = None
        if port is not None and port == _DEFAULT_PORTS.get(new_scheme):
            port = None
        path = self._rd_path if self._rd_path is not None else req.path
        if self._rd_strip_query:
            query = b""
        else:
            _, sep, rest = req.target.partition(b"?")
            query = sep + rest
        if host is None:
            return path + query
        return b"".join((new_scheme, b"://", host, b":" + port if port else b"", path, query))

    def __repr__(self) -> str:
        return f"CompiledRoute({self.name!r} {self.kind})"


def _rewrite(r: model.HeaderRewrite) -> tuple[tuple, tuple, frozenset]:
    add = tuple((_b(n), _b(v)) for n, v in r.add)
    set_ = tuple((_b(n), _b(v)) for n, v in r.set)
    # Setting a field removes every existing one of that name first.
    remove = frozenset(_b(n) for n in r.remove) | frozenset(n for n, _ in set_)
    return add, set_, remove


# --- checks


def _host_check(patterns: tuple[str, ...]) -> Check:
    hosts, authorities, suffixes, suffix_ports = set(), set(), [], []
    for pattern in patterns:
        if pattern.startswith("["):  # "[v6]" or "[v6]:port", as the loader normalised it
            end = pattern.index("]") + 1
            host, port = pattern[:end], pattern[end + 1:]
        else:
            host, _, port = pattern.partition(":")
        if host.startswith("*."):
            (suffix_ports if port else suffixes).append((_b(host[1:]), _b(port)) if port else _b(host[1:]))
        elif port:
            authorities.add(_b(pattern))
        else:
            hosts.add(_b(host))
    hosts_f, authorities_f, suffixes_t = frozenset(hosts), frozenset(authorities), tuple(suffixes)
    suffix_ports_t = tuple(suffix_ports)
    if not authorities and not suffix_ports:
        if not suffixes:
            return lambda req, host, authority: host in hosts_f
        return lambda req, host, authority: host is not None and (host in hosts_f or host.endswith(suffixes_t))

    def check(req: Request, host: bytes | None, authority: bytes | None) -> bool:
        if host is None:
            return False
        if host in hosts_f or authority in authorities_f or (suffixes_t and host.endswith(suffixes_t)):
            return True
        port = authority[len(host) + 1:]
        return any(port == p and host.endswith(s) for s, p in suffix_ports_t)
    return check


def _header_check(h: model.HeaderMatch) -> Check:
    name, value, invert = _b(h.name), _b(h.value), h.invert
    hit, miss = not invert, invert
    if h.kind == "present":
        def check(req: Request, host, authority) -> bool:
            for k, _ in req.headers:
                if k == name:
                    return hit
            return miss
    elif h.kind == "exact":
        def check(req: Request, host, authority) -> bool:
            for k, v in req.headers:
                if k == name and v == value:
                    return hit
            return miss
    elif h.kind == "prefix":
        def check(req: Request, host, authority) -> bool:
            for k, v in req.headers:
                if k == name and v.startswith(value):
                    return hit
            return miss
    else:
        rx_match = re.compile(value).fullmatch

        def check(req: Request, host, authority) -> bool:
            for k, v in req.headers:
                if k == name and rx_match(v) is not None:
                    return hit
            return miss
    return check


def compile_checks(m: model.Match) -> tuple[Check, ...]:
    """The checks of a match, host first (the usual discriminator in a mesh); () for a catch-all."""
    checks: list[Check] = []
    if m.host:
        checks.append(_host_check(m.host))
    if m.path is not None:
        exact = _b(m.path)
        checks.append(lambda req, host, authority: req.path == exact)
    elif m.path_prefix is not None:
        prefix = _b(m.path_prefix)
        checks.append(lambda req, host, authority: req.path.startswith(prefix))
    elif m.path_regex is not None:
        rx_match = re.compile(_b(m.path_regex)).fullmatch
        checks.append(lambda req, host, authority: rx_match(req.path) is not None)
    if m.method:
        methods = frozenset(_b(x) for x in m.method)
        checks.append(lambda req, host, authority: req.method in methods)
    checks.extend(_header_check(h) for h in m.headers)
    return tuple(checks)


class RouteTable:
    """One route table of a snapshot, compiled. ``match`` returns the first route that matches."""

    __slots__ = ("name", "routes", "_tcp_route", "_entries", "_needs_host")

    def __init__(self, name: str, routes: tuple[model.Route, ...],
                 rand: Callable[[], float] = random.random) -> None:
        self.name = name
        self.routes = tuple(CompiledRoute(r, rand) for r in routes)
        self._tcp_route = next((c for c, r in zip(self.routes, routes) if r.forwards and r.match.is_catch_all),
                              None)
        entries = []
        for compiled, route in zip(self.routes, routes):
            peers = route.match.peer_identity
            entries.append((compiled, compile_checks(route.match), IdentityMatcher(peers) if peers else None))
            if route.match.is_catch_all:
                break  # nothing after a catch-all can match
        self._entries = tuple(entries)
        self._needs_host = any(r.match.host for r in routes)

    def tcp_route(self) -> CompiledRoute | None:
        """The route for non-HTTP connections: the first catch-all route that sends to a cluster
        (as ``Config.tcp_route``). None: to the original destination on a transparent listener, else refused."""
        return self._tcp_route

    def match(self, req: Request, peer: str | None = None) -> CompiledRoute | None:
        """The first route whose match holds; ``peer`` is the client's SPIFFE ID (mTLS), or None."""
        if self._needs_host and req.authority is not None:
            authority = req.authority.lower()
            i = authority.rfind(b":")
            host = authority[:i] if i >= 0 and authority.find(b"]", i) < 0 else authority
        else:
            authority = host = None
        for route, checks, peers in self._entries:
            if peers is not None and (peer is None or not peers.matches(peer)):
                continue
            for check in checks:
                if not check(req, host, authority):
                    break
            else:
                return route
        return None

    def __repr__(self) -> str:
        return f"RouteTable({self.name!r}, {len(self.routes)} routes)"


def compile_tables(config: model.Config, rand: Callable[[], float] = random.random) -> Mapping[str, RouteTable]:
    """Every route table of a snapshot, compiled (once per snapshot)."""
    return {name: RouteTable(name, routes, rand) for name, routes in config.route_tables.items()}

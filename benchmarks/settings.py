"""What the benchmark runs and where: the address, ports and cores, the
targets wrk sends requests to and the scenarios it runs.

run.py, processes.py and environment.py all need these, so they live here,
and this module imports none of them.
"""

from __future__ import annotations

import dataclasses

HOST = "127.0.0.1"
ADMIN_PORT = 19000
BACKEND_PORT = 19080
PROXY_CORE = "0"
# wrk and nginx share the other core, so nothing competes with the proxy for
# its core and the proxy's CPU time is not inflated by cache or run-queue noise.
LOAD_CORE = "1"
# The inner listeners of the two chain targets (below), and the ports their
# first listener's cluster connects to, which the kernel redirects to them
# (see Hop).
CHAIN_INNER_PORT = 19006
MTLS_CHAIN_INNER_PORT = 19008
CHAIN_INNER_VIA_PORT = 19106
MTLS_CHAIN_INNER_VIA_PORT = 19108


@dataclasses.dataclass(frozen=True)
class Hop:
    """A further listener of the same proxy that a target's requests pass
    through after the target's own listener (the inner hop of a chain).

    The proxy answers 508 (flag LOOP) rather than connect to a port of one of
    its own listeners on a local address, so the cluster in front of the hop
    connects to `via_port` instead, and an iptables REDIRECT rule (nat
    OUTPUT, added for the run) sends those connections on to `port` in the
    kernel, with no process in between."""

    name: str
    port: int
    via_port: int
    listener: dict


@dataclasses.dataclass(frozen=True)
class Target:
    """Where wrk sends requests. A target with a listener goes through the
    proxy: the listener, completed with address and port, is added to the
    proxy's config under the target's name, and so are its hops' listeners
    under theirs."""

    name: str
    port: int
    listener: dict | None = None
    scheme: str = "http"
    hops: tuple[Hop, ...] = ()

    @property
    def via_proxy(self) -> bool:
        return self.listener is not None

    def listeners(self) -> dict[str, dict]:
        """The proxy listeners this target needs, by name, with their ports."""
        if self.listener is None:
            return {}
        return {self.name: {"port": self.port, **self.listener},
                **{hop.name: {"port": hop.port, **hop.listener} for hop in self.hops}}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One wrk workload, run against every target."""

    name: str
    path: str
    connections: int
    # The headline figure of a bulk scenario is GB/s rather than req/s.
    bulk: bool = False


TARGETS = (
    Target("direct", BACKEND_PORT),
    Target("proxy_l4", 19001, listener={"protocol": "tcp", "routes": "main"}),
    # The HTTP/1.1 L7 path, once per codec: every request is parsed, routed
    # (through a real path_prefix match, not a shortcut), rewritten with the
    # forwarding headers and sent on a pooled keep-alive connection to nginx.
    Target("proxy_l7_httptools", 19002,
           listener={"protocol": "http", "routes": "l7", "http": {"codec": "httptools"}}),
    Target("proxy_l7_h11", 19003,
           listener={"protocol": "http", "routes": "l7", "http": {"codec": "h11"}}),
    # proxy_l7_httptools with every resilience policy configured on its route
    # and cluster, none of them triggering: what the policies cost per request.
    Target("proxy_l7_policies", 19004,
           listener={"protocol": "http", "routes": "l7_policies", "http": {"codec": "httptools"}}),
    # Chains: every request goes through the proxy twice, wrk -> listener ->
    # cluster -> a second listener of the same proxy -> backend, both L7 with
    # httptools. In proxy_l7_mtls_chain the hop between the two listeners is
    # mTLS (the first originates, the second terminates), kept alive in the
    # first listener's upstream pool like any other; the difference between the
    # two chains is what mTLS costs a request at both ends together.
    Target("proxy_l7_chain", 19005,
           listener={"protocol": "http", "routes": "chain", "http": {"codec": "httptools"}},
           hops=(Hop("proxy_l7_chain_inner", CHAIN_INNER_PORT, CHAIN_INNER_VIA_PORT,
                     {"protocol": "http", "routes": "l7", "http": {"codec": "httptools"}}),)),
    Target("proxy_l7_mtls_chain", 19007,
           listener={"protocol": "http", "routes": "mtls_chain", "http": {"codec": "httptools"}},
           hops=(Hop("proxy_l7_mtls_chain_inner", MTLS_CHAIN_INNER_PORT, MTLS_CHAIN_INNER_VIA_PORT,
                     {"protocol": "http", "routes": "l7", "http": {"codec": "httptools"},
                      "tls": {"mode": "strict"}}),)),
)

# The plaintext chain and the mTLS chain, whose per-request CPU the report
# compares: the difference is what mTLS costs both ends of a kept-alive hop.
MTLS_PAIR = ("proxy_l7_chain", "proxy_l7_mtls_chain")

# The SPIFFE ID of the proxy's workload certificate, made for the run when a
# target needs mTLS: the proxy is both ends of the mTLS hop, so it is also the
# identity the originating cluster expects.
TRUST_DOMAIN = "bench.test"
WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/sidecar"

# Route tables of the proxy's config, named by the targets' (and hops')
# "routes"; each names the cluster its requests go to (CLUSTERS).
# Every resilience policy of issue 5, set so that none triggers: on the route ...
ROUTE_POLICIES = {
    "retry": {"on": ["connect-failure", "reset", "5xx"], "attempts": 3, "per_try_timeout": "5s"},
    "rate_limit": {"requests_per_second": 1_000_000, "burst": 1_000_000},
}
ROUTE_TABLES = {
    "main": [{"match": {}, "cluster": "backend"}],
    "l7": [{"match": {"path_prefix": "/"}, "cluster": "backend"}],
    "l7_policies": [{"match": {"path_prefix": "/"}, "cluster": "backend_policies", **ROUTE_POLICIES}],
    "chain": [{"match": {"path_prefix": "/"}, "cluster": "chain_inner"}],
    "mtls_chain": [{"match": {"path_prefix": "/"}, "cluster": "mtls_chain_inner"}],
}
# ... and on its cluster (backend_policies).
POLICY_CLUSTER = {
    "lb": "least_request",
    "circuit_breakers": {"max_connections": 1000, "max_pending_requests": 1000, "max_requests": 1000,
                         "max_retries": 100},
    "retry_budget": {"percent": 20, "min_retries": 3},
    "outlier_detection": {"consecutive_5xx": 5},
}


def _cluster(port: int, **options) -> dict:
    return {"endpoints": [f"{HOST}:{port}"], "connect_timeout": "1s", **options}


# The proxy's clusters, by name. The config gets those that the route tables
# of the selected targets name, so a checkout without mTLS (or without
# policies) can still be measured on the targets that do not need them.
CLUSTERS = {
    "backend": _cluster(BACKEND_PORT),
    "backend_policies": _cluster(BACKEND_PORT, **POLICY_CLUSTER),
    "chain_inner": _cluster(CHAIN_INNER_VIA_PORT),
    "mtls_chain_inner": _cluster(MTLS_CHAIN_INNER_VIA_PORT,
                                 tls={"mode": "mutual", "peer_identity": [WORKLOAD_ID]}),
}

# The target through which the idle-connection memory test connects. It is
# here rather than with that test in run.py because it must name one of TARGETS.
IDLE_TARGET = "proxy_l4"

SCENARIOS = (
    # Direct req/s stops growing at about 25 connections on the 2-core machine
    # this was tuned on; 50 leaves headroom for a slower proxy to be saturated,
    # and more would only add queueing to the latency.
    Scenario("small keep-alive", "/small", connections=50),
    # Direct throughput is about flat from 1 to 8 streams; 4 keep the proxy
    # busy in both directions while wrk waits on the others.
    Scenario("1 MiB bulk", "/1m", connections=4, bulk=True),
)

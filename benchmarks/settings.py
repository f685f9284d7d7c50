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


@dataclasses.dataclass(frozen=True)
class Target:
    """Where wrk sends requests. A target with a listener goes through the
    proxy: the listener, completed with address and port, is added to the
    proxy's config under the target's name."""

    name: str
    port: int
    listener: dict | None = None
    scheme: str = "http"

    @property
    def via_proxy(self) -> bool:
        return self.listener is not None


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
)

# Route tables of the proxy's config, named by the targets' "routes"; every
# route leads to the one cluster, "backend" (nginx).
ROUTE_TABLES = {
    "main": [{"match": {}, "cluster": "backend"}],
    "l7": [{"match": {"path_prefix": "/"}, "cluster": "backend"}],
    "l7_policies": [{"match": {"path_prefix": "/"}, "cluster": "backend_policies",
                     "retry": {"on": ["connect-failure", "reset", "5xx"], "attempts": 3, "per_try_timeout": "5s"},
                     "rate_limit": {"requests_per_second": 1_000_000, "burst": 1_000_000}}],
}
# Clusters beside "backend" (nginx), by the route tables that name them.
POLICY_CLUSTER = {
    "lb": "least_request",
    "circuit_breakers": {"max_connections": 1000, "max_pending_requests": 1000, "max_requests": 1000,
                         "max_retries": 100},
    "retry_budget": {"percent": 20, "min_retries": 3},
    "outlier_detection": {"consecutive_5xx": 5},
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

"""RouteTable.match and CompiledRoute actions, on routes built by the real loader."""
import random
from collections import Counter

import pytest

from sidecar_proxy.config import load
from sidecar_proxy.protocols.events import Request
from sidecar_proxy.routing.table import RouteTable, compile_tables

CLUSTERS = {name: {"endpoints": ["10.0.0.1:80"]} for name in ("a", "b", "c", "d", "e")}


def table(*routes: dict, rand=random.random) -> RouteTable:
    named = [{"name": f"r{i}", **r} for i, r in enumerate(routes)]
    config = load.build({"version": 1, "node": {"id": "n"},
                         "listeners": {"l": {"address": "127.0.0.1", "port": 18080, "protocol": "http",
                                             "routes": "t"}},
                         "clusters": CLUSTERS, "route_tables": {"t": named}})
    return RouteTable("t", config.route_tables["t"], rand)


def req(target: bytes = b"/", authority: bytes | None = b"svc.example", method: bytes = b"GET",
        headers: list | None = None) -> Request:
    path = target.partition(b"?")[0]
    return Request(method, target, path, authority, headers if headers is not None else [])


def name_of(t: RouteTable, r: Request) -> str | None:
    route = t.match(r)
    return route.name if route is not None else None


# --- host


@pytest.mark.parametrize("authority,expected", [
    (b"api.example.com", "r0"),
    (b"API.Example.COM", "r0"),           # case-insensitive
    (b"api.example.com:8080", "r0"),      # a pattern without a port: any port
    (b"x.wild.example", "r1"),
    (b"a.b.wild.example:1234", "r1"),
    (b"wild.example", None),               # *.suffix needs a label before the suffix
    (b"notwild.example", None),
    (b"ported.example:8443", "r2"),        # a pattern with a port: that exact authority
    (b"PORTED.example:8443", "r2"),
    (b"ported.example", None),
    (b"ported.example:443", None),
    (b"x.wp.example:9000", "r3"),
    (b"x.wp.example:9001", None),
    (b"x.wp.example", None),
    (b"[::1]:8080", "r4"),
    (b"[::1]", "r4"),
    (b"[::2]:8080", None),
    (b"[fe80::1]:80", "r5"),
    (b"[fe80::1]:81", None),
    (b"10.0.0.7:80", "r6"),
    (None, None),                          # no authority: no host pattern matches
])
def test_host_rules(authority, expected):
    t = table({"match": {"host": "api.example.com"}, "cluster": "a"},
              {"match": {"host": "*.wild.example"}, "cluster": "a"},
              {"match": {"host": "ported.example:8443"}, "cluster": "a"},
              {"match": {"host": "*.wp.example:9000"}, "cluster": "a"},
              {"match": {"host": "[::1]"}, "cluster": "a"},
              {"match": {"host": "[FE80::1]:80"}, "cluster": "a"},
              {"match": {"host": ["nothing.example", "10.0.0.7"]}, "cluster": "a"})
    assert name_of(t, req(authority=authority)) == expected


# --- path


@pytest.mark.parametrize("target,expected", [
    (b"/exact", "r0"),
    (b"/exact?q=1", "r0"),            # the query is not part of the path
    (b"/exact/", "r1"),
    (b"/Exact", None),                 # paths are case-sensitive
    (b"/api/users?x=/exact", "r1"),
    (b"/api", None),
    (b"/v12/items", "r2"),
    (b"/v/items", None),
    (b"/x/v1/items", None),            # the regex must match the whole path
    (b"/v12", None),                   # ...to its end
    (b"/files/a.txt", "r3"),
    (b"/files/a.txt.bak", None),       # ...and with $ at the end
])
def test_path_exact_prefix_regex(target, expected):
    t = table({"match": {"path": "/exact"}, "cluster": "a"},
              {"match": {"path_regex": "/(exact/|api/).*"}, "cluster": "a"},
              {"match": {"path_regex": "/v[0-9]+/.*"}, "cluster": "a"},
              {"match": {"path_regex": r"/files/[^/]+\.txt"}, "cluster": "a"})
    assert name_of(t, req(target)) == expected


def test_path_prefix():
    t = table({"match": {"path_prefix": "/api/"}, "cluster": "a"})
    assert name_of(t, req(b"/api/x?y")) == "r0"
    assert name_of(t, req(b"/api/")) == "r0"
    assert name_of(t, req(b"/api")) is None
    assert name_of(t, req(b"/apiv2/")) is None


def test_method_is_case_sensitive_and_listed():
    t = table({"match": {"method": ["GET", "HEAD"]}, "cluster": "a"},
              {"match": {"method": "PURGE"}, "cluster": "b"})
    assert name_of(t, req(method=b"GET")) == "r0"
    assert name_of(t, req(method=b"HEAD")) == "r0"
    assert name_of(t, req(method=b"PURGE")) == "r1"
    assert name_of(t, req(method=b"get")) is None
    assert name_of(t, req(method=b"POST")) is None


# --- headers


def header_table():
    return table({"match": {"headers": [{"name": "X-Env", "exact": "prod"}]}, "cluster": "a"},
                 {"match": {"headers": [{"name": "accept", "prefix": "application/"}]}, "cluster": "a"},
                 {"match": {"headers": [{"name": "user-agent", "regex": "curl/[0-9.]+"}]}, "cluster": "a"},
                 {"match": {"headers": [{"name": "x-debug", "present": True}]}, "cluster": "a"},
                 {"match": {"headers": [{"name": "x-canary", "exact": "1", "invert": True},
                                        {"name": "x-stage", "present": True}]}, "cluster": "a"},
                 {"match": {"headers": [{"name": "x-stage", "present": True, "invert": True},
                                        {"name": "x-last", "present": True}]}, "cluster": "a"})


@pytest.mark.parametrize("headers,expected", [
    ([(b"x-env", b"prod")], "r0"),
    ([(b"x-env", b"production")], None),           # exact is exact
    ([(b"x-env", b"Prod")], None),                 # values are case-sensitive
    ([(b"accept", b"application/json")], "r1"),
    ([(b"accept", b"text/html")], None),
    ([(b"user-agent", b"curl/8.5.0")], "r2"),
    ([(b"user-agent", b"python curl/8")], None),   # a regex must match the whole value
    ([(b"x-debug", b"")], "r3"),                   # present, even empty
    ([(b"x-stage", b"beta")], "r4"),               # x-canary absent: the inverted check holds
    ([(b"x-stage", b"beta"), (b"x-canary", b"1")], None),
    ([(b"x-stage", b"beta"), (b"x-canary", b"0")], "r4"),
    ([(b"x-last", b"1")], "r5"),                   # x-stage absent
    ([(b"x-last", b"1"), (b"x-stage", b"")], "r4"),
    ([], None),
])
def test_header_matches(headers, expected):
    assert name_of(header_table(), req(headers=headers)) == expected


def test_repeated_fields_match_when_any_of_them_does():
    t = header_table()
    assert name_of(t, req(headers=[(b"x-env", b"dev"), (b"x-env", b"prod")])) == "r0"
    assert name_of(t, req(headers=[(b"accept", b"text/html"), (b"accept", b"application/xml")])) == "r1"
    # inverted: one matching field among several is enough to fail the check
    assert name_of(t, req(headers=[(b"x-stage", b"b"), (b"x-canary", b"0"), (b"x-canary", b"1")])) is None


def test_all_conditions_of_a_match_must_hold():
    t = table({"match": {"host": "api.example", "path_prefix": "/v1/", "method": "POST",
                         "headers": [{"name": "content-type", "prefix": "application/json"}]}, "cluster": "a"})
    good = dict(target=b"/v1/x", authority=b"api.example", method=b"POST",
                headers=[(b"content-type", b"application/json; charset=utf-8")])
    assert name_of(t, req(**good)) == "r0"
    for key, bad in (("target", b"/v2/x"), ("authority", b"web.example"), ("method", b"GET"),
                     ("headers", [(b"content-type", b"text/plain")])):
        assert name_of(t, req(**{**good, key: bad})) is None, key


# --- order, catch-all


def test_first_match_wins_and_catch_all_takes_the_rest():
    t = table({"match": {"path_prefix": "/api/"}, "cluster": "a"},
              {"match": {"path_prefix": "/api/v2/"}, "cluster": "b"},   # shadowed by r0
              {"match": {"host": "x.example"}, "cluster": "c"},
              {"match": {}, "cluster": "d"},
              {"match": {"path": "/never"}, "cluster": "e"})             # after the catch-all
    assert name_of(t, req(b"/api/v2/x", b"x.example")) == "r0"
    assert name_of(t, req(b"/other", b"X.example:80")) == "r2"
    assert name_of(t, req(b"/never", b"y.example")) == "r3"
    assert name_of(t, req(b"/", None)) == "r3"
    assert t.match(req()).pick_cluster() == "d"
    assert t.tcp_route().name == "r3"
    assert [r.name for r in t.routes] == ["r0", "r1", "r2", "r3", "r4"]


def test_no_match_is_none():
    t = table({"match": {"host": "only.example"}, "cluster": "a"})
    assert t.match(req(authority=b"other.example")) is None and t.tcp_route() is None


def test_tcp_route_skips_catch_alls_that_cannot_carry_tcp():
    t = table({"match": {}, "direct_response": {"status": 404}}, {"match": {}, "cluster": "a"})
    assert name_of(t, req()) == "r0" and t.tcp_route().name == "r1"


def test_compile_tables_builds_one_per_table():
    config = load.build({"version": 1, "node": {"id": "n"},
                         "listeners": {"l": {"address": "127.0.0.1", "port": 18080, "routes": "one"}},
                         "clusters": CLUSTERS,
                         "route_tables": {"one": [{"match": {}, "cluster": "a"}],
                                          "two": [{"match": {}, "cluster": "b"}]}})
    tables = compile_tables(config)
    assert {n: t.match(req()).pick_cluster() for n, t in tables.items()} == {"one": "a", "two": "b"}


# --- actions


def test_weighted_distribution_follows_the_weights():
    t = table({"match": {}, "weighted_clusters": [{"cluster": "a", "weight": 70}, {"cluster": "b", "weight": 20},
                                                   {"cluster": "c", "weight": 10}]},
              rand=random.Random(1234).random)
    route = t.match(req())
    assert route.kind == "cluster"
    n = 20_000
    counts = Counter(route.pick_cluster() for _ in range(n))
    assert set(counts) == {"a", "b", "c"}
    for name, weight in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert abs(counts[name] / n - weight) < 0.02, counts


def test_weighted_boundaries_are_exact():
    values = iter([0.0, 0.74999, 0.75, 0.99999])
    t = table({"match": {}, "weighted_clusters": [{"cluster": "a", "weight": 3}, {"cluster": "b", "weight": 1}]},
              rand=lambda: next(values))
    route = t.match(req())
    assert [route.pick_cluster() for _ in range(4)] == ["a", "a", "b", "b"]


def test_single_weighted_cluster_needs_no_randomness():
    def no_rand():
        raise AssertionError("not called")
    t = table({"match": {}, "weighted_clusters": [{"cluster": "e", "weight": 5}]}, rand=no_rand)
    assert t.match(req()).pick_cluster() == "e"


def test_cluster_route_fields():
    t = table({"match": {}, "cluster": "a", "timeout": "2500ms", "host_rewrite": "Backend.internal:8080",
               "request_headers": {"add": {"X-Route": "r0", "x-num": 7}, "set": {"x-env": "prod"},
                                   "remove": ["X-Secret"]},
               "response_headers": {"add": {"x-served-by": "mesh"}, "set": {"Cache-Control": "no-store"},
                                    "remove": ["server", "x-powered-by"]}})
    route = t.match(req())
    assert (route.kind, route.name, route.timeout, route.host_rewrite) == ("cluster", "r0", 2.5,
                                                                           b"backend.internal:8080")
    assert route.route.cluster == "a"
    assert route.request_add == ((b"x-route", b"r0"), (b"x-num", b"7"))
    assert route.request_set == ((b"x-env", b"prod"),)
    assert route.request_remove == frozenset({b"x-secret", b"x-env"})   # includes the set names
    assert route.response_add == ((b"x-served-by", b"mesh"),)
    assert route.response_set == ((b"cache-control", b"no-store"),)
    assert route.response_remove == frozenset({b"server", b"x-powered-by", b"cache-control"})


def test_defaults_of_a_plain_route():
    route = table({"match": {}, "cluster": "a"}).match(req())
    assert route.timeout == 15.0 and route.host_rewrite is None
    assert route.request_add == route.request_set == route.response_add == route.response_set == ()
    assert route.request_remove == route.response_remove == frozenset()
    assert table({"match": {}, "cluster": "a", "timeout": "0s"}).match(req()).timeout == 0.0


def test_direct_response_fields():
    t = table({"match": {}, "direct_response": {"status": 503, "body": "down for maintenance ✓\n"},
               "response_headers": {"set": {"retry-after": "120"}}})
    route = t.match(req())
    assert route.kind == "direct_response" and route.direct_status == 503
    assert route.direct_body == "down for maintenance ✓\n".encode()
    assert route.direct_content_type == b"text/plain"
    assert route.response_set == ((b"retry-after", b"120"),)


def redirect(**spec):
    return table({"match": {}, "redirect": spec}).match(req())


@pytest.mark.parametrize("spec,target,authority,scheme,location", [
    ({"scheme": "https"}, b"/a/b?x=1&y=2", b"shop.example", b"http", b"https://shop.example/a/b?x=1&y=2"),
    # the old scheme's default port goes when the scheme changes
    ({"scheme": "https"}, b"/", b"shop.example:80", b"http", b"https://shop.example/"),
    # a non-default port stays
    ({"scheme": "https"}, b"/", b"shop.example:8080", b"http", b"https://shop.example:8080/"),
    ({"scheme": "https", "port": 8443}, b"/", b"shop.example:80", b"http", b"https://shop.example:8443/"),
    # the new scheme's default port is left out
    ({"scheme": "https", "port": 443}, b"/p", b"shop.example:80", b"http", b"https://shop.example/p"),
    ({"host": "new.example"}, b"/p?q", b"old.example:8080", b"http", b"http://new.example:8080/p?q"),
    ({"host": "new.example", "port": 9000}, b"/p", b"old.example", b"https", b"https://new.example:9000/p"),
    ({"port": 8080}, b"/p", b"[::1]:80", b"http", b"http://[::1]:8080/p"),
    ({"path": "/v2/"}, b"/v1/x?keep=1", b"api.example", b"http", b"http://api.example/v2/?keep=1"),
    ({"path": "/v2/", "strip_query": True}, b"/v1/x?drop=1", b"api.example", b"http", b"http://api.example/v2/"),
    ({"path": "/v2/", "strip_query": True}, b"/v1/x", b"api.example", b"http", b"http://api.example/v2/"),
    ({"scheme": "https", "host": "h.example", "port": 8443, "path": "/n"}, b"/o?q=1", b"x.example:81", b"http",
     b"https://h.example:8443/n?q=1"),
    # no authority and no configured host: a relative reference
    ({"path": "/n"}, b"/o?q", None, b"http", b"/n?q"),
    ({"host": "h.example"}, b"/o", None, b"http", b"http://h.example/o"),
    # the authority's case is kept (hosts compare case-insensitively; the client wrote it)
    ({"path": "/n"}, b"/", b"Shop.Example", b"http", b"http://Shop.Example/n"),
    # an empty query is kept as sent
    ({"path": "/n"}, b"/o?", b"a.example", b"http", b"http://a.example/n?"),
])
def test_redirect_location(spec, target, authority, scheme, location):
    route = redirect(**spec)
    assert route.kind == "redirect"
    assert route.redirect_location(req(target, authority), scheme) == location


def test_redirect_status():
    assert redirect(path="/x").redirect_status == 301
    assert redirect(path="/x", status=307).redirect_status == 307


# --- the client's SPIFFE ID (mTLS)


def test_peer_identity_matches_exact_and_prefix_patterns_and_never_a_client_without_one():
    t = table({"match": {"peer_identity": "spiffe://td/ns/a/sa/x", "path_prefix": "/api"}, "cluster": "a"},
              {"match": {"peer_identity": ["spiffe://td/ns/b/*"]}, "cluster": "b"},
              {"match": {}, "cluster": "c"})
    def picked(peer, target=b"/api/1"):
        return t.match(req(target), peer).name
    assert picked("spiffe://td/ns/a/sa/x") == "r0"
    assert picked("spiffe://td/ns/a/sa/x", b"/other") == "r2"   # every condition must hold
    assert picked("spiffe://td/ns/b/sa/anything") == "r1"
    assert picked("spiffe://td/ns/c/sa/x") == "r2"
    assert picked(None) == "r2"                                   # plaintext: no identity to match
    # A match on identity is not a catch-all: it cannot carry a listener's TCP traffic.
    assert t.tcp_route().name == "r2"


def test_peer_identity_patterns_are_validated_with_their_path():
    with pytest.raises(load.ConfigError) as exc:
        table({"match": {"peer_identity": ["spiffe://td/ns/*/sa/x"]}, "cluster": "a"})
    assert any(p == "route_tables.t[0].match.peer_identity[0]" for p, _ in exc.value.errors), exc.value.errors

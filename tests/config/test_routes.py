"""route_tables: matches, actions, header rewrites, and what listeners need of their tables."""
import copy

import pytest

from sidecar_proxy.config import load, model
from sidecar_proxy.config.dump import to_document
from sidecar_proxy.config.load import ConfigError

BASE = {
    "version": 1,
    "node": {"id": "n1"},
    "listeners": {
        "out": {"address": "0.0.0.0", "port": 15001, "transparent": True, "protocol": "auto", "routes": "out"},
        "web": {"address": "127.0.0.1", "port": 18080, "protocol": "http", "routes": "web"},
    },
    "clusters": {
        "orig": {"original_destination": True},
        "api": {"endpoints": ["10.0.0.1:8080"]},
        "canary": {"endpoints": ["10.0.0.2:8080"]},
    },
    "route_tables": {
        "out": [{"match": {}, "cluster": "orig"}],
        "web": [{"match": {"path_prefix": "/"}, "cluster": "api"}],
    },
}


def with_route(route: dict, table: str = "web") -> dict:
    doc = copy.deepcopy(BASE)
    doc["route_tables"][table] = [route]
    return doc


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load.build(doc)
    return dict(info.value.errors)


def route_errors(route: dict) -> dict[str, str]:
    return errors_of(with_route(route))


def build_route(route: dict) -> model.Route:
    return load.build(with_route(route)).route_tables["web"][0]


R = "route_tables.web[0]"


@pytest.mark.parametrize("route,path,fragment", [
    # actions
    ({"match": {}}, R, "needs an action"),
    ({"match": {}, "cluster": "api", "direct_response": {"status": 200}}, R, "a route takes exactly one"),
    ({"match": {}, "cluster": "api", "redirect": {"path": "/x"}, "weighted_clusters": [{"cluster": "api", "weight": 1}]},
     R, "has 3 actions"),
    ({"match": {}, "cluster": 3}, f"{R}.cluster", "must be a string"),
    ({"match": {}, "cluster": "apl"}, f"{R}.cluster", "did you mean 'api'"),
    ({"match": {}, "weighted_clusters": [{"cluster": "api", "weight": 1}, {"cluster": "canery", "weight": 1}]},
     f"{R}.weighted_clusters[1].cluster", "no cluster named 'canery'"),
    ({"match": {}, "weighted_clusters": []}, f"{R}.weighted_clusters", "non-empty list"),
    ({"match": {}, "weighted_clusters": {"api": 1}}, f"{R}.weighted_clusters", "non-empty list"),
    ({"match": {}, "weighted_clusters": [{"cluster": "api", "weight": 0}]}, f"{R}.weighted_clusters[0].weight",
     "1..10000"),
    ({"match": {}, "weighted_clusters": [{"cluster": "api", "weight": 10001}]}, f"{R}.weighted_clusters[0].weight",
     "1..10000"),
    ({"match": {}, "weighted_clusters": [{"cluster": "api"}]}, f"{R}.weighted_clusters[0].weight", "is required"),
    ({"match": {}, "weighted_clusters": [{"cluster": "api", "weight": 1}, {"cluster": "api", "weight": 2}]},
     f"{R}.weighted_clusters[1].cluster", "listed twice"),
    ({"match": {}, "direct_response": {"status": 199}}, f"{R}.direct_response.status", "200..599"),
    ({"match": {}, "direct_response": {"body": "x"}}, f"{R}.direct_response.status", "is required"),
    ({"match": {}, "direct_response": {"status": 200, "body": "x" * (64 * 1024 + 1)}}, f"{R}.direct_response.body",
     "at most 65536 bytes"),
    ({"match": {}, "direct_response": {"status": 200, "content_type": "text/plain\r\nx-evil: 1"}},
     f"{R}.direct_response.content_type", "control characters"),
    ({"match": {}, "direct_response": {"status": 200, "colour": "red"}}, f"{R}.direct_response.colour", "unknown key"),
    ({"match": {}, "redirect": {"status": 301}}, f"{R}.redirect", "changes nothing"),
    ({"match": {}, "redirect": {"strip_query": True}}, f"{R}.redirect", "at least one of scheme, host, port, path"),
    ({"match": {}, "redirect": {"status": 200, "path": "/x"}}, f"{R}.redirect.status", "301, 302, 303, 307, 308"),
    ({"match": {}, "redirect": {"host": "a.example:80"}}, f"{R}.redirect.host", "use redirect.port"),
    ({"match": {}, "redirect": {"host": "bad host"}}, f"{R}.redirect.host", "not a host name"),
    ({"match": {}, "redirect": {"port": 0}}, f"{R}.redirect.port", "1..65535"),
    ({"match": {}, "redirect": {"path": "x"}}, f"{R}.redirect.path", "must start with '/'"),
    ({"match": {}, "redirect": {"scheme": "ht tp"}}, f"{R}.redirect.scheme", "not a URL scheme"),
    ({"match": {}, "redirect": "https://x"}, f"{R}.redirect", "must be a mapping"),
    ({"match": {}, "direct_response": {"status": 200}, "timeout": "1s"}, f"{R}.timeout",
     "only to routes that send to a cluster"),
    ({"match": {}, "redirect": {"path": "/"}, "host_rewrite": "a"}, f"{R}.host_rewrite", "only to routes that send"),
    ({"match": {}, "redirect": {"path": "/"}, "request_headers": {"remove": ["a"]}}, f"{R}.request_headers",
     "only to routes that send"),
    # route keys
    ({"match": {}, "cluster": "api", "timeout": 3}, f"{R}.timeout", "with a unit"),
    ({"match": {}, "cluster": "api", "timeout": "25h"}, f"{R}.timeout", "at most 24h"),
    ({"match": {}, "cluster": "api", "host_rewrite": "a b"}, f"{R}.host_rewrite", "not a host name"),
    ({"match": {}, "cluster": "api", "host_rewrite": "a:99999"}, f"{R}.host_rewrite", "1..65535"),
    ({"match": {}, "cluster": "api", "name": ""}, f"{R}.name", "printable characters"),
    ({"match": {}, "cluster": "api", "name": "a\nb"}, f"{R}.name", "printable characters"),
    ({"match": {}, "cluster": "api", "rate_limit": {}}, f"{R}.rate_limit.requests_per_second", "is required"),
    ({"match": {}, "cluster": "api", "rate_limit": {"requests_per_second": 0}}, f"{R}.rate_limit.requests_per_second",
     "greater than 0"),
    ({"match": {}, "cluster": "api", "rate_limit": {"requests_per_second": 1, "burst": 0}}, f"{R}.rate_limit.burst",
     "1..1000000"),
    ({"match": {}, "cluster": "api", "rate_limit": {"requests_per_second": 1, "key": "ip"}}, f"{R}.rate_limit.key",
     "'client_ip', 'peer_identity' or 'header:<field name>'"),
    ({"match": {}, "cluster": "api", "rate_limit": {"requests_per_second": 1, "key": "header:a b"}},
     f"{R}.rate_limit.key", "not a rate limit key"),
    ({"match": {}, "cluster": "api", "rate_limit": {"requests_per_second": 1, "shadw": True}},
     f"{R}.rate_limit.shadw", "did you mean 'shadow'"),
    ({"match": {}, "cluster": "api", "authorization": {}}, f"{R}.authorization.allow_identities", "is required"),
    ({"match": {}, "cluster": "api", "clustr": "api"}, f"{R}.clustr", "did you mean 'cluster'"),
    ({"cluster": "api"}, f"{R}.match", "is required"),
    ({"match": "all", "cluster": "api"}, f"{R}.match", "must be a mapping"),
    # match
    ({"match": {"path_regex": "(unclosed"}, "cluster": "api"}, f"{R}.match.path_regex", "invalid regex: missing )"),
    ({"match": {"path_regex": "x" * 2000}, "cluster": "api"}, f"{R}.match.path_regex", "longer than"),
    ({"match": {"path": "/a", "path_prefix": "/b"}, "cluster": "api"}, f"{R}.match", "at most one of path"),
    ({"match": {"path": "a"}, "cluster": "api"}, f"{R}.match.path", "must start with '/'"),
    ({"match": {"path_prefix": "/a?b=1"}, "cluster": "api"}, f"{R}.match.path_prefix", "the query is not part"),
    ({"match": {"path_prefix": "/a b"}, "cluster": "api"}, f"{R}.match.path_prefix", "spaces or control"),
    ({"match": {"path": 5}, "cluster": "api"}, f"{R}.match.path", "must be a string"),
    ({"match": {"host": 5}, "cluster": "api"}, f"{R}.match.host", "a string or a non-empty list"),
    ({"match": {"host": []}, "cluster": "api"}, f"{R}.match.host", "a string or a non-empty list"),
    ({"match": {"host": ["ok.example", 7]}, "cluster": "api"}, f"{R}.match.host[1]", "must be a string"),
    ({"match": {"host": ["ok.example", "a..b"]}, "cluster": "api"}, f"{R}.match.host[1]", "not a host name"),
    ({"match": {"host": "*"}, "cluster": "api"}, f"{R}.match.host", "wildcards are written *.suffix"),
    ({"match": {"host": "a.*.example"}, "cluster": "api"}, f"{R}.match.host", "not a host name"),
    ({"match": {"host": "a.example:0"}, "cluster": "api"}, f"{R}.match.host", "1..65535"),
    ({"match": {"host": "::1"}, "cluster": "api"}, f"{R}.match.host", "[addr]"),
    ({"match": {"method": "get"}, "cluster": "api"}, f"{R}.match.method", "case-sensitive: write 'GET'"),
    ({"match": {"method": ["GET", "PO ST"]}, "cluster": "api"}, f"{R}.match.method[1]", "not an HTTP token"),
    ({"match": {"headers": {"name": "x"}}, "cluster": "api"}, f"{R}.match.headers", "must be a list"),
    ({"match": {"headers": [{"name": "x"}]}, "cluster": "api"}, f"{R}.match.headers[0]", "exactly one of exact"),
    ({"match": {"headers": [{"name": "x", "exact": "a", "prefix": "b"}]}, "cluster": "api"},
     f"{R}.match.headers[0]", "(got exact, prefix)"),
    ({"match": {"headers": [{"exact": "a"}]}, "cluster": "api"}, f"{R}.match.headers[0].name", "is required"),
    ({"match": {"headers": [{"name": "x y", "exact": "a"}]}, "cluster": "api"}, f"{R}.match.headers[0].name",
     "not an HTTP token"),
    ({"match": {"headers": [{"name": "x", "regex": "["}]}, "cluster": "api"}, f"{R}.match.headers[0].regex",
     "invalid regex"),
    ({"match": {"headers": [{"name": "x", "present": False}]}, "cluster": "api"}, f"{R}.match.headers[0].present",
     "invert: true"),
    ({"match": {"headers": [{"name": "x", "exact": "a\r\nb"}]}, "cluster": "api"}, f"{R}.match.headers[0].exact",
     "control characters"),
    ({"match": {"headers": [{"name": "x", "present": True, "invert": "yes"}]}, "cluster": "api"},
     f"{R}.match.headers[0].invert", "must be a boolean"),
    ({"match": {"hostname": "a"}, "cluster": "api"}, f"{R}.match.hostname", "unknown key"),
    # header rewrites
    ({"match": {}, "cluster": "api", "request_headers": {"add": {"x bad": "1"}}}, f"{R}.request_headers.add.x bad",
     "not an HTTP token"),
    ({"match": {}, "cluster": "api", "request_headers": {"add": {"x-a": "1\r\nx-injected: evil"}}},
     f"{R}.request_headers.add.x-a", "CR, LF or NUL"),
    ({"match": {}, "cluster": "api", "request_headers": {"set": {"x-a": "a\nb"}}}, f"{R}.request_headers.set.x-a",
     "control characters"),
    ({"match": {}, "cluster": "api", "response_headers": {"set": {"x-a": "a\x00b"}}}, f"{R}.response_headers.set.x-a",
     "control characters"),
    ({"match": {}, "cluster": "api", "response_headers": {"add": {"x-a": "a\x7fb"}}}, f"{R}.response_headers.add.x-a",
     "control characters"),
    ({"match": {}, "cluster": "api", "request_headers": {"add": {"x-a": True}}}, f"{R}.request_headers.add.x-a",
     "must be a string"),
    ({"match": {}, "cluster": "api", "request_headers": {"set": {"Connection": "close"}}},
     f"{R}.request_headers.set.Connection", "hop-by-hop"),
    ({"match": {}, "cluster": "api", "response_headers": {"remove": ["transfer-encoding"]}},
     f"{R}.response_headers.remove[0]", "hop-by-hop"),
    ({"match": {}, "cluster": "api", "response_headers": {"add": {"Content-Length": "0"}}},
     f"{R}.response_headers.add.Content-Length", "framing"),
    ({"match": {}, "cluster": "api", "request_headers": {"set": {"host": "x"}}}, f"{R}.request_headers.set.host",
     "use host_rewrite"),
    ({"match": {}, "cluster": "api", "request_headers": {"set": {"X-A": "1"}, "remove": ["x-a"]}},
     f"{R}.request_headers.remove[0]", "also in set"),
    # a final newline slips past a regex ending in $; every check must refuse it
    ({"match": {}, "cluster": "api", "request_headers": {"add": {"x-a\n": "1"}}},
     f"{R}.request_headers.add.x-a\n", "not an HTTP token"),
    ({"match": {}, "cluster": "api", "host_rewrite": "backend\n"}, f"{R}.host_rewrite", "not a host name"),
    ({"match": {"method": "GET\n"}, "cluster": "api"}, f"{R}.match.method", "not an HTTP token"),
    ({"match": {"path": "/a\n"}, "cluster": "api"}, f"{R}.match.path", "control characters"),
    ({"match": {}, "redirect": {"path": "/a\r\n"}}, f"{R}.redirect.path", "control characters"),
    ({"match": {}, "redirect": {"scheme": "https\n"}}, f"{R}.redirect.scheme", "not a URL scheme"),
    ({"match": {}, "cluster": "api", "request_headers": {"remove": "x-a"}}, f"{R}.request_headers.remove",
     "must be a list"),
    ({"match": {}, "cluster": "api", "request_headers": {"append": {}}}, f"{R}.request_headers.append",
     "unknown key"),
    ({"match": {}, "cluster": "api", "request_headers": ["x"]}, f"{R}.request_headers", "must be a mapping"),
])
def test_each_route_error_names_its_path(route, path, fragment):
    errors = route_errors(route)
    assert path in errors, errors
    assert fragment in errors[path], errors[path]


def test_duplicate_route_names_in_a_table():
    doc = copy.deepcopy(BASE)
    doc["route_tables"]["web"] = [{"name": "a", "match": {"path": "/x"}, "cluster": "api"},
                                  {"name": "a", "match": {}, "cluster": "api"}]
    assert "also the name of route_tables.web[0]" in errors_of(doc)["route_tables.web[1].name"]


def test_route_defaults():
    route = build_route({"match": {}, "cluster": "api"})
    assert route == model.Route(match=model.Match(), cluster="api", name="web[0]")
    assert route.name == "web[0]" and route.timeout == 15.0 and route.action == "cluster"
    assert route.host_rewrite is None and not route.request_headers and not route.response_headers
    assert route.match.is_catch_all and route.forwards and route.clusters == ("api",)
    assert build_route({"match": {}, "cluster": "api", "timeout": "0s"}).timeout == 0.0
    direct = build_route({"match": {}, "direct_response": {"status": 503}})
    assert direct.direct_response == model.DirectResponse(503, "", "text/plain")
    assert direct.action == "direct_response" and not direct.forwards and direct.clusters == ()
    redirect = build_route({"match": {}, "redirect": {"scheme": "HTTPS"}}).redirect
    assert redirect == model.Redirect(status=301, scheme="https")


def test_matches_are_normalised():
    route = build_route({
        "name": "everything",
        "match": {"host": ["API.Example.com", "*.Example.ORG:8080", "[::1]:80", "api.example.com"],
                  "path_regex": "^/v[0-9]+/", "method": ["GET", "PURGE"],
                  "headers": [{"name": "X-Env", "exact": "prod"}, {"name": "x-debug", "present": True, "invert": True},
                              {"name": "accept", "prefix": "application/"}, {"name": "ua", "regex": "curl/.*"}]},
        "weighted_clusters": [{"cluster": "api", "weight": 9}, {"cluster": "canary", "weight": 1}],
        "request_headers": {"add": {"X-Added": 3}, "set": {"x-set": "v"}, "remove": ["X-Gone"]},
        "response_headers": {"remove": ["server"]},
        "host_rewrite": "Backend.Internal:8080",
    })
    m = route.match
    assert m.host == ("api.example.com", "*.example.org:8080", "[::1]:80")
    assert m.path_regex == "^/v[0-9]+/" and m.method == ("GET", "PURGE") and not m.is_catch_all
    assert m.headers == (model.HeaderMatch("x-env", "exact", "prod"), model.HeaderMatch("x-debug", "present", "", True),
                         model.HeaderMatch("accept", "prefix", "application/"), model.HeaderMatch("ua", "regex", "curl/.*"))
    assert route.name == "everything" and route.action == "weighted_clusters"
    assert route.weighted_clusters == (model.WeightedCluster("api", 9), model.WeightedCluster("canary", 1))
    assert route.request_headers == model.HeaderRewrite(add=(("x-added", "3"),), set=(("x-set", "v"),), remove=("x-gone",))
    assert route.response_headers == model.HeaderRewrite(remove=("server",))
    assert route.host_rewrite == "backend.internal:8080"


def test_tab_is_allowed_in_header_values():
    route = build_route({"match": {}, "cluster": "api", "request_headers": {"set": {"x-a": "a\tb"}}})
    assert route.request_headers.set == (("x-a", "a\tb"),)


# --- what listeners need of their tables


def test_tcp_listener_without_catch_all_is_refused():
    doc = copy.deepcopy(BASE)
    doc["listeners"]["out"]["protocol"] = "tcp"
    doc["route_tables"]["out"] = [{"match": {"host": "a.example"}, "cluster": "orig"}]
    assert "which a tcp listener needs" in errors_of(doc)["listeners.out.routes"]


def test_catch_all_must_send_to_a_cluster_for_tcp():
    doc = copy.deepcopy(BASE)
    doc["listeners"]["out"]["protocol"] = "tcp"
    doc["route_tables"]["out"] = [{"match": {}, "direct_response": {"status": 404}}]
    assert "no catch-all route (match: {}) that sends to a cluster" in errors_of(doc)["listeners.out.routes"]
    # A forwarding catch-all after it serves TCP; HTTP still gets the direct response.
    doc["route_tables"]["out"].append({"match": {}, "cluster": "orig"})
    config = load.build(doc)
    assert config.tcp_route("out").name == "out[1]"


def test_auto_transparent_listener_without_catch_all_is_accepted():
    doc = copy.deepcopy(BASE)
    doc["route_tables"]["out"] = [{"match": {"host": "api.example"}, "cluster": "api"}]
    config = load.build(doc)
    assert config.tcp_route("out") is None
    assert config.catch_all_cluster("out") is model.PASSTHROUGH
    assert model.PASSTHROUGH.original_destination and model.PASSTHROUGH.name == "passthrough"


def test_auto_listener_that_is_not_transparent_needs_a_catch_all():
    doc = copy.deepcopy(BASE)
    doc["listeners"]["web"]["protocol"] = "auto"
    assert "non-transparent auto listener" in errors_of(doc)["listeners.web.routes"]


def test_http_listener_needs_no_catch_all():
    config = load.build(BASE)
    assert config.listeners["web"].protocol == "http" and config.tcp_route("web") is None


def test_original_destination_on_a_non_transparent_listener_is_refused_in_any_route():
    doc = copy.deepcopy(BASE)
    doc["route_tables"]["web"] = [
        {"match": {"path": "/a"}, "cluster": "api"},
        {"match": {"path": "/b"}, "weighted_clusters": [{"cluster": "api", "weight": 1}, {"cluster": "orig", "weight": 1}]},
    ]
    error = errors_of(doc)["listeners.web.routes"]
    assert "route 'web[1]' sends to original_destination cluster 'orig'" in error and "not transparent" in error


def test_weighted_catch_all_serves_tcp_but_has_no_single_cluster():
    doc = copy.deepcopy(BASE)
    doc["listeners"]["out"]["protocol"] = "tcp"
    doc["route_tables"]["out"] = [{"match": {}, "weighted_clusters": [{"cluster": "api", "weight": 1},
                                                                      {"cluster": "orig", "weight": 1}]}]
    config = load.build(doc)
    assert config.tcp_route("out").action == "weighted_clusters"
    assert config.catch_all_cluster("out") is None


def test_catch_all_cluster_still_names_the_cluster():
    config = load.build(BASE)
    assert config.catch_all_cluster("out").name == "orig"


# --- round trip


FULL = {
    "version": 1,
    "node": {"id": "n1"},
    "listeners": {
        "out": {"address": "0.0.0.0", "port": 15001, "transparent": True, "protocol": "auto", "routes": "out",
                "http": {"codec": "httptools", "max_request_header_bytes": "16KiB", "max_request_headers": 50,
                         "max_uri_length": 2048, "request_header_timeout": "2500ms", "x_forwarded_for": False,
                         "x_forwarded_proto": False, "request_id": False}},
        "web": {"address": "127.0.0.1", "port": 18080, "protocol": "http", "routes": "web"},
        "raw": {"address": "127.0.0.1", "port": 18081, "protocol": "tcp", "routes": "web"},
    },
    "clusters": {
        "orig": {"original_destination": True, "pool": {"max_idle_per_endpoint": 0}},
        "api": {"endpoints": ["10.0.0.1:8080"], "pool": {"max_idle_per_endpoint": 8, "idle_timeout": "1500ms"}},
        "canary": {"endpoints": ["10.0.0.2:8080"]},
    },
    "route_tables": {
        "out": [
            {"match": {"host": "*.example.com", "path": "/exact", "method": "DELETE"}, "cluster": "orig",
             "timeout": "0s"},
            {"match": {}, "cluster": "orig"},
        ],
        "web": [
            {"name": "api", "match": {"host": ["API.example.com:8080", "[::1]"], "path_prefix": "/api/",
                                      "method": ["GET", "POST"],
                                      "headers": [{"name": "X-Env", "exact": "prod"},
                                                  {"name": "x-trace", "prefix": "00-", "invert": True},
                                                  {"name": "ua", "regex": "curl/.*"},
                                                  {"name": "x-debug", "present": True}]},
             "weighted_clusters": [{"cluster": "api", "weight": 95}, {"cluster": "canary", "weight": 5}],
             "request_headers": {"add": {"x-a": "1"}, "set": {"x-b": "2"}, "remove": ["x-c"]},
             "response_headers": {"add": {"x-d": "4"}, "set": {"x-e": "5"}, "remove": ["server"]},
             "host_rewrite": "backend:8080", "timeout": "3s"},
            {"match": {"path_regex": "^/old/(.*)$"},
             "redirect": {"status": 308, "scheme": "https", "host": "new.example", "port": 8443, "path": "/new",
                          "strip_query": True}},
            {"match": {"path": "/healthz"}, "direct_response": {"status": 200, "body": "ok\n",
                                                                 "content_type": "text/plain; charset=utf-8"},
             "response_headers": {"set": {"cache-control": "no-store"}}},
            {"match": {}, "cluster": "api"},
        ],
    },
}


def test_every_new_key_round_trips_through_the_dump():
    config = load.build(FULL)
    doc = to_document(config)
    assert load.build(doc) == config
    web = doc["route_tables"]["web"]
    assert web[0]["match"]["host"] == ["api.example.com:8080", "[::1]"]
    assert web[1]["redirect"] == {"status": 308, "strip_query": True, "scheme": "https", "host": "new.example",
                                  "port": 8443, "path": "/new"}
    assert "timeout" not in web[2] and web[3]["timeout"] == "15s"
    assert doc["route_tables"]["out"][0]["timeout"] == "0s"
    assert [r["name"] for r in doc["route_tables"]["out"]] == ["out[0]", "out[1]"]


def test_dump_fills_in_http_and_pool_defaults():
    doc = to_document(load.build(FULL))
    assert doc["listeners"]["web"]["http"] == {
        "codec": "auto", "max_request_header_bytes": 61440, "max_request_headers": 100, "max_uri_length": 8192,
        "request_header_timeout": "10s", "x_forwarded_for": True, "x_forwarded_proto": True, "request_id": True}
    assert doc["listeners"]["out"]["http"]["request_header_timeout"] == "2500ms"
    assert "http" not in doc["listeners"]["raw"]
    assert doc["clusters"]["canary"]["pool"] == {"max_idle_per_endpoint": 1024, "idle_timeout": "4s"}
    assert doc["clusters"]["api"]["pool"] == {"max_idle_per_endpoint": 8, "idle_timeout": "1500ms"}

"""mTLS config: the top-level tls section, listeners.X.tls, clusters.X.tls, route authorization, rate_limit key."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from sidecar_proxy.config import load, model
from sidecar_proxy.config.dump import to_document
from sidecar_proxy.config.load import ConfigError
from sidecar_proxy.control import protocol

REPO = Path(__file__).resolve().parents[2]
IDENTITY = {"cert_chain": "/certs/cert.pem", "private_key": "/certs/key.pem", "trust_bundle": "/certs/ca.pem"}
BASE = {
    "version": 1,
    "node": {"id": "n1"},
    "tls": IDENTITY,
    "listeners": {"web": {"address": "127.0.0.1", "port": 18080, "protocol": "http", "routes": "web"}},
    "clusters": {"api": {"endpoints": ["10.0.0.1:8080"]}},
    "route_tables": {"web": [{"match": {}, "cluster": "api"}]},
}
L, C, R = "listeners.web", "clusters.api", "route_tables.web[0]"
MUTUAL = {"mode": "mutual", "peer_identity": ["spiffe://td/ns/a/sa/api"]}


def doc_with(tls=..., listener=None, cluster=None, route=None) -> dict:
    """BASE with the top-level tls replaced (None: removed) and keys added to the listener, cluster, route."""
    doc = copy.deepcopy(BASE)
    if tls is None:
        del doc["tls"]
    elif tls is not ...:
        doc["tls"] = tls
    doc["listeners"]["web"].update(listener or {})
    doc["clusters"]["api"].update(cluster or {})
    doc["route_tables"]["web"][0].update(route or {})
    return doc


def errors_of(doc) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load.build(doc)
    return info.value.errors


# --- defaults


def test_defaults_when_absent():
    config = load.build(doc_with(tls=None))
    assert config.tls is None
    assert config.listeners["web"].tls == model.ListenerTls() and model.ListenerTls().mode == "disable"
    assert config.clusters["api"].tls == model.ClusterTls()
    assert (model.ClusterTls().mode, model.ClusterTls().peer_identity, model.ClusterTls().sni) == ("disable", (), None)
    assert config.route_tables["web"][0].authorization is None


def test_identity_defaults_and_values():
    assert load.build(BASE).tls == model.TlsIdentity("/certs/cert.pem", "/certs/key.pem", "/certs/ca.pem",
                                                     poll_interval=1.0, handshake_timeout=10.0)
    config = load.build(doc_with(tls={**IDENTITY, "poll_interval": "100ms", "handshake_timeout": "60s"}))
    assert (config.tls.poll_interval, config.tls.handshake_timeout) == (0.1, 60.0)


def test_empty_sections_are_the_defaults():
    config = load.build(doc_with(listener={"tls": {}}, cluster={"tls": {}}))
    assert config.listeners["web"].tls == model.ListenerTls() and config.clusters["api"].tls == model.ClusterTls()


@pytest.mark.parametrize("mode", model.TLS_LISTENER_MODES)
def test_every_listener_mode(mode):
    assert load.build(doc_with(listener={"tls": {"mode": mode}})).listeners["web"].tls.mode == mode


def test_mutual_cluster():
    tls = load.build(doc_with(cluster={"tls": {**MUTUAL, "sni": "API.Example.com"}})).clusters["api"].tls
    assert tls == model.ClusterTls(mode="mutual", peer_identity=("spiffe://td/ns/a/sa/api",), sni="api.example.com")


def test_peer_identity_may_be_one_string_and_patterns():
    tls = load.build(doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": "spiffe://td/ns/a/*"}})).clusters
    assert tls["api"].tls.peer_identity == ("spiffe://td/ns/a/*",)
    many = ["*", "spiffe://td/sa/web-*", "spiffe://td", "spiffe://td/sa/web-*"]
    tls = load.build(doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": many}})).clusters["api"].tls
    assert tls.peer_identity == ("*", "spiffe://td/sa/web-*", "spiffe://td")   # a repeat is dropped


@pytest.mark.parametrize("route", [
    {"match": {}, "cluster": "api"},
    {"match": {}, "weighted_clusters": [{"cluster": "api", "weight": 1}]},
    {"match": {}, "direct_response": {"status": 200}},
    {"match": {}, "redirect": {"host": "b.example"}},
])
def test_authorization_on_every_route_kind(route):
    doc = copy.deepcopy(BASE)
    doc["route_tables"]["web"] = [{**route, "authorization": {"allow_identities": ["spiffe://td/ns/a/*", "*"]}}]
    authorization = load.build(doc).route_tables["web"][0].authorization
    assert authorization == model.Authorization(allow_identities=("spiffe://td/ns/a/*", "*"))


def test_rate_limit_key_peer_identity():
    route = load.build(doc_with(route={"rate_limit": {"requests_per_second": 5, "key": "peer_identity"}}))
    assert route.route_tables["web"][0].rate_limit.key == "peer_identity"


def test_authorization_and_a_peer_identity_key_need_no_identity_of_the_listener():
    """A route table may serve a plaintext listener too; a client without an identity is refused at run time."""
    config = load.build(doc_with(tls=None, route={"authorization": {"allow_identities": ["*"]},
                                                  "rate_limit": {"requests_per_second": 1, "key": "peer_identity"}}))
    assert config.route_tables["web"][0].authorization.allow_identities == ("*",)


# --- errors


@pytest.mark.parametrize("doc,path,message", [
    # top-level tls
    (doc_with(tls="/certs"), "tls", "must be a mapping with cert_chain, private_key, trust_bundle, got a string"),
    (doc_with(tls={}), "tls.cert_chain", "is required"),
    (doc_with(tls={**IDENTITY, "private_key": None}), "tls.private_key", "is required"),
    (doc_with(tls={**IDENTITY, "trust_bundle": "ca.pem"}), "tls.trust_bundle", "must be an absolute path"),
    (doc_with(tls={**IDENTITY, "cert_chain": 1}), "tls.cert_chain", "must be a string, got a number"),
    (doc_with(tls={**IDENTITY, "cert_chan": "/c"}), "tls.cert_chan", "unknown key (did you mean 'cert_chain'?)"),
    (doc_with(tls={**IDENTITY, "cert": "/c"}), "tls.cert",
     "unknown key; allowed: cert_chain, handshake_timeout, poll_interval, private_key, trust_bundle"),
    (doc_with(tls={**IDENTITY, "poll_interval": "50ms"}), "tls.poll_interval",
     "must be at least 100ms and at most 60s"),
    (doc_with(tls={**IDENTITY, "poll_interval": "61s"}), "tls.poll_interval", "must be at least 100ms and at most 60s"),
    (doc_with(tls={**IDENTITY, "poll_interval": 1}), "tls.poll_interval",
     "must be a duration string with a unit such as '250ms' or '1s', got a number"),
    (doc_with(tls={**IDENTITY, "handshake_timeout": "0s"}), "tls.handshake_timeout",
     "must be greater than 0 and at most 60s"),
    (doc_with(tls={**IDENTITY, "handshake_timeout": "2m"}), "tls.handshake_timeout",
     "must be greater than 0 and at most 60s"),
    # listeners.X.tls
    (doc_with(listener={"tls": "strict"}), f"{L}.tls", "must be a mapping with 'mode', got a string"),
    (doc_with(listener={"tls": {"mode": "mutual"}}), f"{L}.tls.mode",
     "'mutual' is not a mode (one of: disable, permissive, strict)"),
    (doc_with(listener={"tls": {"mode": True}}), f"{L}.tls.mode", "must be a string, got a boolean"),
    (doc_with(listener={"tls": {"mod": "strict"}}), f"{L}.tls.mod", "unknown key (did you mean 'mode'?)"),
    (doc_with(tls=None, listener={"tls": {"mode": "strict"}}), f"{L}.tls.mode",
     "needs the top-level tls section (the workload certificate)"),
    (doc_with(tls=None, listener={"tls": {"mode": "permissive"}}), f"{L}.tls.mode",
     "needs the top-level tls section (the workload certificate)"),
    # clusters.X.tls
    (doc_with(cluster={"tls": []}), f"{C}.tls", "must be a mapping with 'mode', got a list"),
    (doc_with(cluster={"tls": {"mode": "strict"}}), f"{C}.tls.mode",
     "'strict' is not a mode (one of: disable, mutual)"),
    (doc_with(tls=None, cluster={"tls": MUTUAL}), f"{C}.tls.mode",
     "needs the top-level tls section (the workload certificate)"),
    (doc_with(cluster={"tls": {"mode": "mutual"}}), f"{C}.tls.peer_identity",
     "is required with mode: mutual (the SPIFFE IDs the server may present; the trust bundle alone would accept "
     "any workload)"),
    (doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": []}}), f"{C}.tls.peer_identity",
     "must be a SPIFFE ID or pattern, or a non-empty list of them, got an empty list"),
    (doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": {"id": "spiffe://td/a"}}}), f"{C}.tls.peer_identity",
     "must be a SPIFFE ID or pattern, or a non-empty list of them, got a mapping"),
    (doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": ["spiffe://td/a", "td/b"]}}),
     f"{C}.tls.peer_identity[1]", "not a valid SPIFFE ID: not a spiffe:// URI: 'td/b'"),
    (doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": [7]}}), f"{C}.tls.peer_identity[0]",
     "must be a string, got a number"),
    (doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": "spiffe://td*"}}), f"{C}.tls.peer_identity",
     "a '*' must follow the whole trust domain and a '/', e.g. 'spiffe://example.org/*' or "
     "'spiffe://example.org/ns/prod/*'"),
    (doc_with(cluster={"tls": {"mode": "mutual", "peer_identity": ["spiffe://Td/a"]}}), f"{C}.tls.peer_identity[0]",
     "not a valid SPIFFE ID: the trust domain must be lower case, got 'Td'"),
    (doc_with(cluster={"tls": {"peer_identity": ["spiffe://td/a"]}}), f"{C}.tls.peer_identity",
     "applies only with mode: mutual"),
    (doc_with(cluster={"tls": {"mode": "disable", "sni": "api.example"}}), f"{C}.tls.sni",
     "applies only with mode: mutual"),
    (doc_with(cluster={"tls": {**MUTUAL, "sni": "api.example:443"}}), f"{C}.tls.sni", "must not have a port"),
    (doc_with(cluster={"tls": {**MUTUAL, "sni": "10.0.0.1"}}), f"{C}.tls.sni",
     "'10.0.0.1' is an IP address; server_name carries DNS names only"),
    (doc_with(cluster={"tls": {**MUTUAL, "sni": "[::1]"}}), f"{C}.tls.sni",
     "'[::1]' is an IP address; server_name carries DNS names only"),
    (doc_with(cluster={"tls": {**MUTUAL, "sni": "a b"}}), f"{C}.tls.sni", "'a b' is not a host name or IP address"),
    (doc_with(cluster={"tls": {**MUTUAL, "sni": ""}}), f"{C}.tls.sni", "'' is not a host name or IP address"),
    (doc_with(cluster={"tls": {**MUTUAL, "peer_identities": "x"}}), f"{C}.tls.peer_identities",
     "unknown key (did you mean 'peer_identity'?)"),
    # route_tables.T[i].authorization
    (doc_with(route={"authorization": ["*"]}), f"{R}.authorization",
     "must be a mapping with 'allow_identities', got a list"),
    (doc_with(route={"authorization": {}}), f"{R}.authorization.allow_identities", "is required"),
    (doc_with(route={"authorization": {"allow_identities": []}}), f"{R}.authorization.allow_identities",
     "must be a non-empty list of SPIFFE IDs or patterns, got an empty list"),
    (doc_with(route={"authorization": {"allow_identities": "spiffe://td/a"}}), f"{R}.authorization.allow_identities",
     "must be a non-empty list of SPIFFE IDs or patterns, got a string"),
    (doc_with(route={"authorization": {"allow_identities": ["spiffe://td/a*/b"]}}),
     f"{R}.authorization.allow_identities[0]", "'*' may only be the last character"),
    (doc_with(route={"authorization": {"allow_identities": ["*"], "deny": []}}), f"{R}.authorization.deny",
     "unknown key; allowed: allow_identities"),
    # rate_limit.key
    (doc_with(route={"rate_limit": {"requests_per_second": 1, "key": "peer"}}), f"{R}.rate_limit.key",
     "'peer' is not a rate limit key: 'client_ip', 'peer_identity' or 'header:<field name>'"),
])
def test_each_error_has_its_exact_path_and_message(doc, path, message):
    assert (path, message) in errors_of(doc)


def test_a_broken_identity_section_is_reported_once_not_at_every_user():
    errors = errors_of(doc_with(tls={"cert_chain": "cert.pem"}, listener={"tls": {"mode": "strict"}},
                                cluster={"tls": MUTUAL}))
    assert {p for p, _ in errors} == {"tls.cert_chain", "tls.private_key", "tls.trust_bundle"}


def test_a_null_identity_section_is_no_identity():
    doc = doc_with(listener={"tls": {"mode": "strict"}})
    doc["tls"] = None
    assert errors_of(doc) == [(f"{L}.tls.mode", "needs the top-level tls section (the workload certificate)")]


def test_every_error_at_once():
    doc = doc_with(tls=None, listener={"tls": {"mode": "strict"}}, cluster={"tls": {"mode": "mutual", "sni": "a:1"}},
                   route={"authorization": {"allow_identities": []}})
    assert [p for p, _ in errors_of(doc)] == [f"{L}.tls.mode", f"{C}.tls.sni", f"{C}.tls.mode",
                                              f"{C}.tls.peer_identity", f"{R}.authorization.allow_identities"]


# --- with a control section


def test_served_resources_use_the_identity_of_the_bootstrap():
    bootstrap = {"version": 1, "node": {"id": "n"}, "control": {"server": "http://127.0.0.1:15010"}, "tls": IDENTITY}
    resources = {
        "listeners": [{"name": "in", "address": "0.0.0.0", "port": 15006, "protocol": "http", "routes": "main",
                       "tls": {"mode": "strict"}}],
        "routes": [{"name": "main", "routes": [{"match": {}, "cluster": "app",
                                                "authorization": {"allow_identities": ["spiffe://td/*"]}}]}],
        "clusters": [{"name": "app", "tls": {"mode": "mutual", "peer_identity": "spiffe://td/app"}}],
        "endpoints": [{"cluster_name": "app", "endpoints": ["127.0.0.1:8080"]}],
    }
    doc, problems = protocol.merge(bootstrap, resources)
    config = load.build(doc)
    assert problems == [] and config.tls.cert_chain == "/certs/cert.pem"
    assert config.listeners["in"].tls.mode == "strict" and config.clusters["app"].tls.mode == "mutual"
    assert load.build(to_document(config)) == config

    del bootstrap["tls"]
    doc, _ = protocol.merge(bootstrap, resources)
    assert {p for p, _ in errors_of(doc)} == {"listeners.in.tls.mode", "clusters.app.tls.mode"}


# --- the dump


def test_dump_shape_and_round_trip():
    doc = doc_with(tls={**IDENTITY, "poll_interval": "250ms"}, listener={"tls": {"mode": "permissive"}},
                   cluster={"tls": {**MUTUAL, "sni": "API.example"}},
                   route={"authorization": {"allow_identities": ["spiffe://td/ns/a/*"]},
                          "rate_limit": {"requests_per_second": 2, "key": "peer_identity"}})
    doc["clusters"]["plain"] = {"endpoints": ["10.0.0.2:80"], "tls": {"mode": "mutual",
                                                                       "peer_identity": "spiffe://td/p"}}
    config = load.build(doc)
    dumped = to_document(config)
    assert dumped["tls"] == {**IDENTITY, "poll_interval": "250ms", "handshake_timeout": "10s"}
    assert dumped["listeners"]["web"]["tls"] == {"mode": "permissive"}
    assert dumped["clusters"]["api"]["tls"] == {"mode": "mutual", "peer_identity": ["spiffe://td/ns/a/sa/api"],
                                                "sni": "api.example"}
    assert dumped["clusters"]["plain"]["tls"] == {"mode": "mutual", "peer_identity": ["spiffe://td/p"]}
    route = dumped["route_tables"]["web"][0]
    assert route["authorization"] == {"allow_identities": ["spiffe://td/ns/a/*"]}
    assert route["rate_limit"]["key"] == "peer_identity"
    assert load.build(dumped) == config
    assert load.load_text(yaml.safe_dump(dumped)) == config
    assert load.load_text(json.dumps(dumped)) == config


def test_dump_leaves_out_what_is_absent_or_the_default():
    config = load.build(doc_with(tls=None, listener={"tls": {"mode": "disable"}}, cluster={"tls": {}}))
    dumped = to_document(config)
    assert "tls" not in dumped and "tls" not in dumped["listeners"]["web"] and "tls" not in dumped["clusters"]["api"]
    assert "authorization" not in dumped["route_tables"]["web"][0]
    assert load.build(dumped) == config


# --- the full example


def test_the_full_example_carries_every_new_key_and_loads():
    raw = yaml.safe_load((REPO / "config" / "example-full.yaml").read_text())
    assert set(raw["tls"]) == set(model.TlsIdentity.__slots__)
    assert set(raw["clusters"]["payments"]["tls"]) == set(model.ClusterTls.__slots__)
    assert set(raw["listeners"]["inbound"]["tls"]) == set(model.ListenerTls.__slots__)
    config = load.build(raw)   # everything is served, telemetry included
    assert config.tls == model.TlsIdentity("/var/run/sidecar/certs/cert.pem", "/var/run/sidecar/certs/key.pem",
                                           "/var/run/sidecar/certs/ca.pem")
    assert config.listeners["inbound"].tls.mode == "permissive"
    payments = config.clusters["payments"].tls
    assert payments.mode == "mutual" and len(payments.peer_identity) == 2
    assert payments.sni == "payments.shop.svc.cluster.local"
    inbound = config.route_tables["inbound"][0]
    assert inbound.authorization.allow_identities == ("spiffe://mesh.local/ns/shop/sa/*",)
    assert inbound.rate_limit.key == "peer_identity"
    assert load.build(to_document(config)) == config

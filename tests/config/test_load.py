import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar_proxy.config import load, model
from sidecar_proxy.config.dump import format_duration, to_document
from sidecar_proxy.config.load import ConfigError, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]

BASE = {
    "version": 1,
    "node": {"id": "n1"},
    "admin": {"address": "127.0.0.1", "port": 15000},
    "listeners": {
        "out": {"address": "0.0.0.0", "port": 15001, "transparent": True, "protocol": "tcp", "routes": "od"},
        "local": {"address": "127.0.0.1", "port": 18080, "routes": "app"},
    },
    "clusters": {
        "orig": {"original_destination": True},
        "payments": {"endpoints": ["10.0.3.4:8080", {"address": "10.0.3.5:8080", "weight": 2}],
                     "connect_timeout": "250ms"},
    },
    "route_tables": {"od": [{"match": {}, "cluster": "orig"}], "app": [{"match": {}, "cluster": "payments"}]},
}


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load.build(doc)
    return dict(info.value.errors)


def mutated(**paths):
    """BASE with dotted paths set (value None deletes the key)."""
    doc = copy.deepcopy(BASE)
    for dotted, value in paths.items():
        keys = dotted.split("__")
        target = doc
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = int(keys[-1]) if isinstance(target, list) else keys[-1]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return doc


def test_valid_document_builds_frozen_model():
    config = load.build(BASE)
    assert config.listeners["out"].transparent is True
    assert config.listeners["local"].protocol == "tcp"
    payments = config.clusters["payments"]
    assert payments.connect_timeout == pytest.approx(0.25)
    assert [(e.host, e.port, e.weight) for e in payments.endpoints] == [("10.0.3.4", 8080, 1), ("10.0.3.5", 8080, 2)]
    assert config.catch_all_cluster("od").original_destination
    assert config.tcp_route("local").cluster == "payments" and config.tcp_route("local").name == "app[0]"
    with pytest.raises(AttributeError):
        config.listeners["out"].port = 1
    with pytest.raises(TypeError):
        config.listeners["new"] = config.listeners["out"]


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("250ms", 0.25), ("1.5s", 1.5), ("2m", 120.0),
                                          ("1h", 3600.0), ("100us", 1e-4), (" 3 s ", 3.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", [250, "250", "1 sec", "-1s", "", True, None, "1s2"])
def test_bad_durations_name_the_fix(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("text,size", [(4096, 4096), ("64KiB", 65536), ("1MiB", 1 << 20), ("2KB", 2000)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("doc,path,fragment", [
    (mutated(clusters__payments__endpoints__1__address="10.0.3.5:99999"),
     "clusters.payments.endpoints[1].address", "port must be 1..65535"),
    (mutated(clusters__payments__endpoints__0="10.0.3.4"), "clusters.payments.endpoints[0]", "not host:port"),
    (mutated(clusters__payments__endpoints__0="::1:80"), "clusters.payments.endpoints[0]", "[addr]:port"),
    (mutated(listeners__out__port=0), "listeners.out.port", "port must be 1..65535"),
    (mutated(listeners__out__port=True), "listeners.out.port", "must be a number, got a boolean"),
    (mutated(listeners__out__address="localhost"), "listeners.out.address", "not an IP address"),
    (mutated(listeners__out__adress="0.0.0.0"), "listeners.out.adress", "did you mean 'address'"),
    (mutated(listeners__out__http={"codec": "h11"}), "listeners.out.http", "only to listeners with protocol auto"),
    (mutated(listeners__out__protocol="quic"), "listeners.out.protocol", "not a protocol"),
    (mutated(listeners__out__routes="odd"), "listeners.out.routes", "did you mean 'od'"),
    (mutated(listeners__out__idle_timeout="0s"), "listeners.out.idle_timeout", "greater than zero"),
    (mutated(listeners__out__buffer_limit="1KiB"), "listeners.out.buffer_limit", "4KiB..256MiB"),
    (mutated(listeners__local__routes="od"), "listeners.local.routes", "not transparent"),
    (mutated(listeners__local__interception="tproxy"), "listeners.local.interception", "needs transparent: true"),
    (mutated(listeners__out__interception="nat"), "listeners.out.interception", "not an interception mode"),
    (mutated(listeners__local__port=15000), "listeners.local.port", "overlaps admin"),
    (mutated(listeners__local__port=15001), "listeners.local.port", "overlaps listeners.out"),
    (mutated(clusters__payments__connect_timeout=1), "clusters.payments.connect_timeout", "with a unit"),
    (mutated(clusters__payments__lb="fastest"), "clusters.payments.lb", "not a load balancing policy (one of: "),
    (mutated(clusters__payments__endpoints=[]), "clusters.payments", "needs endpoints"),
    (mutated(clusters__orig__endpoints=["1.2.3.4:80"]), "clusters.orig.endpoints", "must be empty"),
    (mutated(clusters__payments__tls={"mode": "mutual", "peer_identity": "spiffe://td/p"}),
     "clusters.payments.tls.mode", "needs the top-level tls section"),
    (mutated(route_tables__app__0__cluster="paymens"), "route_tables.app[0].cluster", "did you mean 'payments'"),
    (mutated(route_tables__app__0__retry={"attempts": 0}), "route_tables.app[0].retry.attempts", "must be 1..10"),
    (mutated(route_tables__app=[{"cluster": "payments"}]), "route_tables.app[0].match", "is required"),
    (mutated(route_tables__app=[]), "route_tables.app", "non-empty list"),
    (mutated(node=None), "node", "is required"),
    (mutated(node__id=""), "node.id", "must not be empty"),
    (mutated(node__identity="mesh/checkout"), "node.identity", "spiffe://"),
    (mutated(version=2), "version", "unsupported schema version 2"),
    (mutated(telemetry={"tracing": {"sampling": 2}}), "telemetry.tracing.sampling", "ratio 0..1"),
    (mutated(telemetry={"metrics": {"port": 15000, "address": "127.0.0.1"}}), "telemetry.metrics.port",
     "overlaps admin"),
    (mutated(colour="blue"), "colour", "unknown key"),
    (mutated(control={"server": "https://cp:443"}), "control.server", "is not http://host:port"),
    (mutated(control={"server": "http://cp:15010", "cache": "rel.json"}), "control.cache", "absolute path"),
    (mutated(control={"server": "http://cp:15010", "backoff_max": "0s"}), "control.backoff_max", "greater than zero"),
    (mutated(control={}), "control.server", "is required"),
    (mutated(listeners={"bad name!": BASE["listeners"]["out"]}), "listeners.bad name!", "must be 1-63 characters"),
])
def test_each_error_names_its_path(doc, path, fragment):
    errors = errors_of(doc)
    assert path in errors, errors
    assert fragment in errors[path]


def test_every_error_is_reported_in_one_pass():
    doc = mutated(listeners__out__port=70000, listeners__out__routes="nope",
                  clusters__payments__connect_timeout="soon", route_tables__app__0__cluster="x")
    errors = errors_of(doc)
    assert {"listeners.out.port", "listeners.out.routes", "clusters.payments.connect_timeout",
            "route_tables.app[0].cluster"} <= set(errors)


def test_ipv4_and_ipv6_wildcards_on_one_port_do_not_conflict():
    doc = mutated(listeners__out6={"address": "::", "port": 15001, "transparent": True, "routes": "od"})
    assert set(load.build(doc).listeners) == {"out", "out6", "local"}


def test_tcp_listener_needs_a_catch_all_route():
    # (tests/config/test_routes.py covers the auto and http listeners.)
    doc = mutated(route_tables__app=[{"match": {"path": "/x"}, "cluster": "payments"}])
    assert "no catch-all route" in errors_of(doc)["listeners.local.routes"]


@pytest.mark.parametrize("text,fragment", [
    ("a: 1\na: 2\n", "duplicate key 'a'"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("listeners: [\n", "invalid YAML: line"),
    ('{"version": 1,', "invalid JSON"),
    ("- 1\n- 2\n", "mapping at the top level"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_syntax_errors_are_config_errors(text, fragment):
    with pytest.raises(ConfigError) as info:
        load.load_text(text)
    assert fragment in str(info.value)


def test_oversized_document_is_refused():
    with pytest.raises(ConfigError, match="larger than"):
        load.load_text("#" * (load.MAX_DOCUMENT_BYTES + 1))


def test_json_and_yaml_give_the_same_config():
    assert load.load_text(json.dumps(BASE)) == load.load_text(yaml.safe_dump(BASE))


def test_dump_round_trips_with_defaults_filled():
    config = load.build(BASE)
    doc = to_document(config)
    assert doc["listeners"]["out"]["idle_timeout"] == "1h"
    assert doc["listeners"]["out"]["buffer_limit"] == 1 << 20
    assert load.build(doc) == config


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "config").glob("*.yaml") if p.name != "example-full.yaml"),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load.load_file(path)


def test_every_key_of_the_full_contract_is_known_to_the_validator():
    # Nothing is left for a later release: the whole contract loads, and its dump loads back the same.
    config = load.load_file(REPO / "config" / "example-full.yaml")
    assert load.build(to_document(config)) == config


def test_validate_cli_prints_ok_or_every_error(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    run = subprocess.run([sys.executable, "-m", "sidecar_proxy", "validate", "--config", str(good)],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert (run.returncode, run.stdout.strip()) == (0, "OK")

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(mutated(clusters__payments__endpoints__1__address="10.0.3.5:0",
                                          listeners__out__port=-1)))
    run = subprocess.run([sys.executable, "-m", "sidecar_proxy", "validate", "--config", str(bad)],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert run.returncode == 1
    assert "clusters.payments.endpoints[1].address: port must be 1..65535" in run.stderr
    assert "listeners.out.port: port must be 1..65535" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout

    missing = subprocess.run([sys.executable, "-m", "sidecar_proxy", "validate", "--config", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=30, cwd=REPO)
    assert missing.returncode == 1 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr


def test_a_bootstrap_with_control_may_leave_out_what_the_server_provides():
    config = load.build({"version": 1, "node": {"id": "n"},
                         "control": {"server": "http://127.0.0.1:15010", "initial_fetch_timeout": "2s"}})
    assert config.listeners == {} and config.control.port == 15010
    assert config.control.initial_fetch_timeout == 2.0 and config.control.backoff_max == 10.0
    assert load.build(to_document(config)) == config


def test_the_full_contract_builds_once_the_planned_keys_are_left_out():
    doc = yaml.safe_load((REPO / "config" / "example-full.yaml").read_text())
    del doc["telemetry"]
    config = load.build(doc)
    first = config.route_tables["outbound"][0]
    assert first.name == "payments-api" and first.action == "weighted_clusters"
    assert first.rate_limit == model.RateLimit(requests_per_second=200.0, burst=50)
    assert config.route_tables["outbound"][1].direct_response.body == "ok\n"
    assert config.listeners["local"].protocol == "http" and config.tcp_route("local") is None
    assert load.build(to_document(config)) == config

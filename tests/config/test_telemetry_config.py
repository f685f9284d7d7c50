"""The top-level telemetry section: metrics, access_log, tracing."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from sidecar_proxy.config import load, model
from sidecar_proxy.config.dump import to_document
from sidecar_proxy.config.load import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASE = {
    "version": 1,
    "node": {"id": "n1"},
    "listeners": {"web": {"address": "127.0.0.1", "port": 18080, "protocol": "http", "routes": "web"}},
    "clusters": {"api": {"endpoints": ["10.0.0.1:8080"]}},
    "route_tables": {"web": [{"match": {}, "cluster": "api"}]},
}


def with_telemetry(telemetry) -> dict:
    doc = copy.deepcopy(BASE)
    doc["telemetry"] = telemetry
    return doc


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load.build(doc)
    return dict(info.value.errors)


def test_defaults_when_absent():
    t = load.build(BASE).telemetry
    assert t == model.Telemetry()
    assert (t.metrics.enabled, t.metrics.port, t.metrics.address) == (True, 15090, "0.0.0.0")
    assert (t.access_log.enabled, t.access_log.format) == (True, "text")
    # Tracing is off; its keys are left to the OTEL_* environment (None) unless written.
    assert t.tracing == model.TracingOptions(enabled=False, sampling=None, endpoint=None, max_queue_size=None,
                                             service_name=None)


def test_empty_sections_mean_defaults():
    assert load.build(with_telemetry({})).telemetry == model.Telemetry()
    assert load.build(with_telemetry({"metrics": {}, "access_log": {}, "tracing": {}})).telemetry == model.Telemetry()
    assert load.build(with_telemetry(None)).telemetry == model.Telemetry()


def test_every_key_is_read():
    t = load.build(with_telemetry({
        "metrics": {"enabled": False, "port": 0, "address": "::"},
        "access_log": {"enabled": False, "format": "json"},
        "tracing": {"enabled": True, "sampling": 1, "endpoint": "https://otel.example:4318/custom/traces",
                    "max_queue_size": 10, "service_name": "checkout"},
    })).telemetry
    assert t.metrics == model.MetricsOptions(enabled=False, port=0, address="::")
    assert t.access_log == model.AccessLogOptions(enabled=False, format="json")
    assert t.tracing == model.TracingOptions(enabled=True, sampling=1.0, endpoint="https://otel.example:4318/custom/traces",
                                             max_queue_size=10, service_name="checkout")
    assert isinstance(t.tracing.sampling, float)


@pytest.mark.parametrize("endpoint,expected", [
    ("http://collector:4318", "http://collector:4318/v1/traces"),
    ("http://collector:4318/", "http://collector:4318/v1/traces"),
    ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
    ("https://[::1]/otlp/v1/traces", "https://[::1]/otlp/v1/traces"),
])
def test_an_endpoint_without_a_path_gets_the_traces_path(endpoint, expected):
    assert load.build(with_telemetry({"tracing": {"endpoint": endpoint}})).telemetry.tracing.endpoint == expected


T = "telemetry"


@pytest.mark.parametrize("telemetry,path,fragment", [
    ("on", T, "must be a mapping"),
    ({"metric": {}}, f"{T}.metric", "did you mean 'metrics'"),
    ({"metrics": []}, f"{T}.metrics", "must be a mapping"),
    ({"metrics": {"port": 70000}}, f"{T}.metrics.port", "0..65535"),
    ({"metrics": {"port": "15090"}}, f"{T}.metrics.port", "must be a number"),
    ({"metrics": {"address": "localhost"}}, f"{T}.metrics.address", "not an IP address"),
    ({"metrics": {"enabled": "yes"}}, f"{T}.metrics.enabled", "must be a boolean"),
    ({"metrics": {"scrape_port": 1}}, f"{T}.metrics.scrape_port", "unknown key"),
    ({"access_log": {"format": "xml"}}, f"{T}.access_log.format", "not an access log format (one of: text, json)"),
    ({"access_log": {"format": False}}, f"{T}.access_log.format", "enabled: false turns the access log off"),
    ({"access_log": {"format": "off"}}, f"{T}.access_log.format", "enabled: false turns the access log off"),
    ({"access_log": {"enabled": 1}}, f"{T}.access_log.enabled", "must be a boolean"),
    ({"tracing": {"sampling": 1.5}}, f"{T}.tracing.sampling", "ratio 0..1"),
    ({"tracing": {"sampling": -0.1}}, f"{T}.tracing.sampling", "ratio 0..1"),
    ({"tracing": {"sampling": "1%"}}, f"{T}.tracing.sampling", "must be a number 0..1"),
    ({"tracing": {"sampling": True}}, f"{T}.tracing.sampling", "must be a number 0..1"),
    ({"tracing": {"endpoint": "collector:4318"}}, f"{T}.tracing.endpoint", "not an http:// or https:// URL"),
    ({"tracing": {"endpoint": "grpc://collector:4317"}}, f"{T}.tracing.endpoint", "not an http:// or https:// URL"),
    ({"tracing": {"endpoint": "http://collector:99999"}}, f"{T}.tracing.endpoint", "invalid port"),
    ({"tracing": {"endpoint": "http://u:p@collector:4318"}}, f"{T}.tracing.endpoint", "credentials"),
    ({"tracing": {"endpoint": 4318}}, f"{T}.tracing.endpoint", "must be a string"),
    ({"tracing": {"max_queue_size": 0}}, f"{T}.tracing.max_queue_size", "must be 1..1048576"),
    ({"tracing": {"max_queue_size": 1 << 21}}, f"{T}.tracing.max_queue_size", "must be 1..1048576"),
    ({"tracing": {"service_name": ""}}, f"{T}.tracing.service_name", "must not be empty"),
    ({"tracing": {"service_name": "a\nb"}}, f"{T}.tracing.service_name", "control characters"),
    ({"tracing": {"service_name": "x" * 256}}, f"{T}.tracing.service_name", "at most 255"),
    ({"tracing": {"otlp_endpoint": "http://c:4318"}}, f"{T}.tracing.otlp_endpoint", "unknown key"),
    ({"tracing": {"enabled": "true"}}, f"{T}.tracing.enabled", "must be a boolean"),
])
def test_each_error_names_its_field(telemetry, path, fragment):
    errors = errors_of(with_telemetry(telemetry))
    assert path in errors, errors
    assert fragment in errors[path]


def test_every_error_is_reported_in_one_pass():
    errors = errors_of(with_telemetry({"metrics": {"port": -1}, "access_log": {"format": "csv"},
                                       "tracing": {"sampling": 3, "max_queue_size": 0}}))
    assert {f"{T}.metrics.port", f"{T}.access_log.format", f"{T}.tracing.sampling",
            f"{T}.tracing.max_queue_size"} <= set(errors)


@pytest.mark.parametrize("metrics,conflict", [
    ({"port": 18080, "address": "0.0.0.0"}, True),       # the listener's 127.0.0.1:18080
    ({"port": 18080, "address": "127.0.0.1"}, True),
    ({"port": 15000, "address": "127.0.0.1"}, True),     # admin
    ({"port": 18080, "address": "::"}, False),           # another family
    ({"port": 18080, "address": "10.1.2.3"}, False),
    ({"port": 18080, "address": "0.0.0.0", "enabled": False}, False),   # no scrape listener then
])
def test_the_scrape_port_may_not_overlap_admin_or_a_listener(metrics, conflict):
    doc = with_telemetry({"metrics": metrics})
    if conflict:
        assert "overlaps" in errors_of(doc)[f"{T}.metrics.port"]
    else:
        load.build(doc)


def test_port_zero_means_no_scrape_listener_and_never_conflicts():
    doc = with_telemetry({"metrics": {"port": 0}})
    doc["listeners"]["other"] = {"address": "0.0.0.0", "port": 18081, "protocol": "http", "routes": "web"}
    assert load.build(doc).telemetry.metrics.port == 0


def test_dump_round_trips_with_defaults_filled_and_env_keys_null():
    config = load.build(BASE)
    doc = to_document(config)
    assert doc["telemetry"] == {
        "metrics": {"enabled": True, "port": 15090, "address": "0.0.0.0"},
        "access_log": {"enabled": True, "format": "text"},
        "tracing": {"enabled": False, "sampling": None, "endpoint": None, "max_queue_size": None,
                    "service_name": None},
    }
    assert load.build(doc) == config
    # Through JSON and YAML as /config_dump and a file would carry it.
    assert load.load_text(json.dumps(doc)) == config
    assert load.load_text(yaml.safe_dump(doc)) == config


def test_dump_round_trips_every_key():
    config = load.build(with_telemetry({
        "metrics": {"enabled": False, "port": 9464, "address": "::"},
        "access_log": {"format": "json"},
        "tracing": {"enabled": True, "sampling": 0.25, "endpoint": "http://c:4318", "max_queue_size": 100,
                    "service_name": "svc"}}))
    doc = to_document(config)
    assert doc["telemetry"]["tracing"]["endpoint"] == "http://c:4318/v1/traces"
    assert load.build(doc) == config
    assert load.load_text(yaml.safe_dump(doc)) == config


def test_the_full_example_sets_every_telemetry_key():
    raw = yaml.safe_load((REPO / "config" / "example-full.yaml").read_text())["telemetry"]
    assert set(raw) == set(model.Telemetry.__slots__)
    assert set(raw["metrics"]) == set(model.MetricsOptions.__slots__)
    assert set(raw["access_log"]) == set(model.AccessLogOptions.__slots__)
    assert set(raw["tracing"]) == set(model.TracingOptions.__slots__)
    t = load.load_file(REPO / "config" / "example-full.yaml").telemetry
    assert t.tracing.enabled and t.tracing.sampling == 0.01 and t.access_log.format == "json"


def test_telemetry_is_no_longer_a_planned_key():
    assert "telemetry" not in load._PLANNED.get("", set())

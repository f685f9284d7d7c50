"""route_tables.T[i].retry and clusters.X.{circuit_breakers, retry_budget, outlier_detection}."""
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
    "clusters": {"api": {"endpoints": ["10.0.0.1:8080"]}, "orig": {"original_destination": True}},
    "route_tables": {"web": [{"match": {}, "cluster": "api"}]},
}
R = "route_tables.web[0]"
C = "clusters.api"


def with_route(**keys) -> dict:
    doc = copy.deepcopy(BASE)
    doc["route_tables"]["web"][0].update(keys)
    return doc


def with_cluster(**keys) -> dict:
    doc = copy.deepcopy(BASE)
    doc["clusters"]["api"].update(keys)
    return doc


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load.build(doc)
    return dict(info.value.errors)


def route_of(doc) -> model.Route:
    return load.build(doc).route_tables["web"][0]


# --- defaults


def test_no_retry_and_default_cluster_settings_when_absent():
    config = load.build(BASE)
    assert config.route_tables["web"][0].retry is None
    for cluster in (config.clusters["api"], config.clusters["orig"], model.PASSTHROUGH):
        assert cluster.circuit_breakers == model.CircuitBreakers(max_connections=1024, max_pending_requests=1024,
                                                                 max_requests=1024, max_retries=1024)
        assert cluster.retry_budget == model.RetryBudget(percent=20.0, min_retries=3)
        assert cluster.outlier_detection is None


@pytest.mark.parametrize("retry", [{}, {"on": None, "statuses": None, "backoff": None}, {"backoff": {}}])
def test_an_empty_retry_has_every_default(retry):
    r = route_of(with_route(retry=retry)).retry
    assert r == model.Retry()
    assert (r.on, r.statuses, r.attempts, r.per_try_timeout) == (("connect-failure", "refused-stream", "reset"), (),
                                                                 2, 0.0)
    assert (r.backoff_base, r.backoff_cap, r.max_retry_after) == (0.025, 0.25, 1.0)
    assert (r.buffer_limit, r.retry_non_idempotent) == (65536, False)


def test_empty_cluster_sections_have_every_default():
    c = load.build(with_cluster(circuit_breakers={}, retry_budget={}, outlier_detection={})).clusters["api"]
    assert c.circuit_breakers == model.CircuitBreakers() and c.retry_budget == model.RetryBudget()
    o = c.outlier_detection
    assert o == model.OutlierDetection()
    assert (o.consecutive_5xx, o.consecutive_gateway_failure, o.base_ejection_time, o.max_ejection_time,
            o.max_ejection_percent) == (5, 5, 30.0, 300.0, 10)


def test_lb_policies_all_supported():
    for lb in model.LB_POLICIES_SUPPORTED:
        assert load.build(with_cluster(lb=lb)).clusters["api"].lb == lb
    assert model.LB_POLICIES_PLANNED == ()


# --- values

FULL_RETRY = {"on": ["5xx", "reset"], "statuses": [429, 409], "attempts": 3, "per_try_timeout": "500ms",
              "backoff": {"base": "10ms", "cap": "1s"}, "max_retry_after": "0s", "buffer_limit": "1MiB",
              "retry_non_idempotent": True}


def test_every_retry_key_is_read():
    assert route_of(with_route(retry=FULL_RETRY)).retry == model.Retry(
        on=("5xx", "reset"), statuses=(429, 409), attempts=3, per_try_timeout=0.5, backoff_base=0.01,
        backoff_cap=1.0, max_retry_after=0.0, buffer_limit=1 << 20, retry_non_idempotent=True)


def test_statuses_alone_may_drive_the_retry():
    assert route_of(with_route(retry={"on": [], "statuses": [503]})).retry.on == ()


def test_a_base_over_the_default_cap_raises_the_cap_when_none_is_given():
    r = route_of(with_route(retry={"backoff": {"base": "1s"}})).retry
    assert (r.backoff_base, r.backoff_cap) == (1.0, 1.0)


def test_an_unquoted_yaml_on_key_is_on_not_true():
    text = yaml.safe_dump(with_route(retry={"attempts": 3})).replace("attempts: 3", "attempts: 3\n      on: [5xx]")
    assert "'on'" not in text and yaml.safe_load(text)["route_tables"]["web"][0]["retry"][True] == ["5xx"]
    assert load.load_text(text).route_tables["web"][0].retry.on == ("5xx",)
    doc = with_route(retry={True: ["5xx"], "on": ["reset"]})
    assert errors_of(doc) == {f"{R}.retry.on": "is given twice (once quoted)"}


def test_every_cluster_key_is_read():
    c = load.build(with_cluster(
        circuit_breakers={"max_connections": 0, "max_pending_requests": 1, "max_requests": 1_000_000,
                          "max_retries": 7},
        retry_budget={"percent": 12.5, "min_retries": 0},
        outlier_detection={"consecutive_5xx": 1, "consecutive_gateway_failure": 1000, "base_ejection_time": "1h",
                           "max_ejection_time": "1h", "max_ejection_percent": 0})).clusters["api"]
    assert c.circuit_breakers == model.CircuitBreakers(0, 1, 1_000_000, 7)
    assert c.retry_budget == model.RetryBudget(percent=12.5, min_retries=0)
    assert c.outlier_detection == model.OutlierDetection(1, 1000, 3600.0, 3600.0, 0)
    assert load.build(with_cluster(retry_budget={"percent": 100})).clusters["api"].retry_budget.percent == 100.0


def test_original_destination_clusters_take_the_settings_too():
    c = load.build(copy.deepcopy(BASE) | {"clusters": {
        "api": {"endpoints": ["10.0.0.1:8080"]},
        "orig": {"original_destination": True, "circuit_breakers": {"max_requests": 5}}}}).clusters["orig"]
    assert c.circuit_breakers.max_requests == 5


# --- errors, each with its exact path

RETRY_ERRORS = [
    ("x", f"{R}.retry", "must be a mapping (retry: {} for the defaults), got a string"),
    ({"attempt": 2}, f"{R}.retry.attempt", "unknown key (did you mean 'attempts'?)"),
    ({"on": "5xx"}, f"{R}.retry.on", "must be a list of conditions (connect-failure, refused-stream, reset, 5xx, "
                                     "gateway-error), got a string"),
    ({"on": ["connect-failures"]}, f"{R}.retry.on[0]",
     "'connect-failures' is not a retry condition (did you mean 'connect-failure'?)"),
    ({"on": ["reset", "bogus"]}, f"{R}.retry.on[1]", "'bogus' is not a retry condition (one of: connect-failure, "
                                                     "refused-stream, reset, 5xx, gateway-error)"),
    ({"on": ["503"]}, f"{R}.retry.on[0]", "'503' is not a retry condition; list response codes in statuses"),
    ({"on": [503]}, f"{R}.retry.on[0]", "'503' is not a retry condition; list response codes in statuses"),
    ({"on": ["reset", "reset"]}, f"{R}.retry.on[1]", "'reset' is listed twice"),
    ({"on": []}, f"{R}.retry.on", "is empty and so is statuses: the route would never retry"),
    ({"on": [], "statuses": []}, f"{R}.retry.on", "is empty and so is statuses: the route would never retry"),
    ({"statuses": 503}, f"{R}.retry.statuses", "must be a list of response codes, got a number"),
    ({"statuses": [99]}, f"{R}.retry.statuses[0]", "must be a response code 100..599, got 99"),
    ({"statuses": [503, 600]}, f"{R}.retry.statuses[1]", "must be a response code 100..599, got 600"),
    ({"statuses": [True]}, f"{R}.retry.statuses[0]", "must be a response code 100..599, got True"),
    ({"statuses": ["503"]}, f"{R}.retry.statuses[0]", "must be a response code 100..599, got '503'"),
    ({"statuses": [503, 503]}, f"{R}.retry.statuses[1]", "503 is listed twice"),
    ({"attempts": 0}, f"{R}.retry.attempts", "must be 1..10"),
    ({"attempts": 11}, f"{R}.retry.attempts", "must be 1..10"),
    ({"attempts": True}, f"{R}.retry.attempts", "must be a number, got a boolean"),
    ({"attempts": "2"}, f"{R}.retry.attempts", "must be a number, got a string"),
    ({"per_try_timeout": 1}, f"{R}.retry.per_try_timeout",
     "must be a duration string with a unit such as '250ms' or '1s', got a number"),
    ({"per_try_timeout": "25h"}, f"{R}.retry.per_try_timeout", "must be at most 24h (0s: none)"),
    ({"backoff": "25ms"}, f"{R}.retry.backoff", "must be a mapping with base and cap, got a string"),
    ({"backoff": {"base": "25ms", "max": "1s"}}, f"{R}.retry.backoff.max", "unknown key; allowed: base, cap"),
    ({"backoff": {"base": "0s"}}, f"{R}.retry.backoff.base", "must be greater than 0 and at most 60s"),
    ({"backoff": {"base": "61s"}}, f"{R}.retry.backoff.base", "must be greater than 0 and at most 60s"),
    ({"backoff": {"cap": "2m"}}, f"{R}.retry.backoff.cap", "must be at most 60s"),
    ({"backoff": {"cap": "10ms"}}, f"{R}.retry.backoff.cap", "must be at least base (25ms)"),
    ({"backoff": {"base": "1s", "cap": "500ms"}}, f"{R}.retry.backoff.cap", "must be at least base (1s)"),
    ({"max_retry_after": "301s"}, f"{R}.retry.max_retry_after", "must be at most 300s"),
    ({"max_retry_after": "soon"}, f"{R}.retry.max_retry_after",
     "'soon' is not a duration: use a number and one of us, ms, s, m, h (e.g. '250ms')"),
    ({"buffer_limit": "17MiB"}, f"{R}.retry.buffer_limit", "must be 0..16MiB"),
    ({"buffer_limit": -1}, f"{R}.retry.buffer_limit", "must not be negative"),
    ({"retry_non_idempotent": "yes"}, f"{R}.retry.retry_non_idempotent", "must be a boolean, got a string"),
    ({"per_try_timeout": "16s"}, f"{R}.retry.per_try_timeout",
     "is longer than the route timeout (15s), which bounds all the tries together"),
]


@pytest.mark.parametrize("retry,path,message", RETRY_ERRORS, ids=[p.split(".", 2)[-1] for _, p, _ in RETRY_ERRORS])
def test_retry_errors(retry, path, message):
    assert errors_of(with_route(retry=retry)) == {path: message}


CLUSTER_ERRORS = [
    ({"circuit_breakers": 5}, f"{C}.circuit_breakers",
     "must be a mapping with max_connections, max_pending_requests, max_requests, max_retries, got a number"),
    ({"circuit_breakers": {"max_request": 1}}, f"{C}.circuit_breakers.max_request",
     "unknown key (did you mean 'max_requests'?)"),
    *[({"circuit_breakers": {key: bad}}, f"{C}.circuit_breakers.{key}", message)
      for key in ("max_connections", "max_pending_requests", "max_requests", "max_retries")
      for bad, message in ((-1, "must be 0..1000000"), (1_000_001, "must be 0..1000000"),
                           (True, "must be a number, got a boolean"))],
    ({"retry_budget": []}, f"{C}.retry_budget", "must be a mapping with percent and min_retries, got a list"),
    ({"retry_budget": {"ratio": 0.2}}, f"{C}.retry_budget.ratio", "unknown key; allowed: min_retries, percent"),
    ({"retry_budget": {"percent": -1}}, f"{C}.retry_budget.percent", "must be a number 0..100, got -1"),
    ({"retry_budget": {"percent": 100.5}}, f"{C}.retry_budget.percent", "must be a number 0..100, got 100.5"),
    ({"retry_budget": {"percent": float("nan")}}, f"{C}.retry_budget.percent", "must be a number 0..100, got nan"),
    ({"retry_budget": {"percent": True}}, f"{C}.retry_budget.percent", "must be a number 0..100, got True"),
    ({"retry_budget": {"percent": "20%"}}, f"{C}.retry_budget.percent", "must be a number 0..100, got '20%'"),
    ({"retry_budget": {"min_retries": -1}}, f"{C}.retry_budget.min_retries", "must be 0..10000"),
    ({"retry_budget": {"min_retries": 10_001}}, f"{C}.retry_budget.min_retries", "must be 0..10000"),
    ({"outlier_detection": True}, f"{C}.outlier_detection",
     "must be a mapping (outlier_detection: {} for the defaults), got a boolean"),
    ({"outlier_detection": {"interval": "10s"}}, f"{C}.outlier_detection.interval",
     "unknown key; allowed: base_ejection_time, consecutive_5xx, consecutive_gateway_failure, max_ejection_percent, "
     "max_ejection_time"),
    ({"outlier_detection": {"consecutive_5xx": 0}}, f"{C}.outlier_detection.consecutive_5xx", "must be 1..1000"),
    ({"outlier_detection": {"consecutive_5xx": 1001}}, f"{C}.outlier_detection.consecutive_5xx", "must be 1..1000"),
    ({"outlier_detection": {"consecutive_gateway_failure": 0}}, f"{C}.outlier_detection.consecutive_gateway_failure",
     "must be 1..1000"),
    ({"outlier_detection": {"consecutive_gateway_failure": True}},
     f"{C}.outlier_detection.consecutive_gateway_failure", "must be a number, got a boolean"),
    ({"outlier_detection": {"base_ejection_time": "0s"}}, f"{C}.outlier_detection.base_ejection_time",
     "must be greater than 0 and at most 1h"),
    ({"outlier_detection": {"base_ejection_time": "61m", "max_ejection_time": "2h"}},
     f"{C}.outlier_detection.base_ejection_time", "must be greater than 0 and at most 1h"),
    ({"outlier_detection": {"max_ejection_time": "25h"}}, f"{C}.outlier_detection.max_ejection_time",
     "must be at most 24h"),
    ({"outlier_detection": {"max_ejection_time": "10s"}}, f"{C}.outlier_detection.max_ejection_time",
     "must be at least base_ejection_time (30s)"),
    ({"outlier_detection": {"base_ejection_time": "1m", "max_ejection_time": "59s"}},
     f"{C}.outlier_detection.max_ejection_time", "must be at least base_ejection_time (1m)"),
    ({"outlier_detection": {"max_ejection_percent": 101}}, f"{C}.outlier_detection.max_ejection_percent",
     "must be 0..100"),
    ({"outlier_detection": {"max_ejection_percent": -1}}, f"{C}.outlier_detection.max_ejection_percent",
     "must be 0..100"),
    ({"lb": "fastest"}, f"{C}.lb", "'fastest' is not a load balancing policy (one of: round_robin, least_request, "
                                   "random)"),
]


@pytest.mark.parametrize("keys,path,message", CLUSTER_ERRORS,
                         ids=[f"{p.split('.', 2)[-1]}-{i}" for i, (_, p, _) in enumerate(CLUSTER_ERRORS)])
def test_cluster_errors(keys, path, message):
    assert errors_of(with_cluster(**keys)) == {path: message}


# --- across fields


@pytest.mark.parametrize("action", [{"direct_response": {"status": 200}}, {"redirect": {"path": "/x"}}])
def test_retry_only_on_routes_that_send_to_a_cluster(action):
    doc = copy.deepcopy(BASE)
    doc["route_tables"]["web"] = [{"match": {}, **action, "retry": {}}]
    message = f"applies only to routes that send to a cluster, not to {next(iter(action))}"
    assert errors_of(doc) == {f"{R}.retry": message}


def test_retry_on_weighted_clusters():
    doc = with_route(cluster=None, weighted_clusters=[{"cluster": "api", "weight": 1}], retry={"attempts": 3})
    assert route_of(doc).retry.attempts == 3


@pytest.mark.parametrize("timeout,per_try,error", [
    ("3s", "3001ms", "is longer than the route timeout (3s), which bounds all the tries together"),
    ("3s", "3s", None),
    ("0s", "1h", None),          # no route timeout: nothing to exceed
    (None, "15s", None),         # the default route timeout, 15s
])
def test_per_try_timeout_within_the_route_timeout(timeout, per_try, error):
    doc = with_route(timeout=timeout, retry={"per_try_timeout": per_try})
    if error is None:
        assert route_of(doc).retry.per_try_timeout > 0
    else:
        assert errors_of(doc) == {f"{R}.retry.per_try_timeout": error}


def test_every_error_at_once():
    doc = with_route(retry={"attempts": 0, "statuses": [1], "backoff": {"base": "0s"}})
    doc["clusters"]["api"].update(circuit_breakers={"max_retries": -1}, outlier_detection={"consecutive_5xx": 0})
    assert set(errors_of(doc)) == {f"{R}.retry.attempts", f"{R}.retry.statuses[0]", f"{R}.retry.backoff.base",
                                   f"{C}.circuit_breakers.max_retries", f"{C}.outlier_detection.consecutive_5xx"}


# --- the dump


def test_dump_shape_and_round_trip():
    doc = with_route(retry=FULL_RETRY)
    doc["clusters"]["api"].update(circuit_breakers={"max_retries": 3}, retry_budget={"percent": 50},
                                  outlier_detection={"base_ejection_time": "1500ms"})
    doc["clusters"]["canary"] = {"endpoints": ["10.0.0.2:8080"], "outlier_detection": {}}
    config = load.build(doc)
    dumped = to_document(config)
    assert dumped["route_tables"]["web"][0]["retry"] == {
        "on": ["5xx", "reset"], "statuses": [429, 409], "attempts": 3, "per_try_timeout": "500ms",
        "backoff": {"base": "10ms", "cap": "1s"}, "max_retry_after": "0s", "buffer_limit": 1 << 20,
        "retry_non_idempotent": True}
    api = dumped["clusters"]["api"]
    assert api["circuit_breakers"] == {"max_connections": 1024, "max_pending_requests": 1024,
                                       "max_requests": 1024, "max_retries": 3}
    assert api["retry_budget"] == {"percent": 50.0, "min_retries": 3}
    assert api["outlier_detection"] == {"consecutive_5xx": 5, "consecutive_gateway_failure": 5,
                                        "base_ejection_time": "1500ms", "max_ejection_time": "5m",
                                        "max_ejection_percent": 10}
    assert "outlier_detection" not in dumped["clusters"]["orig"]
    assert load.build(dumped) == config
    # Through text too: YAML must quote the `on` key, JSON has no such trap.
    assert load.load_text(yaml.safe_dump(dumped)) == config
    assert load.load_text(json.dumps(dumped)) == config


def test_dump_of_a_default_retry_round_trips():
    config = load.build(with_route(retry={}))
    dumped = to_document(config)
    assert dumped["route_tables"]["web"][0]["retry"]["backoff"] == {"base": "25ms", "cap": "250ms"}
    assert load.build(dumped) == config
    assert "retry" not in to_document(load.build(BASE))["route_tables"]["web"][0]


# --- the full example


def test_the_full_example_carries_every_new_key():
    raw = yaml.safe_load((REPO / "config" / "example-full.yaml").read_text())
    payments = raw["clusters"]["payments"]
    assert set(payments["circuit_breakers"]) == set(model.CircuitBreakers.__slots__)
    assert set(payments["retry_budget"]) == set(model.RetryBudget.__slots__)
    assert set(payments["outlier_detection"]) == set(model.OutlierDetection.__slots__)
    retry = raw["route_tables"]["outbound"][0]["retry"]
    assert set(retry) == {True, "statuses", "attempts", "per_try_timeout", "backoff", "max_retry_after",
                          "buffer_limit", "retry_non_idempotent"}   # True: the unquoted `on`


def test_the_full_example_loads_once_the_planned_keys_are_left_out():
    doc = yaml.safe_load((REPO / "config" / "example-full.yaml").read_text())
    del doc["telemetry"]
    config = load.build(doc)
    payments = config.clusters["payments"]
    assert payments.lb == "least_request"
    assert payments.circuit_breakers == model.CircuitBreakers()
    assert payments.retry_budget == model.RetryBudget()
    assert payments.outlier_detection == model.OutlierDetection()
    assert config.route_tables["outbound"][0].retry == model.Retry(statuses=(429,), per_try_timeout=1.0)
    assert load.build(to_document(config)) == config

"""listeners.X.http and clusters.X.pool; the --http1-codec override."""
import copy

import pytest

from sidecar_proxy import cli
from sidecar_proxy.config import load, model
from sidecar_proxy.config.dump import to_document
from sidecar_proxy.config.load import ConfigError
from sidecar_proxy.protocols.events import Limits

BASE = {
    "version": 1,
    "node": {"id": "n1"},
    "listeners": {
        "web": {"address": "127.0.0.1", "port": 18080, "protocol": "http", "routes": "web"},
        "raw": {"address": "127.0.0.1", "port": 18081, "routes": "web"},
    },
    "clusters": {"api": {"endpoints": ["10.0.0.1:8080"]}},
    "route_tables": {"web": [{"match": {}, "cluster": "api"}]},
}


def doc_with(http=None, pool=None) -> dict:
    doc = copy.deepcopy(BASE)
    if http is not None:
        doc["listeners"]["web"]["http"] = http
    if pool is not None:
        doc["clusters"]["api"]["pool"] = pool
    return doc


def errors_of(doc) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load.build(doc)
    return dict(info.value.errors)


def test_defaults():
    config = load.build(BASE)
    http = config.listeners["web"].http
    assert http == model.HttpOptions() and config.listeners["raw"].http == model.HttpOptions()
    assert (http.codec, http.max_request_header_bytes, http.max_request_headers, http.max_uri_length,
            http.request_header_timeout) == ("auto", 60 * 1024, 100, 8 * 1024, 10.0)
    assert http.x_forwarded_for and http.x_forwarded_proto and http.request_id
    assert http.limits == Limits() == Limits(60 * 1024, 100, 8 * 1024)
    pool = config.clusters["api"].pool
    assert pool == model.PoolOptions(max_idle_per_endpoint=1024, idle_timeout=4.0)


def test_values_and_limits():
    config = load.build(doc_with(http={"codec": "h11", "max_request_header_bytes": "8KiB", "max_request_headers": 20,
                                       "max_uri_length": "1KiB", "request_header_timeout": "500ms",
                                       "x_forwarded_for": False, "x_forwarded_proto": False, "request_id": False},
                                 pool={"max_idle_per_endpoint": 0, "idle_timeout": "30s"}))
    http = config.listeners["web"].http
    assert http.limits == Limits(max_header_bytes=8192, max_header_count=20, max_uri_bytes=1024)
    assert http.codec == "h11" and http.request_header_timeout == 0.5
    assert not (http.x_forwarded_for or http.x_forwarded_proto or http.request_id)
    assert config.clusters["api"].pool == model.PoolOptions(0, 30.0)
    assert load.build(to_document(config)) == config


@pytest.mark.parametrize("codec", ["auto", "h11", "httptools"])
def test_every_codec_name_validates_whether_installed_or_not(codec):
    assert load.build(doc_with(http={"codec": codec})).listeners["web"].http.codec == codec


@pytest.mark.parametrize("http,key,fragment", [
    ({"codec": "picohttp"}, "codec", "not an HTTP/1.1 codec (one of: auto, h11, httptools)"),
    ({"codec": 1}, "codec", "must be a string"),
    ({"max_request_header_bytes": "512B"}, "max_request_header_bytes", "1KiB..1MiB"),
    ({"max_request_header_bytes": "2MiB"}, "max_request_header_bytes", "1KiB..1MiB"),
    ({"max_request_header_bytes": "lots"}, "max_request_header_bytes", "not a size"),
    ({"max_request_headers": 0}, "max_request_headers", "1..1000"),
    ({"max_request_headers": 1001}, "max_request_headers", "1..1000"),
    ({"max_request_headers": "100"}, "max_request_headers", "must be a number"),
    ({"max_uri_length": 255}, "max_uri_length", "256B..64KiB"),
    ({"max_uri_length": "65KiB"}, "max_uri_length", "256B..64KiB"),
    ({"request_header_timeout": "0s"}, "request_header_timeout", "greater than 0"),
    ({"request_header_timeout": 10}, "request_header_timeout", "with a unit"),
    ({"x_forwarded_for": "yes"}, "x_forwarded_for", "must be a boolean"),
    ({"x_forwarded_proto": 1}, "x_forwarded_proto", "must be a boolean"),
    ({"request_id": None, "max_headers": 3}, "max_headers", "unknown key"),
])
def test_listener_http_errors(http, key, fragment):
    errors = errors_of(doc_with(http=http))
    assert fragment in errors[f"listeners.web.http.{key}"], errors


def test_listener_http_must_be_a_mapping_and_not_on_tcp():
    assert "must be a mapping" in errors_of(doc_with(http="h11"))["listeners.web.http"]
    doc = copy.deepcopy(BASE)
    doc["listeners"]["raw"]["http"] = {"codec": "h11"}
    assert "only to listeners with protocol auto or http" in errors_of(doc)["listeners.raw.http"]


@pytest.mark.parametrize("pool,key,fragment", [
    ({"max_idle_per_endpoint": -1}, "max_idle_per_endpoint", "0..10000"),
    ({"max_idle_per_endpoint": 10001}, "max_idle_per_endpoint", "0..10000"),
    ({"max_idle_per_endpoint": True}, "max_idle_per_endpoint", "must be a number"),
    ({"idle_timeout": "0s"}, "idle_timeout", "greater than 0"),
    ({"idle_timeout": "2h"}, "idle_timeout", "at most 1h"),
    ({"idle_time": "1s"}, "idle_time", "did you mean 'idle_timeout'"),
])
def test_cluster_pool_errors(pool, key, fragment):
    errors = errors_of(doc_with(pool=pool))
    assert fragment in errors[f"clusters.api.pool.{key}"], errors


def test_protocols():
    assert model.PROTOCOLS_SUPPORTED == ("tcp", "auto", "http")
    assert "not a protocol" in errors_of(doc_with() | {"listeners": {
        "web": {**BASE["listeners"]["web"], "protocol": "h2"}}})["listeners.web.protocol"]


def test_run_accepts_the_codec_flag():
    parser = cli._parser()
    assert parser.parse_args(["run", "--http1-codec", "h11"]).http1_codec == "h11"
    assert parser.parse_args(["run"]).http1_codec is None
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["run", "--http1-codec", "fast"])
    assert info.value.code == 2

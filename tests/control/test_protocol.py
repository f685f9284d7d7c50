import pytest

from sidecar_proxy.config import load
from sidecar_proxy.control import protocol
from sidecar_proxy.control.protocol import DiscoveryRequest, DiscoveryResponse, ProtocolError

BASE = {"version": 1, "node": {"id": "n"}, "control": {"server": "http://127.0.0.1:15010"}}
RESOURCES = {
    "listeners": [{"name": "local", "address": "127.0.0.1", "port": 15080, "routes": "main"}],
    "routes": [{"name": "main", "routes": [{"match": {}, "cluster": "app"}]}],
    "clusters": [{"name": "app", "connect_timeout": "1s"}],
    "endpoints": [{"cluster_name": "app", "endpoints": ["127.0.0.1:8080"]}],
}


def test_request_round_trips_as_envoy_rest_json():
    nack = DiscoveryRequest("clusters", "node-1", "v1", "abc", error="clusters.x: bad")
    doc = nack.to_json()
    assert doc["type_url"] == "type.sidecar-proxy.dev/clusters"
    assert doc["node"] == {"id": "node-1"} and doc["resource_names"] == []
    assert doc["error_detail"] == {"code": 3, "message": "clusters.x: bad"}
    back = DiscoveryRequest.from_json("clusters", doc)
    assert back == nack and back.is_nack
    assert not DiscoveryRequest.from_json("clusters", DiscoveryRequest("clusters", "n").to_json()).is_nack


@pytest.mark.parametrize("doc,fragment", [
    ([], "JSON object"),
    ({"node": {}}, "node.id"),
    ({"node": {"id": "n"}, "type_url": "type.sidecar-proxy.dev/listeners"}, "does not match the path"),
])
def test_bad_requests_say_what_is_wrong(doc, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        DiscoveryRequest.from_json("clusters", doc)


def test_null_versions_read_as_empty():
    doc = {"node": {"id": "n"}, "version_info": None, "response_nonce": None}
    request = DiscoveryRequest.from_json("routes", doc)
    assert (request.version_info, request.response_nonce) == ("", "")


def test_response_carries_typed_resources_and_strips_the_type_on_read():
    response = DiscoveryResponse("endpoints", "v7", RESOURCES["endpoints"])
    doc = response.to_json()
    assert doc["resources"][0]["@type"] == "type.sidecar-proxy.dev/endpoints"
    assert DiscoveryResponse.from_json("endpoints", doc) == response


@pytest.mark.parametrize("doc,fragment", [
    ({"type_url": "type.sidecar-proxy.dev/routes", "version_info": "v", "nonce": "n"}, "is not"),
    ({"type_url": "type.sidecar-proxy.dev/endpoints", "version_info": "", "nonce": "n"}, "version_info"),
    ({"type_url": "type.sidecar-proxy.dev/endpoints", "version_info": "v", "nonce": "n", "resources": [1]},
     r"resources\[0\] is not an object"),
    ({"type_url": "type.sidecar-proxy.dev/endpoints", "version_info": "v", "nonce": "n",
      "resources": [{"@type": "type.sidecar-proxy.dev/clusters"}]}, "@type"),
])
def test_bad_responses_are_protocol_errors(doc, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        DiscoveryResponse.from_json("endpoints", doc)


def test_merged_resources_validate_as_one_config_and_split_back():
    doc, problems = protocol.merge(BASE, RESOURCES)
    assert problems == []
    config = load.build(doc)
    assert config.clusters["app"].endpoints[0].port == 8080
    assert config.listeners["local"].port == 15080
    assert protocol.split(doc) == RESOURCES


def test_merge_reports_resource_problems_and_keeps_static_names_reserved():
    static = dict(BASE, clusters={"app": {"endpoints": ["10.0.0.1:80"]}})
    resources = dict(RESOURCES, listeners=[{"address": "127.0.0.1"}], endpoints=[{"cluster_name": "ghost"}])
    _, problems = protocol.merge(static, resources)
    assert ("listeners[0]", "has no 'name'") in problems
    assert ("clusters[0]", "'app' is also defined statically in the bootstrap file") in problems
    assert ("endpoints[0]", "no cluster named 'ghost' for these endpoints") in problems


def test_validation_errors_name_the_config_path_of_a_resource():
    resources = dict(RESOURCES, endpoints=[{"cluster_name": "app", "endpoints": ["127.0.0.1:0"]}])
    doc, _ = protocol.merge(BASE, resources)
    with pytest.raises(load.ConfigError) as info:
        load.build(doc)
    assert ("clusters.app.endpoints[0]", "port must be 1..65535, got '0'") in info.value.errors


def test_discovery_paths():
    assert protocol.type_from_path("/v3/discovery:clusters") == "clusters"
    assert protocol.type_from_path("/v3/discovery:secrets") is None
    assert protocol.type_from_path("/ready") is None

from collections import Counter

from sidecar_proxy.config.model import Cluster, Endpoint
from sidecar_proxy.upstream.balancer import make_picker


def cluster(*weights):
    return Cluster("c", tuple(Endpoint(f"10.0.0.{i}", 80, w) for i, w in enumerate(weights, 1)))


def test_equal_weights_rotate():
    pick = make_picker(cluster(1, 1, 1))
    assert [pick()[0] for _ in range(6)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_weights_are_honoured_exactly_per_cycle_and_spread_out():
    pick = make_picker(cluster(5, 1, 1))
    sequence = [pick()[0] for _ in range(7)]
    assert Counter(sequence) == {"10.0.0.1": 5, "10.0.0.2": 1, "10.0.0.3": 1}
    # Smooth: within a cycle the light endpoints are interleaved, not queued
    # behind a burst of five to the heavy one.
    longest_run = max(len(run) for run in "".join(s[-1] for s in sequence).replace("2", " ").replace("3", " ").split())
    assert longest_run <= 2, sequence
    assert Counter(pick()[0] for _ in range(700)) == {"10.0.0.1": 500, "10.0.0.2": 100, "10.0.0.3": 100}


def test_original_destination_cluster_has_no_picker():
    assert make_picker(Cluster("od", original_destination=True)) is None

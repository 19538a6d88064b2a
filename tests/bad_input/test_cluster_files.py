"""Cluster specs and cluster JSON files: every bad one is one `error:` paragraph, exit 2."""

from __future__ import annotations

import json

import pytest

from tests.bad_input.cli_helpers import call, refused

VALID = {"nodes": 1, "devices_per_node": 2, "device": "cpu"}


def _with(**changes):
    d = dict(VALID)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()


@pytest.mark.parametrize("content, expected", [
    (json.dumps(_with(nodes="2")), 'nodes must be a whole number, got "2"'),
    (json.dumps(_with(devices_per_node=2.5)), "devices_per_node must be a whole number"),
    (json.dumps(_with(devices_per_node=True)), "devices_per_node must be a whole number"),
    (json.dumps(_with(nodes=0)), "nodes must be >= 1, got 0"),
    (json.dumps(_with(nodes=-1)), "nodes must be >= 1, got -1"),
    (json.dumps(_with(intra_node_bandwidth=0)), "intra_node_bandwidth must be a positive number"),
    (json.dumps(_with(intra_node_bandwidth=-1e9)), "intra_node_bandwidth must be a positive number"),
    (json.dumps(_with(inter_node_bandwidth="fast")), "inter_node_bandwidth must be a positive number"),
    (json.dumps(_with(inter_node_latency=-1)), "inter_node_latency must be a number of seconds from 0 to 10"),
    (json.dumps(_with(intra_node_latency=[1])), "intra_node_latency must be a number of seconds"),
    (json.dumps(_with(memory_bytes=0)), "memory_bytes must be a positive whole number"),
    (json.dumps(_with(memory_bytes=-5)), "memory_bytes must be a positive whole number"),
    (json.dumps(_with(memory_bytes="80GB")), "memory_bytes must be a positive whole number"),
    ('{"nodes": 1, "devices_per_node": 2, "device": "cpu", "intra_node_bandwidth": NaN}',
     "intra_node_bandwidth must be a positive number"),
    ("5", "a cluster file holds one JSON object"),
    ("[1, 2]", "a cluster file holds one JSON object"),
    ('"8xH100"', "a cluster file holds one JSON object"),
    ("null", "a cluster file holds one JSON object"),
    (json.dumps(_with(device=_DROP)), "missing keys ['device']"),
    (json.dumps(_with(device="H1000")), "unknown device 'H1000'. Did you mean H100"),
    (json.dumps(_with(device=42)), "device must be a device name"),
    (json.dumps(_with(nodes={"a": 1})), "nodes must be a whole number"),
    (json.dumps(_with(gpus=8)), "unknown keys ['gpus']"),
    (json.dumps({"nodes": 1, "devices_per_node": 16, "device": "H100"}),
     "the largest H100-SXM-80GB node has 8. Write NODESxDEVICESxTYPE, e.g. 2x8xH100-SXM-80GB"),
    (json.dumps(_with(num_devices=3)), "num_devices is 3 but nodes 1 x devices_per_node 2 = 2"),
    (json.dumps(_with(memory_bytes=2**63)), "memory_bytes must be a positive whole number of bytes per device, at most"),
    (json.dumps(_with(intra_node_bandwidth=1e-300)), "intra_node_bandwidth 1e-300 bytes/s is outside what the planner models"),
    (json.dumps(_with(inter_node_latency=1e300)), "inter_node_latency must be a number of seconds from 0 to 10"),
    (json.dumps(_with(nodes=10**9)), "2000000000 devices; the planner plans clusters of up to 131072 devices"),
    ("{not json", "is not valid JSON"),
    ("", "is not valid JSON"),
])
def test_bad_cluster_file_is_one_error(tmp_path, capsys, content, expected):
    path = tmp_path / "cluster.json"
    path.write_text(content)
    message = refused(["mlp", "--cluster", path, "--layers-only"], capsys, expected)
    assert str(path) in message  # names the file


@pytest.mark.parametrize("spec, expected", [
    ("0x8xH100", "nodes must be >= 1, got 0"),
    ("2x0xcpu", "devices_per_node must be >= 1, got 0"),
    ("", "the cluster spec is empty"),
    ("16xH100", "2x8xH100-SXM-80GB"),
    ("8xTPU", "unknown device 'TPU'"),
])
def test_bad_cluster_spec_string_is_one_error(capsys, spec, expected):
    refused(["mlp", "--cluster", spec, "--layers-only"], capsys, expected)


def test_a_directory_where_a_cluster_file_is_expected(tmp_path, capsys):
    refused(["mlp", "--cluster", tmp_path, "--layers-only"], capsys, "is a directory")
    named = tmp_path / "cluster.json"
    named.mkdir()
    refused(["mlp", "--cluster", named, "--layers-only"], capsys, "is a directory")


def test_a_cluster_file_that_does_not_exist(tmp_path, capsys):
    refused(["mlp", "--cluster", tmp_path / "nope.json", "--layers-only"], capsys,
            "does not exist")


def test_a_valid_cluster_file_with_overrides_is_used(tmp_path, capsys):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({**VALID, "memory_bytes": 8e9, "intra_node_bandwidth": 1e10,
                                "intra_node_latency": 0, "num_devices": 2}))
    code, out, err = call(["mlp", "--cluster", path, "--layers-only", "--json"], capsys)
    assert code == 0, err
    cluster = json.loads(out)["cluster"]
    assert cluster["memory_bytes"] == 8 * 10**9 and cluster["intra_node_bandwidth"] == 1e10


def test_negative_bandwidth_cannot_lower_the_communication_time(tmp_path, capsys):
    # Accepted before: a negative bandwidth made every transfer take negative time.
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": 2, "devices_per_node": 2, "device": "cpu",
                                "inter_node_bandwidth": -1e9}))
    refused(["gpt-tiny", "--cluster", path, "--batch", "4", "--seq", "16"], capsys,
            "inter_node_bandwidth must be a positive number of bytes/s")

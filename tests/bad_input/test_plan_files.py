"""Plan files: every field of the schema is checked on load (`plan show`, `explain`,
`compile`), from the one schema description in planner/plan.py."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from planner.plan import EXTRA_SCHEMA, PLAN_SCHEMA, _List, _Map, _Object
from tests.bad_input.cli_helpers import call, refused

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def valid_plan(tmp_path_factory) -> dict:
    """A real plan file of gpt-tiny on 2 cpu ranks, made through the CLI."""
    from planner.cli import main

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["gpt-tiny", "--cluster", "2xcpu", "--batch", "2", "--seq", "16",
                 "--alternatives", "2", "--out", str(path), "--json"]) == 0
    return json.loads(path.read_text())


def _set(d, dotted, value):
    *head, last = dotted.split(".")
    for k in head:
        d = d[int(k)] if k.isdigit() else d[k]
    if last.isdigit():
        d[int(last)] = value
    else:
        d[last] = value


def _drop(d, dotted):
    *head, last = dotted.split(".")
    for k in head:
        d = d[int(k)] if k.isdigit() else d[k]
    del d[last]


def _costs_key(key):
    def edit(d):
        costs = d["layers"][0]["costs"]
        costs[key] = costs.pop(next(iter(costs)))
    return edit


NAN = float("nan")

CASES = [
    (lambda d: _set(d, "workload.batch_size", 0), "key 'workload.batch_size' must be int >= 1 and <= 1048576, got 0"),
    (lambda d: _set(d, "workload.batch_size", -4), "key 'workload.batch_size' must be int >= 1"),
    (lambda d: _set(d, "workload.batch_size", 10**12), "key 'workload.batch_size' must be int >= 1 and <= 1048576"),
    (lambda d: _set(d, "workload.dtype", "bogus"), "key 'workload.dtype' is 'bogus'; it must be 'float32'"),
    (lambda d: _set(d, "workload.phase", "bogus"), "key 'workload.phase' is 'bogus'; it must be 'prefill' or 'decode'"),
    (lambda d: _set(d, "workload.objective", "fast"), "key 'workload.objective' is 'fast'"),
    (lambda d: _set(d, "workload.seq_len", -1), "key 'workload.seq_len' must be int >= 1"),
    (lambda d: _drop(d, "workload.seq_len"), "missing key 'workload.seq_len'"),
    (lambda d: _set(d, "parallelism.dp", 0), "key 'parallelism.dp' must be int >= 1"),
    (lambda d: _set(d, "parallelism.microbatches", "1"), "key 'parallelism.microbatches' must be int, got str '1'"),
    (lambda d: _set(d, "parallelism.sequence_parallel", "yes"), "key 'parallelism.sequence_parallel' must be bool"),
    (lambda d: _set(d, "parallelism.microbatch_size", 7), "parallelism.microbatch_size is 7"),
    (lambda d: _set(d, "stages", []), "key 'stages' must have at least 1 entry"),
    (lambda d: _set(d, "stages", "abc"), "key 'stages' must be a list"),
    (lambda d: _set(d, "stages", [5]), "key 'stages[0]' must be an object"),
    (lambda d: _set(d, "stages.0.tp", 0), "key 'stages[0].tp' must be int >= 1"),
    (lambda d: _set(d, "stages.0.devices", [[-1]]), "key 'stages[0].devices[0][0]' must be int >= 0"),
    (lambda d: _set(d, "stages.0.devices", [[]]), "key 'stages[0].devices[0]' must have at least 1 entry"),
    (lambda d: _set(d, "stages.0.predicted.compute_s", -1), "key 'stages[0].predicted.compute_s' must be number >= 0"),
    (lambda d: _set(d, "stages.0.layers", [0, 1, 2]), "key 'stages[0].layers' must be [first, last]"),
    (_costs_key("0"), "layers[0].costs has key '0'"),
    (_costs_key("\u00b2"), "layers[0].costs has key '\u00b2'"),
    (lambda d: _set(d, "layers.0.param_bytes", -5), "key 'layers[0].param_bytes' must be int >= 0"),
    (lambda d: _set(d, "layers.0.source", "guessed"), "key 'layers[0].source' is 'guessed'"),
    (lambda d: _set(d, "layers.0.name", None), "key 'layers[0].name' must be str"),
    (lambda d: _set(d, "boundaries", ["x"] * len(d["boundaries"])), "key 'boundaries[0]' must be int"),
    (lambda d: _set(d, "predicted.latency_s", NAN), "key 'predicted.latency_s' must be a finite number"),
    (lambda d: _set(d, "predicted.throughput_samples_per_s", 0), "key 'predicted.throughput_samples_per_s' must be number > 0"),
    (lambda d: _set(d, "solver.status", "MAYBE"), "key 'solver.status' is 'MAYBE'; it must be 'OPTIMAL' or 'FEASIBLE'"),
    (lambda d: _set(d, "solver.name", "gurobi"), "key 'solver.name' is 'gurobi'"),
    (lambda d: _set(d, "cluster.device", "H1000"), "key 'cluster.device': unknown device 'H1000'"),
    (lambda d: _set(d, "cluster.nodes", 0), "key 'cluster.nodes' must be int >= 1"),
    (lambda d: _set(d, "baselines.pure_tp.feasible", "yes"), "key 'baselines.pure_tp.feasible' must be bool"),
    (lambda d: _set(d, "baselines.pure_tp.latency_s", None), "baselines.pure_tp is feasible but has no latency_s"),
    (lambda d: _set(d, "links.intra_node.bandwidth_bytes_per_s", 0), "key 'links.intra_node.bandwidth_bytes_per_s' must be number > 0"),
    (lambda d: _drop(d, "links.inter_node"), "missing key 'links.inter_node.latency_s'"),
    (lambda d: _set(d, "stage_workspace_bytes", {"x": 1}), "stage_workspace_bytes has key 'x'"),
    (lambda d: _set(d, "provenance", "guess"), "key 'provenance' is 'guess'"),
    (lambda d: _set(d, "alternatives", "junk"), "key 'alternatives' must be a list"),
    (lambda d: _set(d, "alternatives", [{"dp": 1}]), "missing key 'alternatives[0].pp'"),
    (lambda d: _drop(d, "alternatives.0.latency_s"), "missing key 'alternatives[0].latency_s'"),
    (lambda d: _set(d, "workload_full.memory_headroom", 2), "workload_full: invalid workload: memory headroom"),
    (lambda d: _set(d, "source", "x"), "key 'source' must be an object"),
    (lambda d: _set(d, "schema", "fx-planner/plan/v9"), "this planner reads 'fx-planner/plan/v2'"),
    (lambda d: _set(d, "model", {"name": "m", "num_layers": 6}), "missing key 'model.fingerprint'"),
    (lambda d: _set(d, "model.num_layers", 0), "key 'model.num_layers' must be int >= 1"),
]


@pytest.mark.parametrize("edit, expected", CASES, ids=[c[1][:48] for c in CASES])
def test_bad_plan_file_is_one_error(valid_plan, tmp_path, capsys, edit, expected):
    data = copy.deepcopy(valid_plan)
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    message = refused(["show", path], capsys, expected)
    assert str(path) in message


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", "a plan file holds one JSON object"),
    ("", "is not valid JSON"),
    ("[" * 100000, "is not valid JSON"),
])
def test_a_plan_file_that_is_not_a_plan_object(tmp_path, capsys, content, expected):
    path = tmp_path / "plan.json"
    path.write_text(content)
    refused(["show", path], capsys, expected)


@pytest.mark.parametrize("sub", ["show", "explain", "compile"])
def test_a_directory_where_a_plan_file_is_expected(tmp_path, capsys, sub):
    extra = ["--out", tmp_path / "build"] if sub == "compile" else []
    refused([sub, tmp_path, *extra], capsys, "is a directory")


def test_explain_refuses_an_invalid_plan(valid_plan, tmp_path, capsys):
    data = copy.deepcopy(valid_plan)
    data["alternatives"][0]["why"] = 3
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    refused(["explain", path], capsys, "key 'alternatives[0].why' must be str")


def test_compile_refuses_an_unknown_dtype_before_building_anything(valid_plan, tmp_path, capsys):
    data = copy.deepcopy(valid_plan)
    data["workload"]["dtype"] = "float8"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "build"
    refused(["compile", path, "--out", out], capsys, "key 'workload.dtype' is 'float8'")
    assert not out.exists()


def test_compile_out_naming_an_existing_file(valid_plan, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(valid_plan))
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    refused(["compile", path, "--out", existing], capsys, "is an existing file")
    assert existing.read_text() == "keep me"
    refused(["compile", path, "--out", ""], capsys, "--out is empty")
    refused(["compile", path, "--out", existing / "build"], capsys, "is not a directory")


def test_the_valid_plan_is_shown_and_explained(valid_plan, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(valid_plan))
    for sub in ("show", "explain"):
        code, out, err = call([sub, path], capsys)
        assert code == 0, err
    code, out, _ = call(["show", path, "--json"], capsys)
    assert code == 0 and json.loads(out) == valid_plan


def _leaf_names(spec) -> set[str]:
    if isinstance(spec, _Object):
        return set(spec.keys) | {n for s in spec.keys.values() for n in _leaf_names(s)}
    if isinstance(spec, _List):
        return _leaf_names(spec.item)
    if isinstance(spec, _Map):
        return _leaf_names(spec.value)
    return set()


def test_every_schema_key_is_documented():
    doc = (ROOT / "docs" / "plan-format.md").read_text()
    documented = set(re.findall(r"[A-Za-z_]+", " ".join(re.findall(r"`([^`]+)`", doc))))
    missing = (_leaf_names(PLAN_SCHEMA) | _leaf_names(EXTRA_SCHEMA)) - documented
    assert not missing, f"keys of planner/plan.py's schema missing from docs/plan-format.md: {missing}"

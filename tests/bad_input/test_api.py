"""The Python API's error path: each user-fixable problem raises one of
``planner.USER_ERRORS`` with a message that says what to change."""

from __future__ import annotations

import sys

import pytest
import torch

import planner
from planner.cluster import Cluster, SpecError, Workload
from planner.models.loader import ModelLoadError, load_model
from planner.plan import Plan, PlanFormatError


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("gpt-tiny", batch_size=4, seq_len=16)
    return lm, planner.trace(lm.model, lm.args, name="gpt-tiny")


def test_plan_without_a_cluster_uses_the_default_cluster(tiny):
    lm, traced = tiny
    plan = planner.plan(traced, alternatives=0)  # cluster=None, workload=None
    assert planner.DEFAULT_CLUSTER == "8xH100"
    assert plan.cluster.device == "H100-SXM-80GB" and plan.cluster.num_devices == 8
    assert (plan.workload.batch_size, plan.workload.seq_len) == (4, 16)
    explicit = planner.plan(lm.model, None, None, args=lm.args, alternatives=0)
    assert explicit.solver.objective == pytest.approx(plan.solver.objective)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(cluster=5), "a cluster is a Cluster or a spec string"),
    (dict(cluster="8xTPU"), "unknown device 'TPU'"),
    (dict(workload="batch 4"), "workload must be a planner.Workload"),
    (dict(workload=Workload(batch_size=3, seq_len=16)),
     "the model was traced with batch 4 (inputs [(4, 16)]) but the workload asks for batch 3"),
    (dict(workload=Workload(batch_size=4, seq_len=32)),
     "traced with sequence length 16 (inputs [(4, 16)]) but the workload asks for seq_len 32"),
    (dict(alternatives=-3), "alternatives must be a whole number >= 0, got -3"),
    (dict(solver="gurobi"), "solver must be one of cp-sat, reference"),
    (dict(time_limit_s=0), "the solver time limit must be > 0 seconds"),
    (dict(pins=[("tp", 2)]), "pins must be a dict"),
])
def test_plan_refuses_a_bad_request(tiny, kwargs, expected):
    _, traced = tiny
    with pytest.raises(SpecError) as err:
        planner.plan(traced, **{"cluster": "4xcpu", **kwargs})
    assert expected in str(err.value)
    assert isinstance(err.value, planner.USER_ERRORS)


def test_plan_refuses_what_is_not_a_model(tiny):
    lm, _ = tiny
    with pytest.raises(SpecError, match="plans an nn.Module .* or a TracedModel"):
        planner.plan("gpt-tiny", "4xcpu")
    with pytest.raises(SpecError, match="needs example inputs"):
        planner.plan(lm.model, "4xcpu")


@pytest.mark.parametrize("kwargs, expected", [
    (dict(nodes="2", devices_per_node=2, device="cpu"), 'nodes must be a whole number, got "2"'),
    (dict(nodes=1, devices_per_node=2, device="cpu", intra_node_bandwidth=0),
     "intra_node_bandwidth must be a positive number"),
    (dict(nodes=1, devices_per_node=2, device="cpu", memory_bytes=-1), "memory_bytes must be"),
    (dict(nodes=1, devices_per_node=9, device="H100"), "the largest H100-SXM-80GB node has 8"),
])
def test_cluster_constructor_validates(kwargs, expected):
    with pytest.raises(SpecError, match=None) as err:
        Cluster(**kwargs)
    assert expected in str(err.value)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(batch_size=0), "batch size must be >= 1"),
    (dict(batch_size=True), "batch size (--batch) must be a whole number"),
    (dict(seq_len="2048"), "sequence length (--seq) must be a whole number"),
    (dict(dtype="float8"), 'dtype "float8" is not one of'),
    (dict(phase="pretrain"), "phase \"pretrain\" must be one of prefill, decode, train"),
    (dict(phase="train", optimizer="sgd"), "optimizer (--optimizer) \"sgd\" must be one of adamw"),
    (dict(latency_slo_s=-1), "latency SLO must be a positive number"),
])
def test_workload_constructor_validates(kwargs, expected):
    with pytest.raises(SpecError) as err:
        Workload(**kwargs)
    assert expected in str(err.value)


def test_plan_load_and_save_errors(tiny, tmp_path):
    _, traced = tiny
    with pytest.raises(PlanFormatError, match="is a directory"):
        Plan.load(tmp_path)
    plan = planner.plan(traced, "2xcpu", alternatives=0)
    target = tmp_path / "taken"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        plan.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary file left
    bad = plan.__class__(**{**plan.__dict__, "workload": plan.workload.__class__(
        0, 16, "float32", "prefill", "latency")})
    with pytest.raises(PlanFormatError, match="workload.batch_size' must be int >= 1"):
        bad.save(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_load_model_factory_exit_is_an_error(tmp_path):
    path = tmp_path / "f.py"
    path.write_text("import sys\ndef make():\n    sys.exit(3)\n")
    with pytest.raises(ModelLoadError, match=r"called sys.exit\(3\)"):
        load_model(f"{path}:make")
    assert "_fx_planner_factory_f" in sys.modules  # imported, then refused: not exited


def test_user_errors_are_the_documented_classes():
    assert set(planner.USER_ERRORS) == {planner.SpecError, planner.ModelLoadError,
                                        planner.TraceError, planner.PlanError,
                                        planner.PlanFormatError}
    assert issubclass(planner.InfeasiblePlanError, planner.USER_ERRORS)
    assert torch is not None

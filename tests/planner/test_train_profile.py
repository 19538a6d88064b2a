"""A training plan priced with a profile of this CPU: the measured forward + backward of a
layer is what the step's table charges for it (docs/training.md, "Cost model of one step")."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import planner
from cost_models.profiler import profile_model
from planner.api import plan_traced
from planner.cost_builder import CostBuilder
from planner.models import GPT, GPTConfig
from planner.training import TrainCostBuilder


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)).eval()
    ids = torch.randint(0, 64, (2, 16))
    traced = planner.trace(model, args=(ids,))
    prof = profile_model(traced, args=(ids,), cache=tmp_path_factory.mktemp("cache"), warmup=1,
                         repeats=5, node_repeats=1, min_time_s=0, train=True)
    return model, ids, traced, prof


def test_the_train_table_charges_the_measured_forward_backward_at_the_profiled_shape(profiled):
    _, _, traced, prof = profiled
    work = planner.Workload(batch_size=2, seq_len=16, dtype="float32", phase="train")
    forward = CostBuilder(traced, planner.Cluster.parse("2xcpu"), replace(work, phase="prefill"),
                          profile=prof)
    assert 2 in forward.tp_degrees
    table = TrainCostBuilder(forward, work)(2, 1, 0, "intra")
    fwd = forward(2, 1)
    for j, p in enumerate(prof.layers):
        assert table.time[j][(1, "none")] == p.train.time_s
        # full recompute adds the measured forward; selective the attention core's roofline
        assert fwd.costs[j][1].compute_s == p.time_s
        assert table.time[j][(1, "full")] == p.train.time_s + p.time_s
        assert table.time[j][(1, "selective")] >= p.train.time_s
        # at tp 2 scaled as the measured forward is, plus forward's and backward's collectives
        c = fwd.costs[j][2]
        assert table.time[j][(2, "none")] - 2 * c.comm_s == pytest.approx(
            p.train.time_s * c.compute_s / p.time_s, rel=1e-9)
    # At another microbatch size the profile does not apply (as for inference): 3x forward.
    half = TrainCostBuilder(forward, work)(1, 1, 0, "intra")
    assert [half.time[j][(1, "none")] for j in range(len(prof.layers))] == \
        [3 * c[1].compute_s for c in forward(1, 1).costs]


def test_a_plan_with_the_profile_records_measured_layers(profiled):
    model, ids, _, prof = profiled
    work = planner.Workload(batch_size=2, seq_len=16, dtype="float32", phase="train")
    plan = planner.plan(model, "1xcpu", work, args=(ids,), profile=prof, alternatives=0,
                        pins={"microbatches": 1})
    assert plan.provenance == "measured"
    assert {layer.source for layer in plan.layers} == {"measured"}
    (stage,) = plan.stages
    assert stage.predicted.compute_s == pytest.approx(
        sum(p.train.time_s for p in prof.layers), rel=1e-9)


def test_a_cpu_profile_is_refused_for_a_train_plan_on_another_device(profiled):
    _, _, traced, prof = profiled
    work = planner.Workload(batch_size=2, seq_len=16, dtype="bfloat16", phase="train")
    with pytest.raises(ValueError, match="measured on cpu but the cluster's devices are H100"):
        plan_traced(traced, planner.Cluster.parse("8xH100"), work, profile=prof, alternatives=0)

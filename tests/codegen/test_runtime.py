"""Runtime under torchrun (gloo, CPU): every layout equals the eager model within 1e-4.

Each multi-process job runs several (model, plan) cases to keep process start-ups few.
"""

from __future__ import annotations

import datetime
import re
import time

import pytest
import torch
import torch.distributed as dist

from codegen.check import FAIL_RANK_ENV, HANG_RANK_ENV, run_check
from codegen.layout import LayoutError, ParallelLayout
from codegen.runtime import FingerprintMismatch, parallelize
from planner.models import load_model
from tests.codegen.plans import pinned_plan, run_cases, traced_for

TOL = 1e-4
BATCH, SEQ = 4, 8


def _case(model, overrides, layout):
    traced = traced_for(model, overrides, BATCH, SEQ)
    plan = pinned_plan(traced, layout, BATCH, SEQ)
    return {"model": model, "overrides": overrides, "plan": plan.to_dict(),
            "layout": layout, "name": f"{model}{overrides or ''}", "gm": traced.graph_module}


def _check(cases, results, tp_of):
    """Outputs equal eager; every rank inserted exactly the collectives its stage's record
    lists (kind and bytes) and sliced exactly the parameters the record shards, each to
    its share."""
    from planner.plan import Plan
    from planner.sharding import local_shape, same_params

    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        last = [r for r in per_rank if r["max_abs_err"] is not None]
        layout = case["layout"]
        plan = Plan.from_dict(case["plan"])
        names = [layer["name"] for layer in case["plan"]["layers"]]
        kinds = ["pre"] + ["block"] * (len(names) - 2) + ["post"]
        assert len(last) == layout.dp * layout.stages[-1].tp, case["name"]
        for r in last:
            assert r["max_abs_err"] <= TOL, (case["name"], r)
        for r in per_rank:
            stage = plan.stages[r["stage"]]
            first, lastl = stage.layers
            blocks = sum(1 for j in range(first, lastl + 1) if 0 < j < len(names) - 1)
            if stage.tp == 1 or not tp_of(case):
                assert not r["inserted"] and not r["sharded"], case["name"]
                continue
            assert r["inserted"] == sorted(list(c) for c in stage.sharding.collectives()), \
                case["name"]
            strategy = stage.sharding.strategy(names, kinds)

            def canonical(targets, gm=case["gm"]):  # a tied table: two names, one tensor
                return {min(same_params(gm, [t])) for t in targets}

            assert canonical(r["sharded"]) == canonical(strategy), case["name"]
            for name, (_, local_numel, global_shape, _) in r["sharded"].items():
                want = local_shape(global_shape, strategy[name], stage.tp)
                assert local_numel == torch.Size(want).numel(), (case["name"], name)
            if case["model"] == "llama-tiny" and not layout.sequence_parallel:  # Megatron
                emb, head = first == 0, lastl == len(names) - 1
                assert r["collectives"] == {k: n for k, n in {
                    "all_reduce": 2 * blocks + emb, "all_gather_into_tensor": int(head)}.items()
                    if n}, case["name"]


def _transformer(case):
    return case["model"] in ("gpt-tiny", "gpt2-tiny", "llama-tiny")


@pytest.mark.slow
def test_two_ranks_tp_pp_dp_equal_eager(tmp_path):
    simple = ParallelLayout.simple
    cases = [
        _case("gpt-tiny", {}, simple(1, [(0, 5, 2)])),
        _case("gpt2-tiny", {}, simple(1, [(0, 5, 2)])),
        _case("llama-tiny", {}, simple(1, [(0, 5, 2)])),
        _case("llama-tiny", {"num_key_value_heads": 1}, simple(1, [(0, 5, 2)])),
        _case("mlp", {}, simple(1, [(0, 1, 1), (2, 5, 1)], microbatches=2)),
        _case("cnn", {}, simple(2, [(0, 5, 1)], microbatches=2)),
        _case("gpt2-tiny", {}, simple(1, [(0, 3, 1), (4, 5, 1)], microbatches=4)),
        # Sequence parallelism: fused qkv, and GQA with 1 KV head < tp 2.
        _case("gpt-tiny", {}, simple(1, [(0, 5, 2)], sequence_parallel=True)),
        _case("llama-tiny", {"num_key_value_heads": 1},
              simple(1, [(0, 5, 2)], microbatches=2, sequence_parallel=True)),
    ]
    results = run_cases(cases, 2, tmp_path)
    _check(cases, results, _transformer)


@pytest.mark.slow
def test_four_ranks_tp_x_pp_dp_x_pp_dp_x_tp_equal_eager(tmp_path):
    simple = ParallelLayout.simple
    cases = [
        _case("gpt-tiny", {}, simple(1, [(0, 2, 2), (3, 5, 2)], microbatches=2)),
        _case("llama-tiny", {}, simple(1, [(0, 1, 2), (2, 5, 2)], microbatches=2)),
        _case("llama-tiny", {}, simple(2, [(0, 3, 1), (4, 5, 1)], microbatches=2)),
        _case("gpt2-tiny", {}, simple(2, [(0, 5, 2)])),
        _case("cnn", {}, simple(1, [(0, 0, 1), (1, 2, 1), (3, 4, 1), (5, 5, 1)],
                                microbatches=4)),
        # Sequence parallelism with tp × pp on HF GPT-2 (Conv1D, fused c_attn).
        _case("gpt2-tiny", {}, simple(1, [(0, 2, 2), (3, 5, 2)], microbatches=2,
                                      sequence_parallel=True)),
        # A vocabulary tp 4 does not divide: the tables stay whole.
        _case("gpt-tiny", {"vocab_size": 250}, simple(1, [(0, 5, 4)])),
        # tp 1 -> 2 -> 1: the project's own boundary send/recv in both directions.
        _case("llama-tiny", {}, simple(1, [(0, 1, 1), (2, 3, 2), (4, 5, 1)], microbatches=2)),
    ]
    results = run_cases(cases, 4, tmp_path)
    _check(cases, results, _transformer)


@pytest.mark.slow
def test_three_ranks_stages_with_different_tp_equal_eager(tmp_path):
    simple = ParallelLayout.simple
    cases = [
        _case("gpt-tiny", {}, simple(1, [(0, 2, 2), (3, 5, 1)], microbatches=2)),  # 2 -> 1
        # 1 -> 2, with KV heads replicated on the tp-2 stage (1 KV head < tp 2).
        _case("llama-tiny", {"num_key_value_heads": 1}, simple(1, [(0, 2, 1), (3, 5, 2)],
                                                               microbatches=2)),
    ]
    results = run_cases(cases, 3, tmp_path)
    _check(cases, results, _transformer)


@pytest.mark.slow
def test_run_check_launches_torchrun_and_passes(tmp_path, capfd):
    layout = ParallelLayout.simple(1, [(0, 2, 1), (3, 5, 1)], microbatches=2)
    plan = pinned_plan(traced_for("llama-tiny", {"num_hidden_layers": 4}, BATCH, SEQ), layout,
                       BATCH, SEQ)
    plan.save(tmp_path / "plan.json")
    rc = run_check(tmp_path / "plan.json", "llama-tiny", {"num_hidden_layers": 4}, timeout_s=180)
    out = capfd.readouterr().out
    assert rc == 0, out
    assert "max abs error vs the unsharded model" in out


@pytest.fixture()
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


def test_single_rank_plan_runs_and_wrong_fingerprint_is_refused(single_rank_group):
    lm = load_model("gpt-tiny", batch_size=BATCH, seq_len=SEQ)
    layout = ParallelLayout.simple(1, [(0, 5, 1)], microbatches=2)
    plan = pinned_plan(traced_for("gpt-tiny", None, BATCH, SEQ), layout, BATCH, SEQ)
    local = parallelize(lm.model, plan, lm.args)
    with torch.no_grad():
        (out,) = local(*lm.args)
        ref = lm.model(*lm.args)
    assert (out - ref).abs().max().item() <= TOL
    other = load_model("gpt-tiny", {"n_layer": 2}, batch_size=BATCH, seq_len=SEQ)
    with pytest.raises(FingerprintMismatch, match="re-plan"):
        parallelize(other.model, plan, other.args)
    with pytest.raises(LayoutError, match="world size 1"):
        parallelize(lm.model, ParallelLayout.simple(2, [(0, 5, 1)]), lm.args)


def _run_with_rank_1_failing(tmp_path, capfd, monkeypatch, hook_env: str,
                             collective_timeout: float) -> str:
    """tp 1 -> 2 on 3 ranks with rank 1 (stage 1) failing through ``hook_env`` while rank 0
    sends to it and rank 2 waits in the tp group's all-reduce with it. Checks that the job
    fails within the timeouts (not the wall limit); returns the one-paragraph diagnosis."""
    layout = ParallelLayout.simple(1, [(0, 2, 1), (3, 5, 2)], microbatches=2)
    plan = pinned_plan(traced_for("gpt-tiny", None, BATCH, SEQ), layout, BATCH, SEQ)
    plan.save(tmp_path / "plan.json")
    monkeypatch.setenv(hook_env, "1")
    margin = 90  # 3 ranks start and trace on a shared 2-core box
    start = time.monotonic()
    rc = run_check(tmp_path / "plan.json", "gpt-tiny", timeout_s=collective_timeout + margin,
                   collective_timeout_s=collective_timeout)
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert rc not in (0, 124), err[-3000:]
    assert elapsed < collective_timeout + margin
    return err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_rank_that_dies_ends_run_check_with_a_message_naming_it(tmp_path, capfd, monkeypatch):
    message = _run_with_rank_1_failing(tmp_path, capfd, monkeypatch, FAIL_RANK_ENV, 20)
    assert message.startswith("plan run failed: rank 1 (stage 1, replica 0, tp rank 0) died "
                              "with signal 9 (SIGKILL) during forward"), message
    detected = float(re.search(r"([\d.]+) s after rank 1's last record", message).group(1))
    assert detected < 20, message


@pytest.mark.slow
def test_a_rank_that_hangs_is_ended_by_the_collective_timeout_and_named(tmp_path, capfd,
                                                                        monkeypatch):
    # Rank 1 sleeps instead of dying: rank 0's send and rank 2's all-reduce wait for it until
    # the collective timeout, raise, and torchrun stops rank 1.
    message = _run_with_rank_1_failing(tmp_path, capfd, monkeypatch, HANG_RANK_ENV, 15)
    assert re.match(r"plan run failed: rank [02] .* raised first, during forward", message), message
    assert ("rank 1 (stage 1, replica 0, tp rank 0) had raised nothing and was still running "
            "(phase forward)") in message, message

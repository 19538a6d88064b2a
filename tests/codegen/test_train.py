"""Training runtime (issue 14): K AdamW steps on gloo ranks equal single-process training.

Every dimension at least once over the zoo GPT, HF Llama (GQA) and HF GPT-2 (tied
embedding, Conv1D, fused c_attn): dp 2 at each ZeRO level, tp 2 with and without
sequence parallelism, pp 2 with GPipe, 1F1B and interleaved 1F1B (v = 2), tp 2 × pp 2,
dp 2 × pp 2, pp 3 with stages of different tp, recompute none/selective/full. Few torchrun jobs, many cases each; every loss within 1e-4
(relative) of the reference at every step and every final weight within 1e-4.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from codegen.layout import ParallelLayout
from codegen.train import _pipeline_order, attention_cores, next_token_loss, recompute, untrainable
from tests.codegen.plans import pinned_plan, run_cases, traced_for

BATCH, SEQ, STEPS = 4, 8, 3
GPT = ("gpt-tiny", {"n_layer": 2, "n_embd": 32, "vocab_size": 128})
LLAMA = ("hf:llama", {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
                      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128})
GPT2 = ("hf:gpt2", {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 128,
                    "n_positions": 16, "bos_token_id": 0, "eos_token_id": 0})
_TWIN = {"all_reduce": "all_reduce", "all_gather": "all_gather_into_tensor",
         "reduce_scatter": "reduce_scatter_tensor"}


@functools.cache
def _traced_key(model: str, overrides: str):
    return traced_for(model, json.loads(overrides), BATCH, SEQ)


def _traced(model):
    """The trace of ``(name, overrides)`` at the tests' batch and sequence (cached)."""
    return _traced_key(model[0], json.dumps(model[1], sort_keys=True))


def _case(model, layout, **train):
    traced = _traced(model)
    plan = pinned_plan(traced, layout, BATCH, SEQ, phase="train", **train)
    blocks = {j for j, layer in enumerate(traced.layers) if layer.kind == "block"}
    return {"model": model[0], "overrides": model[1], "plan": plan.to_dict(), "steps": STEPS,
            "plan_obj": plan, "blocks": blocks, "name": f"{model[0]} {train} {layout}"}


def _planned_case(model, cluster: str, **pins):
    """A case whose plan the training planner made (pinned as given) for ``cluster``."""
    import planner
    from planner.api import plan_traced

    traced = _traced(model)
    work = planner.Workload(batch_size=BATCH, seq_len=SEQ, phase="train", dtype="float32")
    plan = plan_traced(traced, planner.Cluster.parse(cluster), work, pins=pins, alternatives=0)
    blocks = {j for j, layer in enumerate(traced.layers) if layer.kind == "block"}
    return {"model": model[0], "overrides": model[1], "plan": plan.to_dict(), "steps": STEPS,
            "plan_obj": plan, "blocks": blocks, "name": f"{model[0]} planned {pins}"}


def _check(cases, results):
    """Losses and final weights equal the reference; every rank saw the same loss; the
    backward collectives are the adjoints of exactly the plan's recorded forward ones;
    recompute outlined each block (full) or each attention core (selective)."""
    for i, case in enumerate(cases):
        plan = case["plan_obj"]
        ranks = [r[i] for r in results]
        for r in ranks:
            assert len(r["losses"]) == STEPS, case["name"]
            for got, want in zip(r["losses"], r["reference"], strict=True):
                assert abs(got - want) <= 1e-4 * abs(want), (case["name"], r["losses"],
                                                             r["reference"])
            assert r["losses"] == ranks[0]["losses"], case["name"]
            assert r["max_param_err"] <= 1e-4, (case["name"], r["rank"], r["max_param_err"])
            assert r["params"] > 0
            # the loss moved: three different batches, weights updated between them
            assert len(set(r["losses"])) == STEPS
            for k, s in enumerate(r["stages"]):
                stage = plan.stages[s]
                blocks = [j for j in range(stage.layers[0], stage.layers[1] + 1)
                          if j in case["blocks"]]
                want = {"none": 0, "selective": len(blocks), "full": len(blocks)}
                assert r["recomputed"][k] == want[stage.recompute], case["name"]
                if stage.tp > 1:
                    recorded: dict = {}
                    for kind, _ in stage.sharding.collectives():
                        recorded[_TWIN[kind]] = recorded.get(_TWIN[kind], 0) + 1
                    assert r["differentiable"][k] == recorded, case["name"]
                    assert r["grad_sum"][k] > 0
                else:
                    assert r["differentiable"][k] == {} and r["grad_sum"][k] == 0


@pytest.mark.slow
def test_two_ranks_train_steps_equal_single_process(tmp_path):
    simple = ParallelLayout.simple
    pp2 = [(0, 1, 1), (2, 3, 1)]
    cases = [
        _case(GPT, simple(2, [(0, 3, 1)], 2), zero=0),
        _case(LLAMA, simple(2, [(0, 3, 1)]), zero=1, recompute="selective"),
        _case(GPT2, simple(2, [(0, 3, 1)]), zero=2, recompute="full"),
        _case(GPT, simple(2, [(0, 3, 1)], 2), zero=3),
        _case(LLAMA, simple(1, [(0, 3, 2)]), recompute="full"),
        _case(GPT2, simple(1, [(0, 3, 2)], 2, sequence_parallel=True), recompute="selective"),
        _case(GPT, simple(1, pp2, 2), schedule="gpipe"),
        _case(LLAMA, simple(1, pp2, 2), schedule="1f1b", recompute=["full", "none"]),
        # interleaved, as the planner splits it (planner.interleaved): rank 0 holds stages
        # 0 and 2, rank 1 stages 1 and 3; GPT-2's tied embedding lives in stages 0 and 3,
        # on different ranks
        _planned_case(GPT2, "2xcpu", schedule="interleaved", virtual_stages=2,
                      microbatches=2),
    ]
    plan = cases[-1]["plan_obj"]
    assert (plan.parallelism.pp, plan.parallelism.virtual_stages) == (2, 2)
    assert [s.layers for s in plan.stages] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    results = run_cases(cases, 2, tmp_path)
    _check(cases, results)
    assert [results[r][8]["stages"] for r in range(2)] == [[0, 2], [1, 3]]


@pytest.mark.slow
def test_four_ranks_dp_x_pp_and_mixed_tp_train_steps_equal_single_process(tmp_path):
    """dp 2 × pp 2: the replicas' gradients meet after the pipeline schedule (ZeRO 1 by a
    flat all-reduce under 1F1B; ZeRO 3 by ``fully_shard`` under GPipe, with recompute).

    pp 3 with stage tps (2, 1, 1) and (1, 2, 1): the Trainer's own schedule and boundary
    send/recv. GPT-2's tied embedding lives in stage 0 at tp 2 and its head in stage 2 at
    tp 1 (the copies meet as whole weights); HF Llama runs 1F1B with sequence parallelism
    and full recompute in its tp-2 stage, whose two ranks each send their part of the
    input gradient to the one rank that fed them."""
    simple = ParallelLayout.simple
    pp2 = [(0, 1, 1), (2, 3, 1)]
    cases = [
        _case(GPT2, simple(2, pp2, 2), zero=1, schedule="1f1b"),
        _case(LLAMA, simple(2, pp2, 2), zero=3, schedule="gpipe", recompute="full"),
        _case(GPT2, simple(1, [(0, 1, 2), (2, 2, 1), (3, 3, 1)], 2), schedule="gpipe"),
        _case(LLAMA, simple(1, [(0, 0, 1), (1, 2, 2), (3, 3, 1)], 4, sequence_parallel=True),
              schedule="1f1b", recompute=["none", "full", "none"]),
    ]
    results = run_cases(cases, 4, tmp_path)
    _check(cases, results)
    assert [r[2]["stage"] for r in results] == [0, 0, 1, 2]
    assert [r[3]["stage"] for r in results] == [0, 1, 1, 2]


@pytest.mark.slow
def test_plan_run_check_steps_tp_x_pp_on_four_ranks_end_to_end(tmp_path):
    """The 4-rank job: ``plan run --check --steps 3`` on tp 2 × pp 2 (1F1B, sequence
    parallel, selective recompute) of the zoo GPT, through the CLI."""
    layout = ParallelLayout.simple(1, [(0, 1, 2), (2, 3, 2)], 2, sequence_parallel=True)
    plan = pinned_plan(_traced(GPT), layout, BATCH, SEQ, phase="train", schedule="1f1b",
                       recompute="selective")
    plan.save(tmp_path / "train.json")
    sets = [a for k, v in GPT[1].items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(tmp_path / "train.json"),
                           "--check", "--steps", "3", "--model", GPT[0], *sets],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "losses identical within 1e-4: 3/3 steps" in proc.stdout, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in "012"]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    for row in rows:  # step, loss, reference, relative difference
        assert abs(float(row[1]) - float(row[2])) <= 1e-4 * float(row[2])
    assert len({row[1] for row in rows}) == 3
    weights = next(line for line in proc.stdout.splitlines() if line.startswith("final weights"))
    assert float(weights.split("difference ")[1].split()[0]) <= 1e-4


# --------------------------------------------------------------------- one process


def test_mixed_tp_pipelines_are_trainable_except_interleaved():
    simple = ParallelLayout.simple
    for stages in ([(0, 1, 2), (2, 3, 1)], [(0, 1, 1), (2, 3, 2)],
                   [(0, 1, 2), (2, 2, 1), (3, 3, 1)]):
        for schedule in ("gpipe", "1f1b"):
            assert untrainable(simple(1, stages, 4), schedule) is None, (stages, schedule)
    assert untrainable(simple(2, [(0, 1, 2), (2, 3, 1)], 2, sequence_parallel=True),
                       "1f1b") is None
    why = untrainable(simple(1, [(0, 0, 2), (1, 1, 1), (2, 2, 2), (3, 3, 1)], 4,
                             virtual_stages=2), "interleaved")
    assert "different tp degrees ([2, 1, 2, 1])" in why and "--schedule 1f1b or gpipe" in why


def test_own_pipeline_order_is_torchs_gpipe_and_1f1b_order():
    """The mixed-tp schedule runs each stage's forwards and backwards in the order of
    ``ScheduleGPipe`` / ``Schedule1F1B._step_microbatches`` (torch 2.13)."""
    assert _pipeline_order("gpipe", 1, 3, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    f, b = "F", "B"
    assert _pipeline_order("1f1b", 0, 3, 4) == [(f, 0), (f, 1), (f, 2), (b, 0), (f, 3),
                                                (b, 1), (b, 2), (b, 3)]
    assert _pipeline_order("1f1b", 2, 3, 4) == [(f, 0), (b, 0), (f, 1), (b, 1), (f, 2),
                                                (b, 2), (f, 3), (b, 3)]
    for stage in range(4):
        order = _pipeline_order("1f1b", stage, 4, 6)
        assert sorted(order) == [(b, k) for k in range(6)] + [(f, k) for k in range(6)]
        # in flight at once: at most pp − stage microbatches (1F1B's memory bound)
        live = [sum(1 if a == f else -1 for a, _ in order[:i + 1]) for i in range(12)]
        assert max(live) == 4 - stage


def test_microbatch_losses_add_up_to_the_batch_loss():
    torch.manual_seed(0)
    logits, ids = torch.randn(4, 8, 16), torch.randint(0, 16, (4, 8))
    whole = next_token_loss(logits, ids, 4 * 7)
    parts = sum(next_token_loss(logits[k:k + 1], ids[k:k + 1], 4 * 7) for k in range(4))
    mean = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16), ids[:, 1:].reshape(-1))
    assert torch.allclose(whole, parts, atol=1e-6) and torch.allclose(whole, mean, atol=1e-6)


class _UnfusedAttention(nn.Module):
    """Attention written out (q kᵀ, scale, softmax, @ v) between two projections."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
        return self.out(att @ v)


def test_selective_recompute_outlines_the_softmax_matmul_core_and_keeps_gradients():
    import planner

    torch.manual_seed(0)
    model = _UnfusedAttention()
    x = torch.randn(2, 4, 8)
    traced = planner.trace(model, (x,))
    gm = traced.graph_module
    (core,) = attention_cores(gm)
    ops = [n.target for n in core]
    assert ops[0] in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
    assert ops[-1] in (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)
    assert any("softmax" in str(t) for t in ops)
    assert not any(t is torch.ops.aten.linear.default for t in ops)  # projections stay out
    ref = _first(gm(x))
    ref.sum().backward()
    want = {n: p.grad.clone() for n, p in gm.named_parameters()}
    gm.zero_grad()
    regions = recompute(gm, "selective", traced.layer_of_node, set())
    assert [len(r) for r in regions] == [len(core)]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"
            and n.target.startswith("recompute")] == ["recompute_0"]
    out = _first(gm(x))
    assert torch.equal(out, ref)
    out.sum().backward()
    for n, p in gm.named_parameters():
        assert torch.equal(p.grad, want[n]), n


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_steps_and_new_tokens_on_the_wrong_plan_are_refused(tmp_path, capsys, monkeypatch):
    import codegen.check
    from planner.cli import main

    def launched(*a, **k):
        raise AssertionError("plan run launched ranks for a plan it should have refused")

    monkeypatch.setattr(codegen.check.subprocess, "Popen", launched)
    traced = _traced(GPT)
    layout = ParallelLayout.simple(1, [(0, 3, 2)])
    pinned_plan(traced, layout, BATCH, SEQ).save(tmp_path / "prefill.json")
    pinned_plan(traced, layout, BATCH, SEQ, phase="train").save(tmp_path / "train.json")
    pinned_plan(traced, ParallelLayout.simple(1, [(0, 1, 1), (2, 3, 1)]), BATCH, SEQ,
                phase="train", schedule="1f1b").save(tmp_path / "1f1b.json")
    model = ["--model", GPT[0], *[a for k, v in GPT[1].items() for a in ("--set", f"{k}={v}")]]
    for plan, flags, says in (("prefill.json", ["--steps", "3"], "is a prefill plan"),
                              ("train.json", ["--new-tokens", "4"], "use --steps K"),
                              ("train.json", ["--steps", "0"], "--steps must be >= 1"),
                              ("1f1b.json", ["--steps", "3"],
                               "1F1B needs at least as many microbatches as stages "
                               "(microbatches 1, pp 2)")):
        rc = main(["run", str(tmp_path / plan), "--check", *flags, *model])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert says in " ".join(err.split()), err


def test_a_step_whose_loss_differs_fails_the_check_and_shows_every_step(capsys):
    from codegen.check import _report_train

    def rank(losses, err=0.0):
        return {"losses": losses, "reference": [4.0, 3.0, 2.0], "max_param_err": err,
                "seconds": [0.1, 0.1, 0.1]}

    assert _report_train([rank([4.0, 3.0, 2.0]), rank([4.0, 3.0, 2.0])], True, 1e-4, None) == 0
    assert "losses identical within 1e-4: 3/3 steps" in capsys.readouterr().out
    # step 1 off by 2e-4 relative on one rank
    assert _report_train([rank([4.0, 3.0, 2.0]), rank([4.0, 3.0006, 2.0])], True, 1e-4,
                         None) == 1
    out, err = capsys.readouterr()
    assert "losses identical within 1e-4: 2/3 steps" in out
    assert [line.split()[:3] for line in out.splitlines()[1:4]] == [
        ["0", "4.0000000", "4.0000000"], ["1", "3.0006000", "3.0000000"],
        ["2", "2.0000000", "2.0000000"]]
    assert "1 of 3 step losses differ" in err
    # losses equal, final weights not
    assert _report_train([rank([4.0, 3.0, 2.0], 2e-4)], True, 1e-4, None) == 1
    assert "final weights differ by 2.000e-04 > 1e-4" in capsys.readouterr().err


@pytest.mark.slow
def test_a_plan_the_planner_made_trains_equal_to_one_process(tmp_path):
    """``plan MODEL --phase train`` then ``plan run --check --steps 3``: the plan the solver
    writes (dp 2, ZeRO 1 pinned on 2 cpu ranks) is the one the runtime runs, loss for loss."""
    plan_file = tmp_path / "train.json"
    sets = [a for k, v in LLAMA[1].items() for a in ("--set", f"{k}={v}")]
    made = subprocess.run([sys.executable, "-m", "planner.cli", LLAMA[0], *sets,
                           "--cluster", "2xcpu", "--phase", "train", "--batch", "4", "--seq",
                           "8", "--dtype", "float32", "--dp", "2", "--zero", "1",
                           "--alternatives", "0", "--out", str(plan_file)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    written = json.loads(plan_file.read_text())
    assert written["workload"]["phase"] == "train"
    assert (written["parallelism"]["dp"], written["parallelism"]["zero"]) == (2, 1)
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan_file),
                           "--check", "--steps", "3"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "losses identical within 1e-4: 3/3 steps" in proc.stdout, proc.stdout

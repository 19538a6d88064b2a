"""Generation across tensor-parallel, pipeline and data-parallel gloo ranks.

The worker (``generate_worker.py``) shards the traced prefill and decode graphs of a
``planner.decode.DecodeStep`` per stage and tensor-parallel rank (``shard_stage``: the
cache inputs take the placement of the keys/values written into them) and generates
greedily, each rank with its own piece of its stage's cache, microbatches in flight across
the stages. Every rank's tokens must equal the unsharded model's greedy generation
(transformers' ``generate(do_sample=False)``, the zoo GPT's own loop) for left-padded
prompts of different lengths with an EOS mid-generation; the cache must really be split by
KV heads where the KV heads divide tp, and whole where they do not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.decode import DecodeStep, greedy_generate
from tests.codegen.generate_worker import build_model

pytest.importorskip("transformers")

PROMPT, NEW, CONTEXT, PAD = 6, 8, 16, 0
_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 64}
_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "vocab_size": 256,
         "n_positions": 64, "initializer_range": 0.3}
# Untied: the tiny random zoo GPT tied to its N(0, 1) embedding repeats the prompt's last
# token, and no EOS could appear mid-generation.
_ZOO = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 256, "block_size": 64,
        "tie_embeddings": False}
CASES = {
    # (model type, config, KV heads per rank at tp 2: the cache's share)
    "llama-gqa": ("llama", {**_BASE, "num_key_value_heads": 2}, 1),
    "llama-mqa": ("llama", {**_BASE, "num_key_value_heads": 1}, 1),  # kv < tp: whole
    "gpt2": ("gpt2", _GPT2, 2),
    "qwen2": ("qwen2", {**_BASE, "num_key_value_heads": 2}, 1),
    "phi3": ("phi3", {**_BASE, "num_key_value_heads": 2, "pad_token_id": PAD}, 1),
    "mistral": ("mistral", {**_BASE, "num_key_value_heads": 2, "head_dim": 16,
                            "sliding_window": None}, 1),
    "zoo-gpt": ("zoo", _ZOO, 2),
}


def _case(name: str, batch: int = 2, **layout) -> dict:
    """Prompts of lengths 6, 4, 5, 3, ... (left-padded) and an EOS id that one sequence
    produces at a step k >= 1 and no other sequence does before its end; ``layout``: dp,
    pp, microbatches (tp is what the ranks leave)."""
    model_type, config, _ = CASES[name]
    case = {"name": name, "type": model_type, "config": config, "prompt": PROMPT, "new": NEW,
            "context": CONTEXT, "pad": PAD, **layout}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config["vocab_size"], (batch, PROMPT), generator=g)
    mask = torch.ones(batch, PROMPT, dtype=torch.long)
    for i in range(batch):
        short = (0, 2, 1, 3)[i % 4]
        ids[i, :short], mask[i, :short] = PAD, 0
    case.update(ids=ids.tolist(), mask=mask.tolist())
    free = greedy_generate(DecodeStep(build_model(case), context_len=CONTEXT), ids, mask, NEW)
    for k in range(1, NEW - 2):
        for a in range(batch):
            tok = int(free[a, k])
            others = [t for i in range(batch) if i != a for t in free[i].tolist()]
            if tok not in free[a, :k].tolist() and tok not in others and tok != PAD:
                return {**case, "eos": tok, "stop": [a, k]}
    raise AssertionError(f"no mid-generation EOS in {free.tolist()}; change the seed")


def _run(cases: list[dict], nproc: int, workdir: Path) -> list[list[dict]]:
    """The cases in one torchrun job of ``nproc`` gloo ranks: results[rank][case]."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cases.json").write_text(json.dumps(cases))
    worker = Path(__file__).with_name("generate_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "--max-restarts=0", str(worker),
           str(workdir / "cases.json"), str(workdir)]
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, timeout=400, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]


def _same_as_generate(case: dict, ranks: list[dict]) -> None:
    """Every rank's rows equal the reference's (up to each sequence's EOS, padding after);
    the reference has the case's EOS at its step, and a full-length sequence (the EOS
    stopped one sequence, not the batch)."""
    reference = ranks[0]["reference"]
    a, k = case["stop"]
    name = case["name"]
    assert reference[a][k] == case["eos"] and max(map(len, reference)) == NEW, name
    assert all(x == PAD for x in reference[a][k + 1:]), name
    for r in ranks:  # a dp replica whose sequences all ended stops: the rest is padding
        lo, hi = r["rows"]
        got = [row + [PAD] * (NEW - len(row)) for row in r["tokens"]]
        assert got == reference[lo:hi], (name, r["rows"], r["tokens"], reference)


def test_generation_on_2_ranks_equals_generate_for_tp2_pp2_and_dp2(tmp_path):
    """One 2-rank job: every model at tp 2 (the cache split by KV heads, whole when kv <
    tp); HF llama and the zoo GPT at pp 2 with 2 microbatches in flight (each stage holds
    one block's cache of each microbatch); HF gpt2 at dp 2 (each replica one sequence)."""
    tp2 = [_case(name) for name in CASES]
    pp2 = [_case(name, pp=2, microbatches=2) for name in ("llama-gqa", "zoo-gpt")]
    dp2 = [_case("gpt2", dp=2)]
    cases = tp2 + pp2 + dp2
    ranks = _run(cases, 2, tmp_path)
    for i, case in enumerate(cases):
        _same_as_generate(case, [r[i] for r in ranks])
    for i in range(len(tp2), len(tp2) + len(pp2)):
        pp = [r[i] for r in ranks]
        assert [r["stage"] for r in pp] == [0, 1] and [r["rows"] for r in pp] == [[0, 2]] * 2
        assert [r["cache_inputs"] for r in pp] == [2, 2]  # one block of 2 per stage
        assert all(not r["state"] and not r["collectives"] for r in pp)  # tp 1
    assert [r[-1]["rows"] for r in ranks] == [[0, 1], [1, 2]]  # dp 2: a row per replica
    for i, (name, (_, config, kv_local)) in enumerate(CASES.items()):
        r0, r1 = ranks[0][i], ranks[1][i]
        # one all-reduce after attention and one after the MLP per block; no gather of
        # the cache (the head's logits are gathered once)
        kinds = [kind for kind, _ in r0["collectives"]]
        blocks = config.get("num_hidden_layers", config.get("n_layer"))
        assert kinds.count("all_reduce") >= 2 * blocks, (name, kinds)
        assert len(r0["state"]) == 2 * blocks, name
        for full, local in r0["state"].values():  # [b, kv heads, context, head_dim]
            assert local == [full[0], kv_local, full[2], full[3]], (name, full, local)
        assert r0["state"] == r1["state"] and r0["sharded"], name


def test_generation_on_4_ranks_tp2_pp2_and_dp2_tp2(tmp_path):
    """4 ranks: HF llama (GQA) at tp 2 x pp 2 with 2 microbatches of 2 sequences in flight,
    each rank holding its stage's block's cache split by KV heads; the zoo GPT at dp 2 x
    tp 2 (each replica two sequences)."""
    cases = [_case("llama-gqa", batch=4, pp=2, microbatches=2),
             _case("zoo-gpt", batch=4, dp=2)]
    ranks = _run(cases, 4, tmp_path)
    llama, zoo = [r[0] for r in ranks], [r[1] for r in ranks]
    _same_as_generate(cases[0], llama)
    _same_as_generate(cases[1], zoo)
    assert [r["stage"] for r in llama] == [0, 0, 1, 1]
    for r in llama:
        assert r["cache_inputs"] == 2 and len(r["state"]) == 2
        for full, local in r["state"].values():  # one microbatch: 2 rows
            assert local == [2, 1, full[2], full[3]] and full[:2] == [2, 2], (full, local)
    assert [r["rows"] for r in zoo] == [[0, 2], [0, 2], [2, 4], [2, 4]]
    for r in zoo:
        assert r["cache_inputs"] == 4 and all(loc[1] == 2 for _, loc in r["state"].values())


def _cli(*args, cwd):
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


_MODEL = ["hf:llama", "--set", "hidden_size=64", "--set", "intermediate_size=128",
          "--set", "num_hidden_layers=2", "--set", "num_attention_heads=4",
          "--set", "num_key_value_heads=2", "--set", "vocab_size=256"]


def test_plan_run_check_generates_a_decode_plan_token_for_token(tmp_path):
    """`plan run --check --json` on a tp-2 decode plan: prefill, 8 greedy steps on 2 gloo
    ranks, every token equal to the unsharded model's ``generate``, and the stage's
    allocated KV-cache bytes equal to the plan's prediction: each rank holds half the cache
    (2 blocks x k, v x [2, 1, 24, 16] fp32 = 12288 bytes of 24576); then the Python API
    (``planner.parallelize(...).generate``) on the same plan. (The README's `plan run` of a
    pp-2 plan with 2 microbatches checks the same per stage in the printed table.)"""
    made = _cli(*_MODEL, "--cluster", "2xcpu", "--phase", "decode", "--batch", "2",
                "--seq", "8", "--context", "24", "--tp", "2", "--alternatives", "0",
                "--out", "plan.json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    # a prompt and new tokens beyond the plan's KV cache: refused before anything starts
    bad = _cli("run", "plan.json", "--prompt-len", "20", "--new-tokens", "8", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr
    assert "KV cache of 24 tokens" in bad.stderr and "Traceback" not in bad.stderr

    ran = _cli("run", "plan.json", "--check", "--new-tokens", "8", "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads(ran.stdout)
    assert report["tokens"]["identical"] == report["tokens"]["total"] == 16, report["tokens"]
    assert report["prompt_len"] == 16 and report["ttft_s"]["predicted_prompt_len"] == 8
    [stage] = report["stages"]
    assert stage["ranks"] == [0, 1] and stage["tp"] == 2
    assert stage["kv_cache_bytes"] == {"allocated": 12288, "predicted": 12288}, stage
    for key in ("prefill_s", "decode_step_s"):
        assert stage[key]["measured"] > 0 and stage[key]["predicted"] > 0, stage
    assert report["ttft_s"]["measured"] > 0 and report["ttft_s"]["predicted"] > 0
    tpot = report["tpot_s"]
    assert tpot["n"] == 7 and tpot["p10"] <= tpot["median"] <= tpot["p90"], tpot  # 8 tokens
    step = report["decode_step_s"]["predicted"]
    assert abs(tpot["predicted"] - step) <= 1e-9 * step, (tpot, step)  # one stage, m = 1

    # the Python API on the same plan: planner.parallelize(...).generate on every rank
    out = tmp_path / "api"
    out.mkdir()
    worker = Path(__file__).with_name("generate_worker.py")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "--max-restarts=0", str(worker), "--api",
                           str(tmp_path / "plan.json"), str(out)],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rows"] for r in ranks] == [[0, 2], [0, 2]]  # dp 1: both ranks, both rows
    assert all(r["tokens"] == ranks[0]["reference"] for r in ranks), ranks

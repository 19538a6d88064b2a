"""Tensor-parallel generation: the decode step's KV cache sharded by the analysis.

Two gloo ranks (CPU, one thread each) shard the traced prefill and decode graphs of a
``planner.decode.DecodeStep`` (``shard_stage``: the cache inputs take the placement of the
keys/values written into them) and generate greedily, each with its own piece of the cache.
Every rank's tokens must equal transformers' ``generate(do_sample=False)`` on the unsharded
model, for left-padded prompts of different lengths with an EOS mid-generation; the cache
must really be split by KV heads where the KV heads divide tp, and whole where they do not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planner.decode import DecodeStep, greedy_generate
from planner.models import load_model

pytest.importorskip("transformers")

PROMPT, NEW, CONTEXT, PAD = 6, 8, 16, 0
_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 64}
CASES = {
    # (model type, config, KV heads per rank at tp 2: the cache's share)
    "llama-gqa": ("llama", {**_BASE, "num_key_value_heads": 2}, 1),
    "llama-mqa": ("llama", {**_BASE, "num_key_value_heads": 1}, 1),  # kv < tp: whole
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128,
                      "vocab_size": 256, "n_positions": 64, "initializer_range": 0.3}, 2),
    "qwen2": ("qwen2", {**_BASE, "num_key_value_heads": 2}, 1),
}


def _case(model_type: str, config: dict) -> dict:
    """Prompts of lengths 6 and 4 (left-padded) and an EOS id that one sequence produces
    at a step k >= 1 and the other never does."""
    model = load_model("hf:" + model_type, config).model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config["vocab_size"], (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    ids[1, :2], mask[1, :2] = PAD, 0
    free = greedy_generate(DecodeStep(model, context_len=CONTEXT), ids, mask, NEW)
    for k in range(1, NEW - 2):
        for a in (0, 1):
            tok = int(free[a, k])
            if tok not in free[a, :k].tolist() and tok not in free[1 - a].tolist() and tok != PAD:
                return {"type": model_type, "config": config, "ids": ids.tolist(),
                        "mask": mask.tolist(), "prompt": PROMPT, "new": NEW,
                        "context": CONTEXT, "eos": tok, "pad": PAD, "stop": [a, k]}
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
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]


def _same_as_generate(case: dict, ranks: list[dict], name: str) -> None:
    reference = ranks[0]["reference"]
    a, k = case["stop"]
    assert len(reference[0]) == NEW and reference[a][k] == case["eos"], name
    assert all(r["tokens"] == reference for r in ranks), (name, [r["tokens"] for r in ranks])


def test_tp2_and_pp2_generation_equal_hf_generate_with_the_cache_split_by_kv_heads(tmp_path):
    """One 2-rank job: every model at tp 2, then HF llama at pp 2 (each stage holds one
    block's cache, no collectives)."""
    gqa = CASES["llama-gqa"]
    cases = [_case(t, c) for t, c, _ in CASES.values()] + [{**_case(gqa[0], gqa[1]), "pp": 2}]
    ranks = _run(cases, 2, tmp_path)
    pp2 = [r[-1] for r in ranks]
    _same_as_generate(cases[-1], pp2, "llama pp2")
    assert [r["stage"] for r in pp2] == [0, 1]
    assert [r["cache_inputs"] for r in pp2] == [2, 2]  # one block of 2 per stage
    assert all(not r["state"] and not r["collectives"] for r in pp2)  # tp 1
    for i, (name, (_, config, kv_local)) in enumerate(CASES.items()):
        r0, r1 = ranks[0][i], ranks[1][i]
        _same_as_generate(cases[i], [r0, r1], name)
        # one all-reduce after attention and one after the MLP per block; no gather of
        # the cache (the head's logits are gathered once)
        kinds = [kind for kind, _ in r0["collectives"]]
        blocks = config.get("num_hidden_layers", config.get("n_layer"))
        assert kinds.count("all_reduce") >= 2 * blocks, (name, kinds)
        assert len(r0["state"]) == 2 * blocks, name
        for full, local in r0["state"].values():  # [b, kv heads, context, head_dim]
            assert local == [full[0], kv_local, full[2], full[3]], (name, full, local)
        assert r0["state"] == r1["state"] and r0["sharded"], name


def test_tp2_pp2_generation_keeps_each_rank_piece_of_its_stage_cache(tmp_path):
    """tp 2 x pp 2 on 4 ranks (HF llama, GQA): each rank holds its stage's block's cache
    split by KV heads; every rank returns the tokens of ``generate``."""
    gqa = CASES["llama-gqa"]
    case = {**_case(gqa[0], gqa[1]), "pp": 2}
    rows = [r[0] for r in _run([case], 4, tmp_path)]
    _same_as_generate(case, rows, "llama tp2pp2")
    assert [r["stage"] for r in rows] == [0, 0, 1, 1]
    for r in rows:
        assert r["cache_inputs"] == 2 and len(r["state"]) == 2
        for full, local in r["state"].values():
            assert local == [full[0], gqa[2], full[2], full[3]], (full, local)


def _cli(*args, cwd):
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


_MODEL = ["hf:llama", "--set", "hidden_size=64", "--set", "intermediate_size=128",
          "--set", "num_hidden_layers=2", "--set", "num_attention_heads=4",
          "--set", "num_key_value_heads=2", "--set", "vocab_size=256"]


def test_plan_run_check_generates_a_decode_plan_token_for_token(tmp_path):
    """`plan run --check` on a tp-2 decode plan: prefill, 8 greedy steps on 2 gloo ranks,
    every token equal to the unsharded model's ``generate``; each rank holds half the KV
    cache (2 blocks x k, v x [2, 1, 24, 16] fp32 = 12288 bytes of 24576)."""
    made = _cli(*_MODEL, "--cluster", "2xcpu", "--phase", "decode", "--batch", "2",
                "--seq", "8", "--context", "24", "--tp", "2", "--out", "plan.json",
                cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    ran = _cli("run", "plan.json", "--check", "--new-tokens", "8", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "tokens identical: 16/16" in ran.stdout, ran.stdout
    assert re.search(r"^\s+0\s+0,1\s+12288$", ran.stdout, re.M), ran.stdout
    assert re.search(r"TTFT [0-9.]+ s .*TPOT median [0-9.]+ s", ran.stdout), ran.stdout
    # a prompt and new tokens beyond the plan's KV cache: refused before anything starts
    bad = _cli("run", "plan.json", "--prompt-len", "20", "--new-tokens", "8", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: "), bad.stderr
    assert "KV cache of 24 tokens" in bad.stderr and "Traceback" not in bad.stderr

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

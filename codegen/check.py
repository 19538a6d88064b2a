"""Run a plan under torchrun and compare it with the unsharded model (``plan run --check``).

Usage (what ``run_check`` launches; torchrun is the launcher, nothing home-made)::

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m codegen.check \\
        --plan plan.json --model llama-tiny --set num_hidden_layers=4 --tol 1e-4

Every rank builds the model from the same spec and seed, runs the eager model and its own
part of the plan on the same inputs, and rank 0 prints the max abs error, the measured time
per stage next to the plan's prediction, and exits non-zero beyond the tolerance.
``--cases cases.json --out DIR`` runs several (model, plan) cases in one job and writes one
JSON result per rank (what the tests use).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["run_check", "torchrun_command", "check_case", "main"]

_TIMEOUT = datetime.timedelta(seconds=60)


def torchrun_command(nproc: int, worker_args: list[str]) -> list[str]:
    """The ``python -m torch.distributed.run`` command line for ``codegen.check``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "codegen.check", *worker_args]


def run_check(plan_path: str | Path, model: str, overrides: dict | None = None, *,
              tol: float = 1e-4, seed: int = 0, timeout_s: float = 600) -> int:
    """Launch ``plan_path`` with torchrun on this machine and check it against the model.

    Args:
        plan_path: a ``fx-planner/plan/v1`` file.
        model: the MODEL spec the plan was made for (``llama-tiny``, ``hf:gpt2``...).
        overrides: ``--set`` config overrides used when planning.
        tol: max abs error allowed (fp32).
        seed: weight and input seed (the same on every rank).
        timeout_s: wall-clock limit for the whole job.

    Returns:
        torchrun's exit status: 0 when every output is within ``tol``.
    """
    from planner.plan import Plan

    plan = Plan.load(plan_path)
    nproc = plan.parallelism.dp * sum(s.tp for s in plan.stages)
    args = ["--plan", str(plan_path), "--model", model, "--tol", str(tol), "--seed", str(seed)]
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        return subprocess.run(torchrun_command(nproc, args), env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"plan run: the job exceeded {timeout_s:.0f} s and was stopped", file=sys.stderr)
        return 124


def check_case(model_spec: str, overrides: dict, plan, *, seed: int = 0) -> dict:
    """Run one plan on this rank and measure it against the eager model (inside torchrun).

    Returns:
        This rank's result: coordinates, ``max_abs_err`` (last-stage ranks, else ``None``),
        ``all_reduces`` in its graph, ``sharded`` weights ``{name: [global numel, local
        numel, global shape, local shape]}``, and ``seconds`` for one step.
    """
    from codegen.runtime import parallelize
    from codegen.tensor_parallel import count_collectives
    from planner.models import load_model

    w = plan.workload
    lm = load_model(model_spec, overrides, batch_size=w.batch_size, seq_len=w.seq_len, seed=seed)
    with torch.no_grad():
        ref = [x for x in pytree.tree_leaves(lm.model(*lm.args, **lm.kwargs))
               if isinstance(x, torch.Tensor)]
    local = parallelize(lm.model, plan, lm.args, lm.kwargs)
    dist.barrier(group=None)
    with torch.no_grad():
        start = time.perf_counter()
        out = local(*lm.args, **lm.kwargs)
        seconds = time.perf_counter() - start
    err = None
    if out is not None:
        lo, hi = local.rows(w.batch_size)
        err = max((o - r[lo:hi]).abs().max().item() for o, r in zip(out, ref, strict=True))
    module = local.module
    sharded = {name: [int(torch.Size(g).numel()), module.get_parameter(name).numel(),
                      list(g), list(loc)]
               for name, (g, loc) in local.tp_report.sharded.items()}
    return {"rank": dist.get_rank(), "stage": local.coords.stage,
            "replica": local.coords.replica, "tp_rank": local.coords.tp_rank,
            "max_abs_err": err, "all_reduces": count_collectives(module).get("all_reduce", 0),
            "sharded": sharded, "seconds": seconds}


def _init() -> None:
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one torchrun rank."""
    from planner.models.loader import parse_set
    from planner.plan import Plan

    p = argparse.ArgumentParser(prog="python -m codegen.check")
    p.add_argument("--plan")
    p.add_argument("--model")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", help="JSON list of {model, overrides, plan} (tests)")
    p.add_argument("--out", help="directory for per-rank JSON results (with --cases)")
    a = p.parse_args(argv)
    _init()
    rank = dist.get_rank()
    try:
        if a.cases:
            results = []
            for case in json.loads(Path(a.cases).read_text()):
                plan = Plan.from_dict(case["plan"])
                results.append(check_case(case["model"], case.get("overrides", {}), plan,
                                          seed=a.seed))
            Path(a.out, f"rank{rank}.json").write_text(json.dumps(results))
            return 0
        plan = Plan.load(a.plan)
        result = check_case(a.model, parse_set(a.set), plan, seed=a.seed)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if rank != 0:
            return 0
        return _report(plan, gathered, a.tol)
    finally:
        dist.destroy_process_group()


def _report(plan, results: list[dict], tol: float) -> int:
    errs = [r["max_abs_err"] for r in results if r["max_abs_err"] is not None]
    worst = max(errs)
    print(f"{'stage':>5} {'ranks':>10} {'measured s':>11} {'predicted compute s':>20}")
    for i, stage in enumerate(plan.stages):
        ranks = [r for r in results if r["stage"] == i]
        measured = max(r["seconds"] for r in ranks)
        print(f"{i:>5} {','.join(str(r['rank']) for r in ranks):>10} {measured:>11.4f} "
              f"{stage.predicted.compute_s:>20.6f}")
    end_to_end = max(r["seconds"] for r in results)
    print(f"end to end: measured {end_to_end:.4f} s, plan predicts {plan.predicted.latency_s:.6f} s"
          f" (prediction is for {plan.cluster.device}; this run is on "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'})")
    print(f"max abs error vs the unsharded model: {worst:.3e} (tolerance {tol:.0e})")
    if worst > tol:
        print("FAILED: outputs differ beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

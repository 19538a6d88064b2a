"""Plan a model for the ranks of this job, then run this rank's part of it.

Usage (4 CPU processes with gloo, from the repository root):

    .venv/bin/torchrun --standalone --nproc-per-node 4 examples/plan_and_run.py

Rank 0 plans (the solver is deterministic, but one planner is enough) and broadcasts the
plan; every rank builds the same model from the same seed, takes its stage / shard / batch
slice with ``planner.parallelize`` and runs it. The last pipeline stage of each replica
compares its rows with the unsharded model.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import planner
from planner.models import load_model

BATCH, SEQ = 4, 32


def main() -> None:
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if backend == "gloo" else "H100"
    loaded = load_model("llama-tiny", batch_size=BATCH, seq_len=SEQ)  # same seed on every rank

    box = [None]
    if rank == 0:
        plan = planner.plan(loaded.model, f"{world}x{device}",
                            planner.Workload(batch_size=BATCH, seq_len=SEQ, dtype="float32"),
                            kwargs=loaded.kwargs, alternatives=0, pins={"tp": 2})
        box = [plan.to_dict()]
        print(f"plan: dp {plan.parallelism.dp} x pp {plan.parallelism.pp} x tp "
              f"{[s.tp for s in plan.stages]}, predicted latency {plan.predicted.latency_s:.4f} s")
    dist.broadcast_object_list(box, src=0)
    plan = planner.Plan.from_dict(box[0])

    local = planner.parallelize(loaded.model, plan, kwargs=loaded.kwargs)
    with torch.no_grad():
        out = local(**loaded.kwargs)
        if out is not None:  # the last stage of a replica holds that replica's rows
            lo, hi = local.rows(BATCH)
            expected = loaded.model(**loaded.kwargs).logits[lo:hi]
            err = (out[0] - expected).abs().max().item()
            print(f"rank {rank}: rows {lo}..{hi - 1}, max abs error vs eager {err:.2e}")
            assert err <= 1e-4, f"rank {rank}: sharded output differs from eager by {err}"
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

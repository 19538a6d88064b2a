"""The training cost model against Narayanan et al. 2021, Table 1 (issue 14, part 6).

"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
(arXiv 2104.04473) trains GPT models (vocabulary 51,200, sequence 2048, fp16) on Selene:
DGX A100-80GB nodes of 8 GPUs with 8 x 200 Gb/s InfiniBand per node (the catalogue's
``A100-80GB``: 25 GB/s per GPU between nodes), with activation recomputation, and reports
achieved TFLOP/s per GPU. The paper counts FLOPs per iteration as

    F = 96 B s l h^2 (1 + s / (6 h) + V / (16 l h))

which includes the recomputed forward; MFU (model FLOPs only, no recompute) counts

    F_model = 72 B s l h^2 (1 + s / (6 h)) + 6 B s h V.

For each row this script plans the model with the planner's own cost model pinned to the
paper's configuration (tp, pp, dp = GPUs / (tp pp), full recompute, plain data parallelism
(ZeRO 0, as Megatron-LM had then), the global batch) and prints the predicted TFLOP/s per
GPU in the paper's count, its error against the paper, MFU, and the planner's unpinned
plan for the same cluster and batch with its predicted TFLOP/s (the target: at least as
fast as the paper's configuration). Target: each pinned prediction within +-15%.

    .venv/bin/python benchmarks/published_training.py            # the table
    .venv/bin/python benchmarks/published_training.py --json     # machine-readable
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import planner  # noqa: E402
from planner.cluster import Cluster, Workload  # noqa: E402
from planner.models.loader import load_model  # noqa: E402

VOCAB, SEQ = 51200, 2048
A100_FP16_PEAK = 312e12  # dense fp16 FLOP/s of an A100 (the paper's "theoretical peak")
TOLERANCE = 0.15


@dataclass(frozen=True)
class Row:
    """One row of Table 1: the model, the paper's configuration and its result."""

    name: str
    hidden: int
    layers: int
    heads: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops: float  # achieved TFLOP/s per GPU, as the paper reports

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)


ROWS = (
    Row("GPT 1.7B", 2304, 24, 24, 1, 1, 32, 512, 137.0),
    Row("GPT 18.4B", 6144, 40, 48, 8, 1, 256, 1024, 135.0),
    Row("GPT 145.6B", 12288, 80, 96, 8, 8, 1536, 2304, 148.0),
    Row("GPT 1008B", 25600, 128, 160, 8, 64, 3072, 3072, 163.0),
)


def paper_flops(row: Row) -> float:
    """FLOPs of one iteration as the paper counts them (recomputed forward included)."""
    b, s, n, h = row.batch, SEQ, row.layers, row.hidden
    return 96 * b * s * n * h * h * (1 + s / (6 * h) + VOCAB / (16 * n * h))


def model_flops(row: Row) -> float:
    """FLOPs of one iteration without recompute (for MFU)."""
    b, s, n, h = row.batch, SEQ, row.layers, row.hidden
    return 72 * b * s * n * h * h * (1 + s / (6 * h)) + 6 * b * s * h * VOCAB


def _traced(row: Row):
    overrides = {"n_embd": row.hidden, "n_layer": row.layers, "n_head": row.heads,
                 "vocab_size": VOCAB, "n_positions": SEQ}
    lm = load_model("hf:gpt2", overrides, batch_size=row.batch, seq_len=SEQ,
                    dtype=Workload(dtype="float16").torch_dtype, device="meta")
    return planner.trace(lm.model, lm.args, lm.kwargs, name=row.name, arch=lm.arch)


def evaluate(row: Row, time_limit_s: float) -> dict:
    traced = _traced(row)
    cluster = Cluster.parse(f"{row.gpus // 8}x8xA100-80GB")
    work = Workload(batch_size=row.batch, seq_len=SEQ, dtype="float16", phase="train",
                    objective="throughput")
    pins = {"tp": row.tp, "pp": row.pp, "dp": row.dp, "zero": 0, "recompute": "full"}
    start = time.perf_counter()
    pinned = planner.plan(traced, cluster, work, pins=pins, alternatives=0,
                          time_limit_s=time_limit_s)
    pinned_s = time.perf_counter() - start
    start = time.perf_counter()
    free = planner.plan(traced, cluster, work, alternatives=0, time_limit_s=time_limit_s)
    free_s = time.perf_counter() - start
    step, free_step = pinned.predicted.latency_s, free.predicted.latency_s
    predicted = paper_flops(row) / (step * row.gpus) / 1e12
    return {
        "model": row.name, "gpus": row.gpus, "tp": row.tp, "pp": row.pp, "dp": row.dp,
        "batch": row.batch, "paper_tflops": row.tflops,
        "predicted_step_s": step, "predicted_tflops": predicted,
        "error": predicted / row.tflops - 1,
        "mfu": model_flops(row) / (step * row.gpus * A100_FP16_PEAK),
        "plan_mfu": pinned.predicted.mfu,
        "pinned_status": pinned.solver.status, "pinned_wall_s": pinned_s,
        "microbatches": pinned.parallelism.microbatches,
        "free": {"dp": free.parallelism.dp, "pp": free.parallelism.pp,
                 "tp": sorted({s.tp for s in free.stages}), "zero": free.parallelism.zero,
                 "recompute": sorted({s.recompute for s in free.stages}),
                 "microbatches": free.parallelism.microbatches,
                 "step_s": free_step,
                 "tflops": paper_flops(row) / (free_step * row.gpus) / 1e12,
                 "status": free.solver.status, "wall_s": free_s},
        "free_at_least_as_fast": free_step <= step * (1 + 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="solver time limit per plan, seconds (default 60)")
    args = p.parse_args(argv)
    rows = [evaluate(row, args.time_limit) for row in ROWS]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| model | GPUs | tp | pp | dp | batch | paper TFLOP/s | predicted | error | MFU "
              "| planner's own plan | its TFLOP/s | >= paper's |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            f = r["free"]
            own = (f"dp {f['dp']} pp {f['pp']} tp {'/'.join(map(str, f['tp']))} "
                   f"ZeRO {f['zero']} {'/'.join(f['recompute'])} m {f['microbatches']} "
                   f"({f['status']}, {f['wall_s']:.1f} s)")
            print(f"| {r['model']} | {r['gpus']} | {r['tp']} | {r['pp']} | {r['dp']} | "
                  f"{r['batch']} | {r['paper_tflops']:.0f} | {r['predicted_tflops']:.1f} | "
                  f"{r['error']:+.1%} | {r['mfu']:.1%} | {own} | {f['tflops']:.1f} | "
                  f"{'yes' if r['free_at_least_as_fast'] else 'NO'} |")
    ok = all(abs(r["error"]) <= TOLERANCE and r["free_at_least_as_fast"] for r in rows)
    print(f"targets: every prediction within +-{TOLERANCE:.0%} of the paper and the planner's "
          f"own plan at least as fast: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

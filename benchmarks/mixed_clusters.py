"""Mixed-cluster solves (planner.hetero.solve_mixed) on synthetic arch-shaped tables
(``solver_scaling.synthetic_builder``, one per group's device), next to the optimum of each
group alone (planner.solver.solve).

Usage:
    .venv/bin/python benchmarks/mixed_clusters.py [--time-limit 60]   # CP-SAT
    .venv/bin/python benchmarks/mixed_clusters.py --solver reference  # the exact DP
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solver_scaling import ARCHS, synthetic_builder  # noqa: E402

from planner.cluster import Cluster, Workload  # noqa: E402
from planner.hetero import best_subsets, solve_mixed, solve_mixed_reference  # noqa: E402

# (arch, cluster, phase, objective, batch, seq)
CASES = [
    ("llama-3-8b", "1x8xH100+1x8xA100-80GB", "prefill", "latency", 8, 2048),
    ("llama-3-70b", "1x8xH100+2x8xA100-80GB", "prefill", "latency", 8, 2048),
    ("llama-3-70b", "1x8xH100+2x8xA100-80GB", "decode", "throughput", 64, 2048),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--solver", choices=("cp-sat", "reference"), default="cp-sat")
    args = parser.parse_args(argv)
    print(f"# mixed clusters, synthetic tables, solver {args.solver}")
    print("| arch | cluster | phase / objective | batch | status | wall s | objective s | "
          "bound s | best group alone s | dp | pp | tp | m |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, spec, phase, objective, batch, seq in CASES:
        cluster = Cluster.parse(spec)
        work = Workload(batch_size=batch, seq_len=seq, phase=phase, objective=objective)
        builders = [synthetic_builder(ARCHS[arch], g, work) for g in cluster.groups]
        alone = [a for a in best_subsets(builders, cluster, work) if a is not None]
        start = time.perf_counter()
        if args.solver == "reference":
            sol = solve_mixed_reference(builders, cluster, work)
        else:
            sol = solve_mixed(builders, cluster, work, time_limit_s=args.time_limit)
        wall = time.perf_counter() - start
        tps = "/".join(map(str, sorted({s.tp for s in sol.stages})))
        print(f"| {arch} | {spec} | {phase} / {objective} | {batch} | {sol.solver.status} | "
              f"{wall:.1f} | {sol.solver.objective:.6f} | {sol.solver.bound:.6f} | "
              f"{min(a.solver.objective for a in alone):.6f} | {sol.dp} | {sol.pp} | {tps} | "
              f"{sol.microbatches} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

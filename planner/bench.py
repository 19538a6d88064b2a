"""The plan-quality regression suite behind ``plan bench``.

Each case plans a preset on a cluster for a workload and records the objective, the solver
status, the solve time and the baseline ratios. ``compare`` checks a run against the golden
file: a case fails if its objective got worse by more than ``tolerance`` (0.5%), it lost
OPTIMAL status, its solve exceeded its time budget, or (a mixed cluster) it is slower than
the best plan on one of its groups alone (its ``alone:<group>`` baselines). Only ``plan bench --update-golden``
rewrites the golden file, and it prints what moved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["BenchCase", "CaseResult", "load_cases", "run_case", "compare", "golden_diff",
           "DEFAULT_SUITE", "TOLERANCE"]

DEFAULT_SUITE = Path("benchmarks/plan_quality")
TOLERANCE = 0.005


@dataclass(frozen=True)
class BenchCase:
    name: str
    model: str
    cluster: str
    batch: int
    seq: int
    phase: str
    objective: str
    time_budget_s: float
    dtype: str = "bfloat16"


@dataclass(frozen=True)
class CaseResult:
    name: str
    status: str
    objective: float
    wall_s: float
    dp: int
    pp: int
    tp: list[int]
    microbatches: int
    baseline_ratios: dict[str, float | None]


def load_cases(suite: Path = DEFAULT_SUITE) -> list[BenchCase]:
    path = Path(suite) / "cases.json"
    if not path.is_file():
        raise FileNotFoundError(f"no suite at {path}; run `plan bench` from the repository root "
                                "or pass --suite DIR")
    return [BenchCase(**c) for c in json.loads(path.read_text())["cases"]]


_TRACED: dict = {}


def run_case(case: BenchCase, perturb: Callable | None = None) -> CaseResult:
    """Plan one case; ``perturb(table) -> table`` alters every cost table (for tests)."""
    import torch

    from planner.api import decode_step_for, plan_traced
    from planner.cluster import Cluster, Workload
    from planner.models.loader import load_model
    from planner.report import baseline_ratios
    from planner.tracing import trace

    work = Workload(batch_size=case.batch, seq_len=case.seq, dtype=case.dtype, phase=case.phase,
                    objective=case.objective)
    key = (case.model, case.batch, case.seq, case.dtype)
    if key not in _TRACED:
        lm = load_model(case.model, batch_size=case.batch, seq_len=case.seq,
                        dtype=getattr(torch, case.dtype), device="meta")
        _TRACED[key] = (trace(lm.model, lm.args, lm.kwargs, name=case.model), lm.model)
    traced, model = _TRACED[key]
    cluster, step = Cluster.parse(case.cluster), None
    if case.phase == "decode":  # the decode step `plan` prices with (traced on cpu only)
        step_key = (*key, "decode", work.kv_context_len, tuple(g.device for g in cluster.groups))
        if step_key not in _TRACED:
            _TRACED[step_key] = decode_step_for(model, traced, work, cluster)
        step = _TRACED[step_key]
    plan = plan_traced(traced, cluster, work, alternatives=0, adjust_costs=perturb,
                       decode_traced=step)
    return CaseResult(
        name=case.name, status=plan.solver.status, objective=plan.solver.objective,
        wall_s=plan.solver.wall_s, dp=plan.parallelism.dp, pp=plan.parallelism.pp,
        tp=[s.tp for s in plan.stages], microbatches=plan.parallelism.microbatches,
        baseline_ratios=baseline_ratios(plan),
    )


def compare(results: list[CaseResult], golden: dict, cases: list[BenchCase],
            tolerance: float = TOLERANCE) -> list[dict]:
    """One row per case with its verdict; ``row["ok"]`` is False for a regression."""
    budget = {c.name: c.time_budget_s for c in cases}
    rows = []
    for r in results:
        g = golden.get(r.name)
        problems = []
        change = None
        if g is None:
            problems.append("not in the golden file (run plan bench --update-golden)")
        else:
            change = (r.objective - g["objective"]) / g["objective"] if g["objective"] else 0.0
            if change > tolerance:
                problems.append(f"objective {change:+.2%} (> {tolerance:.1%} worse)")
            if g["status"] == "OPTIMAL" and r.status != "OPTIMAL":
                problems.append(f"status {r.status} (was OPTIMAL)")
        for name, ratio in r.baseline_ratios.items():  # mixed clusters: each group alone
            if name.startswith("alone:") and ratio is not None and ratio < 1 - 1e-9:
                problems.append(f"slower than the best plan on {name[6:]} alone "
                                f"({1 / ratio:.3f}x its objective)")
        if r.wall_s > budget[r.name]:
            problems.append(f"solve {r.wall_s:.1f} s > budget {budget[r.name]:g} s")
        rows.append({"name": r.name, "objective": r.objective,
                     "golden": g["objective"] if g else None, "change": change,
                     "status": r.status, "wall_s": r.wall_s, "budget_s": budget[r.name],
                     "ok": not problems, "problems": problems})
    return rows


def golden_diff(results: list[CaseResult], golden: dict) -> list[str]:
    """Human-readable lines of what moved between ``golden`` and ``results``."""
    lines = []
    for r in results:
        g = golden.get(r.name)
        if g is None:
            lines.append(f"+ {r.name}: objective {r.objective:.6g} s, {r.status}")
            continue
        moved = []
        if g["objective"] != r.objective:
            moved.append(f"objective {g['objective']:.6g} -> {r.objective:.6g} s "
                         f"({(r.objective - g['objective']) / g['objective']:+.3%})")
        for key in ("status", "dp", "pp", "tp", "microbatches"):
            if g.get(key) != getattr(r, key):
                moved.append(f"{key} {g.get(key)} -> {getattr(r, key)}")
        if moved:
            lines.append(f"~ {r.name}: " + ", ".join(moved))
    for name in sorted(set(golden) - {r.name for r in results}):
        lines.append(f"- {name}")
    return lines


def golden_record(results: list[CaseResult]) -> dict:
    """The golden file's content: everything but the machine-dependent solve time."""
    return {r.name: {k: v for k, v in asdict(r).items() if k not in ("name", "wall_s")}
            for r in results}

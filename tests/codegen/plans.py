"""Pinned plans for codegen tests: a real ``Plan`` with the layout given and no cost table."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import planner
from codegen.check import torchrun_command
from codegen.layout import ParallelLayout
from planner.models import load_model
from planner.plan import Plan

__all__ = ["pinned_plan", "traced_for", "run_cases"]

_ZERO = {"compute_s": 0.0, "comm_s": 0.0, "memory_bytes": 0}


def traced_for(model: str, overrides: dict | None, batch: int, seq: int):
    lm = load_model(model, overrides or {}, batch_size=batch, seq_len=seq)
    return planner.trace(lm.model, lm.args, lm.kwargs)


def pinned_plan(traced, layout: ParallelLayout, batch: int, seq: int) -> Plan:
    """A valid ``Plan`` carrying ``layout``; costs are zero (these plans are not solved)."""
    tps = sorted({s.tp for s in layout.stages} | {1})
    n = len(traced.layers)
    d = {
        "schema": "fx-planner/plan/v1",
        "model": {"name": traced.name, "num_layers": n, "fingerprint": traced.fingerprint},
        "cluster": {"num_devices": layout.world_size, "nodes": 1,
                    "devices_per_node": layout.world_size, "device": "cpu"},
        "workload": {"batch_size": batch, "seq_len": seq, "dtype": "float32",
                     "phase": "prefill", "objective": "latency"},
        "parallelism": {"dp": layout.dp, "pp": layout.pp, "microbatches": layout.microbatches,
                        "sequence_parallel": layout.sequence_parallel},
        "stages": [{"layers": list(s.layers), "tp": s.tp,
                    "devices": [list(g) for g in s.devices], "predicted": _ZERO}
                   for s in layout.stages],
        "layers": [{"name": layer.name, "param_bytes": layer.param_bytes,
                    "costs": {str(t): _ZERO for t in tps}} for layer in traced.layers],
        "boundaries": [c.bytes for c in traced.cuts],
        "predicted": {"latency_s": 0.0, "throughput_samples_per_s": 0.0,
                      "peak_memory_bytes": 0},
        "baselines": {},
        "solver": {"status": "PINNED", "objective": 0.0, "bound": 0.0, "wall_s": 0.0},
        "provenance": "pinned by tests/codegen",
    }
    plan = Plan.from_dict(d)
    plan.validate()
    return plan


def run_cases(cases: list[dict], nproc: int, workdir: Path, timeout_s: float = 240) -> list:
    """Run ``cases`` ({model, overrides, plan}) in one torchrun job; results[rank][case]."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cases.json"
    path.write_text(json.dumps([{k: c[k] for k in ("model", "overrides", "plan")} for c in cases]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun_command(nproc, ["--cases", str(path), "--out", str(workdir)]),
                          env=env, timeout=timeout_s, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]

"""Pinned plans for codegen tests: a real ``Plan`` with the layout given and a nominal cost table."""

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

# Nominal costs (1 ms per layer, no memory): these plans are pinned, not solved, and codegen
# reads only their layout; the schema still wants a positive latency and throughput.
_LAYER_S = 1e-3
_NOMINAL = {"compute_s": _LAYER_S, "comm_s": 0.0, "memory_bytes": 0}
_LINK = {"latency_s": 1e-5, "bandwidth_bytes_per_s": 1e9}


def traced_for(model: str, overrides: dict | None, batch: int, seq: int):
    lm = load_model(model, overrides or {}, batch_size=batch, seq_len=seq)
    return planner.trace(lm.model, lm.args, lm.kwargs)


def pinned_plan(traced, layout: ParallelLayout, batch: int, seq: int, *, phase: str = "prefill",
                zero: int = 0, schedule: str | None = None,
                recompute: str | list[str] = "none") -> Plan:
    """A valid ``Plan`` carrying ``layout``; its costs are nominal (these plans are not solved).

    ``phase="train"`` makes a train plan: ``zero``, ``schedule`` (default gpipe, or
    interleaved when ``layout.virtual_stages`` > 1), ``layout.virtual_stages`` and
    ``recompute`` (one mode, or one per stage)."""
    train = phase == "train"
    if train and schedule is None:
        schedule = "interleaved" if layout.virtual_stages > 1 else "gpipe"
    if isinstance(recompute, str):
        recompute = [recompute] * len(layout.stages)
    from planner.sharding import greedy_stage_sharding

    tps = sorted({s.tp for s in layout.stages} | {1})
    n = len(traced.layers)
    ratio = 1 / (layout.dp * layout.microbatches)  # the traced batch is the global batch
    records = [greedy_stage_sharding(traced, s.layers[0], s.layers[1], s.tp,
                                     sequence_parallel=layout.sequence_parallel, ratio=ratio,
                                     is_last=i == len(layout.stages) - 1)
               for i, s in enumerate(layout.stages)]
    d = {
        "schema": "fx-planner/plan/v2",
        "model": {"name": traced.name, "num_layers": n, "fingerprint": traced.fingerprint},
        "cluster": {"num_devices": layout.world_size, "nodes": 1,
                    "devices_per_node": layout.world_size, "device": "cpu"},
        "workload": {"batch_size": batch, "seq_len": seq, "dtype": "float32",
                     "phase": phase, "objective": "latency"},
        "parallelism": {"dp": layout.dp, "pp": len(layout.physical_stages),
                        "microbatches": layout.microbatches,
                        "sequence_parallel": layout.sequence_parallel,
                        "microbatch_size": batch // (layout.dp * layout.microbatches),
                        **({"zero": zero, "schedule": schedule,
                            "virtual_stages": layout.virtual_stages} if train else {})},
        "stages": [{"layers": list(s.layers), "tp": s.tp,
                    "devices": [list(g) for g in s.devices],
                    **({"recompute": rc} if train else {}),
                    "predicted": dict(_NOMINAL, compute_s=_LAYER_S * (s.layers[1] - s.layers[0] + 1)),
                    **({"sharding": r.to_json()} if r is not None else {})}
                   for s, r, rc in zip(layout.stages, records, recompute, strict=True)],
        "layers": [{"name": layer.name, "param_bytes": layer.param_bytes,
                    "costs": {str(t): _NOMINAL for t in tps}} for layer in traced.layers],
        "boundaries": [c.bytes for c in traced.cuts],
        "predicted": {"latency_s": _LAYER_S * n, "throughput_samples_per_s": batch / (_LAYER_S * n),
                      "peak_memory_bytes": 0},
        "baselines": {},
        "solver": {"status": "FEASIBLE", "objective": _LAYER_S * n, "bound": 0.0, "wall_s": 0.0},
        "links": {"intra_node": _LINK, "inter_node": _LINK},
        "provenance": "predicted",
    }
    plan = Plan.from_dict(d)
    plan.validate()
    return plan


def run_cases(cases: list[dict], nproc: int, workdir: Path, timeout_s: float = 240) -> list:
    """Run ``cases`` ({model, overrides, plan}) in one torchrun job; results[rank][case]."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cases.json"
    path.write_text(json.dumps([{k: c[k] for k in ("model", "overrides", "plan", "steps")
                                 if k in c} for c in cases]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(torchrun_command(nproc, ["--cases", str(path), "--out", str(workdir)]),
                          env=env, timeout=timeout_s, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((workdir / f"rank{r}.json").read_text()) for r in range(nproc)]

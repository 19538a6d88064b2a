"""Cost-model accuracy on this machine: predicted vs measured, per category.

Usage:
    .venv/bin/python benchmarks/cost_model_accuracy.py            # full run (~3-4 min)
    .venv/bin/python benchmarks/cost_model_accuracy.py --quick    # fewer repetitions
    .venv/bin/python benchmarks/cost_model_accuracy.py --no-collectives

1. Calibration: the three models (hand-written GPT, HF GPT-2, HF Llama; tiny configs,
   random weights) are profiled at the CALIBRATION shapes; their per-node timings fit the
   roofline efficiencies (``cost_models.roofline.calibrate_device``). Collectives are
   calibrated on 2 and 4 gloo ranks at ``collectives.DEFAULT_SIZES``.
2. Evaluation at shapes and sizes NOT used for calibration: per-layer time (roofline
   prediction vs profiler median), collectives (alpha-beta fit vs measured low percentile),
   and peak memory (memory model vs allocator peak, per layer and per model).

Prints a table per category with the median and worst relative error, and the targets:
time median <= 15% per layer, <= 25% per collective; predicted peak memory never below
measured and at most 25% above. Exit status 0 whether or not targets are met (the table
says); 2 on a crash.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_models import collectives as coll  # noqa: E402
from cost_models.memory import WORKSPACE_FACTOR, activation_peak_bytes  # noqa: E402
from cost_models.profiler import measure_peak_bytes, profile_model  # noqa: E402
from cost_models.roofline import layer_work, work_time  # noqa: E402
from planner.calibration import (  # noqa: E402
    CALIBRATION_SHAPES,
    calibrate_this_device,
    calibration_inputs,
    calibration_models,
)

EVALUATION_SHAPES = [(1, 64), (4, 32), (2, 128)]
COLLECTIVE_HELDOUT = (16 * 1024, 256 * 1024, 2 * 1024 * 1024)


def _inputs(name: str, batch: int, seq: int):
    return calibration_inputs(name, batch, seq)


def _trace(name, model, batch, seq):
    from planner.tracing import trace

    args, kwargs = _inputs(name, batch, seq)
    return trace(model, args=args, kwargs=kwargs, name=name), args, kwargs


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def _summary(title: str, errors: list[float], target: str) -> str:
    a = np.abs(errors)
    return (f"{title:<34} n={len(a):<3} median |err| {np.median(a) * 100:6.1f}%   "
            f"worst |err| {a.max() * 100:6.1f}%   target {target}")  # fmt: skip


def run(quick: bool, with_collectives: bool, cache: str) -> int:
    from planner.cluster import Workload

    repeats = 10 if quick else 30
    models = calibration_models()
    t0 = time.time()

    # --- 1. roofline calibration on the calibration shapes (what `plan calibrate` runs)
    eff = calibrate_this_device(repeats=repeats, cache=cache, models=models)
    print(f"roofline calibration on {len(CALIBRATION_SHAPES)} shapes x {len(models)} models: measured peak "
          f"{eff.peak_flops['float32'] / 1e9:.1f} GFLOP/s, copy bandwidth "
          f"{eff.memory_bandwidth / 1e9:.1f} GB/s, layer scale {eff.layer_scale:.3f} "
          f"({time.time() - t0:.0f} s)")  # fmt: skip
    for c, e in sorted(eff.classes.items()):
        print(f"  {c:<12} e_compute {e.compute:6.3f}  e_memory {e.memory:6.3f}  "
              f"overhead {e.overhead_s * 1e6:6.2f} us")  # fmt: skip

    # --- 2. per-layer time and memory at the evaluation shapes
    print("\nper-layer time at evaluation shapes (float32, 1 thread)")
    print(f"{'model':<9} {'shape':<8} {'layer':<16} {'measured us':>12} {'predicted us':>13} "
          f"{'err':>7} | {'meas peak B':>11} {'pred peak B':>11} {'err':>7}")  # fmt: skip
    time_err, mem_layer_err, mem_model_err = [], [], []
    model_rows = []
    for name, model in models:
        for batch, seq in EVALUATION_SHAPES:
            traced, args, kwargs = _trace(name, model, batch, seq)
            prof = profile_model(traced, args, kwargs, repeats=repeats, node_repeats=1,
                                 cache=cache)  # fmt: skip
            work = Workload(batch_size=batch, seq_len=seq, dtype="float32", phase="prefill")
            for layer, lp in zip(traced.layers, prof.layers):
                pred = work_time(layer_work(layer, traced.arch, 1, work, batch), eff, "float32")
                e = _rel(pred, lp.median_s)
                time_err.append(e)
                pmem = activation_peak_bytes(layer, 1, 1.0)
                me = _rel(pmem, lp.peak_alloc_bytes) if lp.peak_alloc_bytes else 0.0
                mem_layer_err.append(me)
                print(f"{name:<9} {batch}x{seq:<6} {layer.name:<16} {lp.median_s * 1e6:12.1f} "
                      f"{pred * 1e6:13.1f} {e * 100:6.1f}% | {lp.peak_alloc_bytes:11d} "
                      f"{pmem:11d} {me * 100:6.1f}%")  # fmt: skip
            # whole model: parameters + inputs are resident; the peak adds the largest
            # layer's transient on top of everything crossing the cut before it.
            gm = traced.graph_module
            from cost_models.profiler import _flat_inputs

            flat = _flat_inputs(gm, args, kwargs)
            with torch.no_grad():
                gm(*args, **kwargs)
                meas = measure_peak_bytes(lambda g=gm, a=args, k=kwargs: g(*a, **k))
            crossing = [0] + [c.bytes for c in traced.cuts]
            pred = max(crossing[j] + activation_peak_bytes(layer, 1, 1.0)
                       for j, layer in enumerate(traced.layers))  # fmt: skip
            me = _rel(pred, meas)
            mem_model_err.append(me)
            model_rows.append((name, f"{batch}x{seq}", meas, pred, me, len(flat)))

    print("\npeak memory per model forward (allocations above parameters and inputs)")
    print(f"{'model':<9} {'shape':<8} {'measured B':>11} {'predicted B':>12} {'err':>7}")
    for name, shape, meas, pred, me, _ in model_rows:
        print(f"{name:<9} {shape:<8} {meas:11d} {pred:12d} {me * 100:6.1f}%")

    # --- 3. collectives at held-out sizes
    coll_err = []
    if with_collectives:
        print("\ncollectives at sizes not used for calibration (gloo, low percentile)")
        print(f"{'ranks':<6} {'collective':<15} {'bytes':>9} {'measured us':>12} "
              f"{'predicted us':>13} {'err':>7}")  # fmt: skip
        for ranks in (2, 4):
            cal = coll.calibrate(ranks, reps=30 if quick else 40, cache=cache)
            raw = coll.measure_collectives(ranks, sizes=COLLECTIVE_HELDOUT,
                                           reps=30 if quick else 40)  # fmt: skip
            for kind, by_size in raw.items():
                for n, ts in sorted(by_size.items()):
                    meas = float(np.percentile(ts, cal.percentile))
                    pred = coll.collective_time(kind, n, ranks, calibration=cal)
                    e = _rel(pred, meas)
                    coll_err.append(e)
                    print(f"{ranks:<6} {kind:<15} {n:9d} {meas * 1e6:12.1f} {pred * 1e6:13.1f} "
                          f"{e * 100:6.1f}%")  # fmt: skip

    print("\nsummary")
    print(_summary("per-layer time", time_err, "median <= 15%"))
    if coll_err:
        print(_summary("collectives", coll_err, "median <= 25%"))
    print(_summary("peak memory, per layer", mem_layer_err, "0% <= err <= 25%"))
    print(_summary("peak memory, per model", mem_model_err, "0% <= err <= 25%"))
    mem_all = mem_layer_err + mem_model_err
    print(f"peak memory: min err {min(mem_all) * 100:.1f}%, max err {max(mem_all) * 100:.1f}% "
          f"(WORKSPACE_FACTOR {WORKSPACE_FACTOR})")  # fmt: skip
    met = [
        np.median(np.abs(time_err)) <= 0.15,
        not coll_err or np.median(np.abs(coll_err)) <= 0.25,
        min(mem_all) >= 0 and max(mem_all) <= 0.25,
    ]
    print("targets: time " + ("met" if met[0] else "MISSED") + ", collectives "
          + ("met" if met[1] else "MISSED") + ", memory " + ("met" if met[2] else "MISSED"))
    print(f"wall {time.time() - t0:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-collectives", action="store_true", help="skip the gloo runs")
    parser.add_argument("--cache", default=None,
                        help="cache directory (default: a fresh temporary one)")  # fmt: skip
    a = parser.parse_args()
    torch.set_num_threads(1)
    if a.cache:
        return run(a.quick, not a.no_collectives, a.cache)
    with tempfile.TemporaryDirectory() as cache:
        return run(a.quick, not a.no_collectives, cache)


if __name__ == "__main__":
    sys.exit(main())

"""Cost-model accuracy on this machine: predicted vs measured, per category.

Usage:
    .venv/bin/python benchmarks/cost_model_accuracy.py            # full run (~2 min)
    .venv/bin/python benchmarks/cost_model_accuracy.py --quick    # fewer repetitions
    .venv/bin/python benchmarks/cost_model_accuracy.py --no-collectives
    .venv/bin/python benchmarks/cost_model_accuracy.py --collectives-only
    .venv/bin/python benchmarks/cost_model_accuracy.py --part train   # training steps (~3 min)

1. Measurement: the three models (hand-written GPT, HF GPT-2, HF Llama; tiny configs,
   random weights) are profiled at the CALIBRATION and the EVALUATION shapes in one
   interleaved pass (``planner.calibration.profile_calibration_set``): every layer's timing
   rounds are spread over the whole pass, so the shared host's slow spells hit both halves
   alike. A layer's measured time is its best round (``LayerProfile.time_s``); the median
   of all calls is printed next to it.
2. Calibration on the calibration shapes only: per-node timings fit the roofline
   efficiencies and whole-layer timings the in-layer scales
   (``cost_models.roofline.calibrate_device``, what ``plan calibrate`` runs).
3. Evaluation at shapes and sizes NOT used for calibration: per-layer time, collectives
   (alpha-beta fitted at ``collectives.DEFAULT_SIZES`` vs the measured per-call median of
   chains of back-to-back calls at other sizes, as ``plan calibrate`` measures, both from
   one interleaved gloo job per group size of 2 and 4 ranks), and
   peak memory (memory model vs allocator peak, per layer and per model).

Prints a table per category with the median and worst relative error, and the targets:
time median <= 15% per layer, <= 25% per collective; predicted peak memory never below
measured and at most 25% above. Exit status 0 whether or not targets are met (the table
says); 2 on a crash.

``--part train`` (docs/training.md, "Cost model accuracy on this CPU"): the training step
predicted against measured, single process. The roofline of this CPU is calibrated first
(``calibrate_this_device``, into the run's cache, which the plans then read). The same
three models are traced at ``TRAIN_SHAPE`` and profiled forward and forward + backward
(``profile_models(train=True)``, one interleaved pass); for every model and
``TRAIN_CONFIGS`` entry (pp 1, dp 1, tp 1; microbatches 1 and 2; recompute none and
full) ``plan_traced`` on ``1xcpu`` makes the plan without and with the profile, and
``planner.parallelize`` runs the plan's ``Trainer`` (the code ``plan run`` trains with:
next-token loss, backward, AdamW) in a one-rank gloo group. Steps are timed after
``--train-warmup`` untimed ones, one step of every (model, configuration) per round so a
slow spell of the host hits all alike; the measured step is the median over
``--train-steps`` rounds. The table gives both predictions of ``predicted.latency_s``, the
measured median and p10-p90, and the errors; then the plan's AdamW update (the stage's
tail at dp 1) against the median of the optimizer's ``step`` timed inside the steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_models import collectives as coll  # noqa: E402
from cost_models.memory import WORKSPACE_FACTOR, activation_peak_bytes  # noqa: E402
from cost_models.profiler import measure_peak_bytes  # noqa: E402
from cost_models.roofline import layer_work, work_time  # noqa: E402
from planner.calibration import (  # noqa: E402
    CALIBRATION_SHAPES,
    calibration_inputs,
    calibration_models,
    fit_this_device,
    profile_calibration_set,
)

EVALUATION_SHAPES = [(1, 64), (4, 32), (2, 128)]
COLLECTIVE_HELDOUT = (16 * 1024, 256 * 1024, 2 * 1024 * 1024)
TRAIN_SHAPE = (4, 64)  # batch x sequence of the training step
TRAIN_CONFIGS = [(1, "none"), (1, "full"), (2, "none"), (2, "full")]  # (microbatches, recompute)


def _rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas


def _summary(title: str, errors: list[float], target: str) -> str:
    a = np.abs(errors)
    return (f"{title:<34} n={len(a):<3} median |err| {np.median(a) * 100:6.1f}%   "
            f"worst |err| {a.max() * 100:6.1f}%   target {target}")  # fmt: skip


def collectives_accuracy(reps: int) -> list[float]:
    """Collectives at sizes not used for calibration; prints the table, returns errors."""
    coll_err = []
    print(f"\ncollectives at sizes not used for calibration (gloo, chains of "
          f"{coll.DEFAULT_CHAIN} back-to-back calls, p{coll.DEFAULT_PERCENTILE:g} per call, "
          "as plan calibrate measures them)")
    print(f"{'ranks':<6} {'collective':<15} {'bytes':>9} {'measured us':>12} "
          f"{'predicted us':>13} {'err':>7}")  # fmt: skip
    for ranks in (2, 4):
        # One gloo job per group size: the calibration sizes and the held-out sizes,
        # repetitions interleaved, so both see the same machine.
        raw = coll.measure_collectives(ranks, sizes=(*coll.DEFAULT_SIZES, *COLLECTIVE_HELDOUT),
                                       reps=reps, chain=coll.DEFAULT_CHAIN)  # fmt: skip
        cal = coll.fit_calibration(
            {k: {n: by[n] for n in coll.DEFAULT_SIZES} for k, by in raw.items()}, ranks,
            chain=coll.DEFAULT_CHAIN)
        for kind, by_size in raw.items():
            fit = cal.fit_for(kind, ranks)
            for n in COLLECTIVE_HELDOUT:
                meas = float(np.percentile(by_size[n], cal.percentile))
                pred = fit.time(n)
                e = _rel(pred, meas)
                coll_err.append(e)
                print(f"{ranks:<6} {kind:<15} {n:9d} {meas * 1e6:12.1f} {pred * 1e6:13.1f} "
                      f"{e * 100:6.1f}%")  # fmt: skip
    return coll_err


def run(quick: bool, with_collectives: bool, cache: str) -> int:
    from planner.cluster import Workload

    repeats = 50 if quick else 150
    models = calibration_models()
    t0 = time.time()

    # --- 1. one interleaved measurement of every (model, shape): the calibration shapes
    # and the evaluation shapes share the machine's slow and fast spells alike.
    profiled = profile_calibration_set(CALIBRATION_SHAPES + EVALUATION_SHAPES, models=models,
                                       repeats=repeats, cache=cache)  # fmt: skip
    cal = [p for p in profiled if (p[1], p[2]) in CALIBRATION_SHAPES]
    held_out = [p for p in profiled if (p[1], p[2]) in EVALUATION_SHAPES]
    print(f"profiled {len(profiled)} (model, shape) pairs in one interleaved pass "
          f"({time.time() - t0:.0f} s)")  # fmt: skip

    # --- 2. roofline fitted on the calibration shapes only (what `plan calibrate` runs)
    eff = fit_this_device(cal, cache=cache)
    print(f"roofline fitted on {len(CALIBRATION_SHAPES)} shapes x {len(models)} models: measured "
          f"peak {eff.peak_flops['float32'] / 1e9:.1f} GFLOP/s, copy bandwidth "
          f"{eff.memory_bandwidth / 1e9:.1f} GB/s, layer scale {eff.layer_scale:.3f}")  # fmt: skip
    for c, e in sorted(eff.classes.items()):
        print(f"  {c:<12} e_compute {e.compute:6.3f}  e_memory {e.memory:6.3f}  "
              f"overhead {e.overhead_s * 1e6:6.2f} us  in-layer scale {eff.scale_for(c):5.2f}")  # fmt: skip
    global_only = replace(eff, class_scales={})

    # --- 3. per-layer time and memory at the evaluation shapes
    print("\nper-layer time at evaluation shapes (float32, 1 thread; measured = best round, "
          "median = all calls)")  # fmt: skip
    print(f"{'model':<9} {'shape':<8} {'layer':<16} {'measured us':>12} {'median us':>10} "
          f"{'predicted us':>13} {'err':>7} | {'meas peak B':>11} {'pred peak B':>11} "
          f"{'err':>7}")  # fmt: skip
    time_err, median_err, global_err, mem_layer_err, mem_model_err = [], [], [], [], []
    model_rows = []
    for name, batch, seq, traced, prof in held_out:
        args, kwargs = calibration_inputs(name, batch, seq)
        work = Workload(batch_size=batch, seq_len=seq, dtype="float32", phase="prefill")
        for layer, lp in zip(traced.layers, prof.layers):
            layer_w = layer_work(layer, traced.arch, 1, work, batch)
            pred = work_time(layer_w, eff, "float32")
            e = _rel(pred, lp.time_s)
            time_err.append(e)
            median_err.append(_rel(pred, lp.median_s))
            global_err.append(_rel(work_time(layer_w, global_only, "float32"), lp.time_s))
            pmem = activation_peak_bytes(layer, 1, 1.0)
            me = _rel(pmem, lp.peak_alloc_bytes) if lp.peak_alloc_bytes else 0.0
            mem_layer_err.append(me)
            print(f"{name:<9} {batch}x{seq:<6} {layer.name:<16} {lp.time_s * 1e6:12.1f} "
                  f"{lp.median_s * 1e6:10.1f} {pred * 1e6:13.1f} {e * 100:6.1f}% | "
                  f"{lp.peak_alloc_bytes:11d} {pmem:11d} {me * 100:6.1f}%")  # fmt: skip
        # whole model: parameters + inputs are resident; the peak adds the largest
        # layer's transient on top of everything crossing the cut before it.
        gm = traced.graph_module
        with torch.no_grad():
            gm(*args, **kwargs)
            meas = measure_peak_bytes(lambda g=gm, a=args, k=kwargs: g(*a, **k))
        crossing = [0] + [c.bytes for c in traced.cuts]
        pred = max(crossing[j] + activation_peak_bytes(layer, 1, 1.0)
                   for j, layer in enumerate(traced.layers))  # fmt: skip
        me = _rel(pred, meas)
        mem_model_err.append(me)
        model_rows.append((name, f"{batch}x{seq}", meas, pred, me))

    print("\npeak memory per model forward (allocations above parameters and inputs)")
    print(f"{'model':<9} {'shape':<8} {'measured B':>11} {'predicted B':>12} {'err':>7}")
    for name, shape, meas, pred, me in model_rows:
        print(f"{name:<9} {shape:<8} {meas:11d} {pred:12d} {me * 100:6.1f}%")

    # --- 4. collectives at held-out sizes
    coll_err = collectives_accuracy(20 if quick else 50) if with_collectives else []

    print("\nsummary")
    print(_summary("per-layer time", time_err, "median <= 15%"))
    print(_summary("  (against the all-call median)", median_err, "not a target"))
    print(_summary("  (one global layer scale)", global_err, "not a target"))
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


def _timed(fn, into: list[float]):
    """``fn`` that appends the seconds of each call to ``into``."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - start)
        return out
    return timed


def train_accuracy(cache: str, steps: int, warmup: int, repeats: int) -> int:
    """Training step predicted (roofline, and with the profile) vs measured; see the module
    docstring. Prints the table and the summary."""
    import datetime
    import os
    import statistics

    import torch.distributed as dist

    import planner
    from cost_models.profiler import profile_models
    from planner.api import plan_traced
    from planner.calibration import calibrate_this_device
    from planner.cluster import Workload

    os.environ["FX_PLANNER_CACHE"] = cache  # the plans read the calibration made here
    t0 = time.time()
    eff = calibrate_this_device(repeats=repeats, cache=cache)
    print(f"roofline calibrated ({time.time() - t0:.0f} s): measured peak "
          f"{eff.peak_flops['float32'] / 1e9:.1f} GFLOP/s, layer scale {eff.layer_scale:.3f}")
    batch, seq = TRAIN_SHAPE
    models = calibration_models()
    inputs = {name: calibration_inputs(name, batch, seq) for name, _ in models}
    traced = {name: planner.trace(model, *inputs[name], name=name) for name, model in models}
    t1 = time.time()
    profiles = dict(zip(traced, profile_models(
        [(traced[name], *inputs[name]) for name, _ in models], repeats=repeats, cache=cache,
        train=True)))
    print(f"profiled forward and forward + backward at {batch}x{seq} "
          f"({time.time() - t1:.0f} s)")
    work = Workload(batch_size=batch, seq_len=seq, dtype="float32", phase="train")
    cluster = planner.Cluster.parse("1xcpu")
    cases = []  # (name, m, rc, roofline plan, profiled plan)
    for name, _model in models:
        for m, rc in TRAIN_CONFIGS:
            pins = {"dp": 1, "pp": 1, "tp": 1, "microbatches": m, "recompute": rc}
            plans = [plan_traced(traced[name], cluster, work, pins=pins, profile=prof,
                                 alternatives=0) for prof in (None, profiles[name])]
            cases.append((name, m, rc, *plans))
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=120))
        try:
            by_name = dict(models)
            runners = []
            optimizer_s: list[list[float]] = [[] for _ in cases]  # the update inside the step
            for i, (name, _m, _rc, roof, _) in enumerate(cases):
                args, kwargs = inputs[name]
                local = planner.parallelize(by_name[name], roof, args, kwargs)
                local.trainer.optimizer.step = _timed(local.trainer.optimizer.step,
                                                      optimizer_s[i])
                runners.append(lambda local=local, a=args, k=kwargs: local.step(*a, **k))
            for _ in range(warmup):
                for run in runners:
                    run()
            times: list[list[float]] = [[] for _ in runners]
            for spent in optimizer_s:
                spent.clear()
            for _ in range(steps):  # one step of every case per round
                for i, run in enumerate(runners):
                    start = time.perf_counter()
                    run()
                    times[i].append(time.perf_counter() - start)
        finally:
            dist.destroy_process_group()
    print(f"\ntraining step on 1xcpu, {batch}x{seq}, float32, 1 thread, pp 1, dp 1, tp 1, "
          f"ZeRO 0 (measured: median of {steps} steps after {warmup} untimed, interleaved)")
    print(f"{'model':<9} {'m':>2} {'recompute':<9} {'roofline ms':>11} {'profiled ms':>11} "
          f"{'source':<9} {'measured ms':>11} {'p10-p90 ms':>13} {'err roof':>9} "
          f"{'err prof':>9} | {'AdamW pred':>10} {'AdamW meas':>10}")
    roof_err, prof_err = [], []
    for (name, m, rc, roof, prof), ts, opt in zip(cases, times, optimizer_s):
        meas = statistics.median(ts)
        p10, p90 = np.percentile(ts, 10), np.percentile(ts, 90)
        er, ep = _rel(roof.predicted.latency_s, meas), _rel(prof.predicted.latency_s, meas)
        roof_err.append(er)
        prof_err.append(ep)
        tail = roof.extra["training"]["stage_tail_s"][0]  # dp 1: the AdamW update alone
        print(f"{name:<9} {m:>2} {rc:<9} {roof.predicted.latency_s * 1e3:11.2f} "
              f"{prof.predicted.latency_s * 1e3:11.2f} {prof.provenance:<9} {meas * 1e3:11.2f} "
              f"{p10 * 1e3:6.2f}-{p90 * 1e3:<6.2f} {er * 100:8.1f}% {ep * 100:8.1f}% | "
              f"{tail * 1e3:10.2f} {statistics.median(opt) * 1e3:10.2f}")
    print("\nsummary")
    print(_summary("train step, roofline", roof_err, "not a target"))
    print(_summary("train step, with the profile", prof_err, "not a target"))
    measured_rows = [e for e, c in zip(prof_err, cases) if c[4].provenance != "predicted"]
    if measured_rows:
        print(_summary("  (rows the profile prices)", measured_rows, "not a target"))
        print(_summary("  (the same rows, roofline)", [e for e, c in zip(roof_err, cases)
                                                        if c[4].provenance != "predicted"],
                       "not a target"))
    print(f"wall {time.time() - t0:.0f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-collectives", action="store_true", help="skip the gloo runs")
    parser.add_argument("--collectives-only", action="store_true",
                        help="only the gloo runs (section 4), with their summary")
    parser.add_argument("--cache", default=None,
                        help="cache directory (default: a fresh temporary one)")  # fmt: skip
    parser.add_argument("--part", choices=["forward", "train"], default="forward",
                        help="forward: layers, memory and collectives (the sections above); "
                        "train: training steps predicted vs measured")
    parser.add_argument("--train-steps", type=int, default=15,
                        help="--part train: timed steps per case")
    parser.add_argument("--train-warmup", type=int, default=3,
                        help="--part train: untimed steps per case")
    a = parser.parse_args()
    torch.set_num_threads(1)
    if a.part == "train":
        repeats = 50 if a.quick else 150
        if a.cache:
            return train_accuracy(a.cache, a.train_steps, a.train_warmup, repeats)
        with tempfile.TemporaryDirectory() as cache:
            return train_accuracy(cache, a.train_steps, a.train_warmup, repeats)
    if a.collectives_only:
        errors = collectives_accuracy(20 if a.quick else 50)
        print(_summary("collectives", errors, "median <= 25%"))
        print("target: collectives " + ("met" if np.median(np.abs(errors)) <= 0.25 else "MISSED"))
        return 0
    if a.cache:
        return run(a.quick, not a.no_collectives, a.cache)
    with tempfile.TemporaryDirectory() as cache:
        return run(a.quick, not a.no_collectives, cache)


if __name__ == "__main__":
    sys.exit(main())

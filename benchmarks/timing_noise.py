"""How stable is a layer's time on this machine? The statistic the profiler reports, and why.

Usage:
    .venv/bin/python benchmarks/timing_noise.py [--trials 8] [--rounds 30] [--spacing 4]

Times one HF GPT-2 block (tiny config, batch 4 x seq 32, float32, 1 thread) in ``trials``
independent measurements of ``rounds`` rounds of ``ROUND_CALLS`` calls each, ``spacing``
seconds apart (the slow spells of a shared VM last seconds), and prints per trial three candidate statistics: the median of all calls, their 10th
percentile, and the best round (the lowest round median: ``LayerProfile.time_s``). The
spread of each across trials (max/min) says which one a cost model can be fitted to and
checked against on a shared host.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_models.profiler import ROUND_CALLS, best_round  # noqa: E402
from planner.calibration import calibration_models  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--spacing", type=float, default=4.0, help="seconds between trials")
    a = parser.parse_args()
    torch.set_num_threads(1)
    block = dict(calibration_models())["hf-gpt2"].transformer.h[0]
    x = torch.randn(4, 32, 128)
    stats = []
    with torch.no_grad():
        for _ in range(20):
            block(x)
        for i in range(a.trials):
            if i:
                time.sleep(a.spacing)
                for _ in range(5):  # re-warm after the sleep
                    block(x)
            times = []
            for _ in range(a.rounds * ROUND_CALLS):
                t0 = time.perf_counter()
                block(x)
                times.append(time.perf_counter() - t0)
            t = np.array(times)
            stats.append((np.median(t), np.percentile(t, 10), best_round(t)))
    s = np.array(stats) * 1e6
    print(f"HF GPT-2 block 4x32, {a.trials} trials of {a.rounds} rounds x {ROUND_CALLS} calls, "
          f"{a.spacing:g} s apart")  # fmt: skip
    print(f"{'trial':<6} {'median us':>10} {'p10 us':>10} {'best round us':>14}")
    for i, row in enumerate(s):
        print(f"{i:<6} {row[0]:10.1f} {row[1]:10.1f} {row[2]:14.1f}")
    print(f"{'max/min':<6} {s[:, 0].max() / s[:, 0].min():10.2f} {s[:, 1].max() / s[:, 1].min():10.2f} "
          f"{s[:, 2].max() / s[:, 2].min():14.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

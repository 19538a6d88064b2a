"""Generated tp=2 module vs torch's DTensor ``parallelize_module`` on the same HF Llama.

Usage:
    .venv/bin/python benchmarks/runtime_overhead.py                  # launches torchrun, 2 ranks
    .venv/bin/python benchmarks/runtime_overhead.py --runs 20 --iters 5 --seq 128

Both sides run the same HF Llama config with the same weights and inputs, tensor-parallel
over 2 ranks (gloo on CPU, nccl on GPUs), forward only under ``torch.no_grad()``:

- ``fx-planner``: ``codegen.runtime.parallelize`` with one tp-2 stage (the generated ATen
  graph with its functional all-reduces);
- ``parallelize_module``: ``torch.distributed.tensor.parallel`` with ``ColwiseParallel`` on
  q/k/v/gate/up and ``RowwiseParallel`` on o/down of every decoder layer (HF's attention
  reshapes with ``-1`` heads, so the local head counts need no patching), and, as in the
  generated module, a vocab-parallel embedding (``RowwiseParallel`` on ``embed_tokens``,
  output all-reduced) and LM head (``ColwiseParallel`` on ``lm_head``, logits all-gathered),
  the torchtitan recipe; norms replicated.

The two alternate: each run times ``--iters`` forwards of one, then of the other (order
swapped every run), after a barrier; the per-forward time of a run is its mean. Rank 0
prints the median over ``--runs`` runs of each, their ratio (fx-planner / DTensor), and the
max abs difference of the two outputs.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from dtensor_baseline import dtensor_llama  # noqa: E402  (this folder, sys.path[0])

CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2048}


def _timed(fn, iters: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def worker(a) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from codegen.layout import ParallelLayout
    from codegen.runtime import parallelize
    from planner.models import load_model

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    lm = load_model("hf:llama", CONFIG, batch_size=a.batch, seq_len=a.seq, seed=0)
    model = lm.model.eval()
    kwargs = dict(lm.kwargs)  # input_ids, use_cache=False
    dtensor = dtensor_llama(copy.deepcopy(model), init_device_mesh(device.type, (world,))).to(
        device)
    ours = parallelize(model, ParallelLayout.simple(1, [(0, _layers(lm), world)]),
                       lm.args, lm.kwargs, device=device)
    kwargs_dev = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}

    def run_ours():
        return ours(**kwargs)[0]

    def run_dtensor():
        return dtensor(**kwargs_dev).logits

    from torch.distributed.tensor import DTensor

    q = dtensor.model.layers[0].self_attn.q_proj.weight
    assert isinstance(q, DTensor) and q.to_local().shape[0] * world == q.shape[0]
    with torch.no_grad():
        ref = model(**kwargs).logits
        diff = {"fx-planner": (run_ours().cpu() - ref).abs().max().item(),
                "parallelize_module": (run_dtensor().cpu() - ref).abs().max().item()}
        for _ in range(a.warmup):
            run_ours()
            run_dtensor()
        times = {"fx-planner": [], "parallelize_module": []}
        for i in range(a.runs):
            order = [("fx-planner", run_ours), ("parallelize_module", run_dtensor)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                times[name].append(_timed(fn, a.iters))
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"HF Llama {CONFIG}, batch {a.batch}, seq {a.seq}, tp {world}, "
              f"{'nccl' if cuda else 'gloo'}, {a.threads} thread(s) per rank, {a.runs} "
              f"alternating runs x {a.iters} forwards, torch {torch.__version__}")
        print(f"{'module':<20} {'median ms/forward':>18} {'min':>8} {'max':>8}")
        for k, v in times.items():
            print(f"{k:<20} {med[k] * 1e3:>18.2f} {min(v) * 1e3:>8.2f} {max(v) * 1e3:>8.2f}")
        print(f"ratio fx-planner / parallelize_module: "
              f"{med['fx-planner'] / med['parallelize_module']:.3f} (target <= 1.05)")
        print("max abs error vs the unsharded model: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
    dist.destroy_process_group()


def _layers(lm) -> int:
    """Index of the last planner layer (embedding + blocks + head) of the traced model."""
    import planner

    return len(planner.trace(lm.model, lm.args, lm.kwargs).layers) - 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if "RANK" in os.environ:
        worker(a)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={a.nproc}", __file__, *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    return subprocess.run(cmd, env=env, timeout=1800).returncode


if __name__ == "__main__":
    sys.exit(main())

"""Worker of tests/codegen/test_generation.py, run by torchrun (gloo, CPU): every rank
shards the traced prefill and decode graphs of a ``DecodeStep`` for its tensor-parallel rank
(``codegen.tensor_parallel.shard_stage``: the sharding analysis places the KV cache), then
generates greedily with its piece of the cache (``planner.decode.greedy_generate``) and
writes what it did to ``<out>/rank<r>.json``; rank 0 also writes the unsharded model's
``generate``."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codegen.stage_split import split_stages
from codegen.tensor_parallel import shard_stage
from planner.decode import DecodeStep, greedy_generate
from planner.models import load_model
from planner.tracing import trace


def run_case(case: dict, rank: int, world: int, group: str) -> dict:
    lm = load_model("hf:" + case["type"], case["config"], batch_size=2, seq_len=case["prompt"])
    model = lm.model.eval()
    ids = torch.tensor(case["ids"])
    mask = torch.tensor(case["mask"])
    step = DecodeStep(model, context_len=case["context"])
    graphs, reports = {}, {}
    for name, tokens in (("prefill", case["prompt"]), ("decode", 1)):
        traced = trace(step, step.example_inputs(batch=2, tokens=tokens))
        (stage,) = split_stages(traced, [(0, len(traced.layers) - 1)])
        reports[name] = shard_stage(stage, traced, world, rank, group)
        graphs[name] = stage.module
    out = greedy_generate(graphs["decode"], ids, mask, case["new"], case["eos"], case["pad"],
                          prefill=graphs["prefill"])
    decode = reports["decode"]
    result = {"tokens": out.tolist(),
              "collectives": sorted(decode.collectives),
              "state": {k: [list(g), list(loc)] for k, (g, loc) in decode.state.items()},
              "sharded": sorted(decode.sharded)}
    if rank == 0:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=case["new"], eos_token_id=case["eos"],
                                 pad_token_id=case["pad"])
        result["reference"] = ref[:, ids.shape[1]:].tolist()
    return result


def main() -> None:
    cases_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    results = [run_case(c, rank, world, group) for c in json.loads(cases_path.read_text())]
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

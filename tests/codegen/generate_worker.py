"""Worker of tests/codegen/test_generation.py, run by torchrun (gloo, CPU): every rank
takes its pipeline stage (``pp`` stages of ``world / pp`` ranks each; blocks split in two
halves at pp 2) of the traced prefill and decode graphs of a ``DecodeStep``, shards it for
its tensor-parallel rank (``codegen.tensor_parallel.shard_stage``: the sharding analysis
places the KV cache), generates greedily with its piece of its stage's cache
(``codegen.generate.generate_stage``) and writes what it did to ``<out>/rank<r>.json``;
rank 0 also writes the unsharded model's ``generate``."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codegen.generate import generate_stage
from codegen.stage_split import split_stages
from codegen.tensor_parallel import shard_stage
from planner.decode import DecodeStep
from planner.models import load_model
from planner.tracing import trace


def run_case(case: dict, rank: int, world: int) -> dict:
    lm = load_model("hf:" + case["type"], case["config"], batch_size=2, seq_len=case["prompt"])
    model = lm.model.eval()
    ids = torch.tensor(case["ids"])
    mask = torch.tensor(case["mask"])
    step = DecodeStep(model, context_len=case["context"])
    pp = case.get("pp", 1)
    tp = world // pp
    stage_index, tp_rank = divmod(rank, tp)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
    group = groups[stage_index].group_name if tp > 1 else ""
    stages, reports = {}, {}
    for name, tokens in (("prefill", case["prompt"]), ("decode", 1)):
        traced = trace(step, step.example_inputs(batch=2, tokens=tokens))
        n = len(traced.layers)
        ranges = [(0, n - 1)] if pp == 1 else [(0, n // 2 - 1), (n // 2, n - 1)]
        stage = split_stages(traced, ranges)[stage_index]
        reports[name] = shard_stage(stage, traced, tp, tp_rank, group)
        stages[name] = stage
    out = generate_stage(stages["prefill"], stages["decode"], ids, mask, case["new"],
                         case["eos"], case["pad"], context_len=case["context"],
                         recv_from=rank - tp if stage_index > 0 else None,
                         send_to=(rank + tp,) if stage_index < pp - 1 else (),
                         source=(pp - 1) * tp)
    decode = reports["decode"]
    result = {"tokens": out.tolist(), "stage": stage_index,
              "cache_inputs": len(stages["decode"].state_inputs),
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


def run_api(plan_path: Path, out: Path) -> None:
    """``planner.parallelize(model, plan, ...).generate(...)`` on a decode plan file made by
    ``plan MODEL --out``: every rank's replica rows, and rank 0's ``generate``."""
    import planner
    from planner.plan import Plan

    plan = Plan.load(plan_path)
    source = plan.extra["source"]
    w = plan.workload
    lm = load_model(source["model"], source["overrides"], batch_size=w.batch_size,
                    seq_len=w.seq_len)
    model = lm.model.eval()
    local = planner.parallelize(model, plan, lm.args, lm.kwargs)
    ids = torch.randint(3, model.config.vocab_size, (w.batch_size, 5),
                        generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    got = local.generate(ids, 6, attention_mask=mask)
    result = {"rows": list(local.generator.rows), "tokens": got.tolist()}
    if dist.get_rank() == 0:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                 pad_token_id=0)
        result["reference"] = ref[:, 5:].tolist()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


def main() -> None:
    if sys.argv[1] == "--api":
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        run_api(Path(sys.argv[2]), Path(sys.argv[3]))
        dist.barrier()
        dist.destroy_process_group()
        return
    cases_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = [run_case(c, rank, world) for c in json.loads(cases_path.read_text())]
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

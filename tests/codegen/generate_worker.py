"""Worker of tests/codegen/test_generation.py, run by torchrun (gloo, CPU).

Every case lays the ranks out as ``dp`` replicas of ``pp`` stages of ``tp`` ranks (rank =
replica * pp * tp + stage * tp + tp rank; blocks split in two halves at pp 2). Every rank
takes its stage of the traced prefill and decode graphs of a ``DecodeStep`` (traced for
one microbatch of its replica's rows), shards it for its tensor-parallel rank
(``codegen.tensor_parallel.shard_stage``: the sharding analysis places the KV cache),
generates greedily with its piece of its stage's cache, ``microbatches`` groups in flight
(``codegen.generate.generate_stage``) and writes what it did to ``<out>/rank<r>.json``;
rank 0 also writes the unsharded model's ``generate`` (transformers', or the zoo GPT's own
loop).
"""

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
from planner.models import GPT, GPTConfig, load_model
from planner.tracing import trace


def build_model(case: dict):
    """The case's model, the same weights on every rank."""
    if case["type"] == "zoo":
        torch.manual_seed(0)
        return GPT(GPTConfig(**case["config"])).eval()
    batch, prompt = len(case["ids"]), case["prompt"]
    return load_model("hf:" + case["type"], case["config"], batch_size=batch,
                      seq_len=prompt).model.eval()


def reference(model, case: dict, ids: torch.Tensor, mask: torch.Tensor) -> list:
    """The unsharded model's greedy tokens: the zoo GPT's own loop or transformers'."""
    with torch.no_grad():
        if isinstance(model, GPT):
            out = model.generate(ids, case["new"], attention_mask=mask,
                                 eos_token_id=case["eos"], pad_token_id=case["pad"])
        else:
            out = model.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=case["new"], eos_token_id=case["eos"],
                                 pad_token_id=case["pad"])
    return out[:, ids.shape[1]:].tolist()


def run_case(case: dict, rank: int, world: int) -> dict:
    model = build_model(case)
    ids = torch.tensor(case["ids"])
    mask = torch.tensor(case["mask"])
    dp, pp, m = case.get("dp", 1), case.get("pp", 1), case.get("microbatches", 1)
    tp = world // (dp * pp)
    replica, rest = divmod(rank, pp * tp)
    stage_index, tp_rank = divmod(rest, tp)
    base = replica * pp * tp
    replicas = [dist.new_group(list(range(r * pp * tp, (r + 1) * pp * tp))) for r in range(dp)]
    tp_groups = {(r, s): dist.new_group([r * pp * tp + s * tp + t for t in range(tp)])
                 for r in range(dp) for s in range(pp)}
    group = tp_groups[(replica, stage_index)].group_name if tp > 1 else ""
    rows = len(ids) // dp
    step = DecodeStep(model, context_len=case["context"])
    stages, reports = {}, {}
    for name, tokens in (("prefill", case["prompt"]), ("decode", 1)):
        traced = trace(step, step.example_inputs(batch=rows // m, tokens=tokens))
        n = len(traced.layers)
        ranges = [(0, n - 1)] if pp == 1 else [(0, n // 2 - 1), (n // 2, n - 1)]
        stage = split_stages(traced, ranges)[stage_index]
        reports[name] = shard_stage(stage, traced, tp, tp_rank, group)
        stages[name] = stage
    lo = replica * rows
    out = generate_stage(stages["prefill"], stages["decode"], ids[lo:lo + rows],
                         mask[lo:lo + rows], case["new"], case["eos"], case["pad"],
                         context_len=case["context"], microbatches=m,
                         recv_from=rank - tp if stage_index > 0 else None,
                         send_to=(rank + tp,) if stage_index < pp - 1 else (),
                         source=base + (pp - 1) * tp, group=replicas[replica], timeout_s=60)
    decode = reports["decode"]
    result = {"tokens": out.tolist(), "rows": [lo, lo + rows], "stage": stage_index,
              "cache_inputs": len(stages["decode"].state_inputs),
              "collectives": sorted(decode.collectives),
              "state": {k: [list(g), list(loc)] for k, (g, loc) in decode.state.items()},
              "sharded": sorted(decode.sharded)}
    if rank == 0:
        result["reference"] = reference(model, case, ids, mask)
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

"""`plan export --to torchtitan|megatron|deepspeed` of train plans: every key an export
emits is in the checked list (planner/engines/flags.json) with the plan's values (the TOML,
the argv and the JSON parsed back); a plan the framework cannot express, and a plan of the
other phase, are one clear error with the `plan MODEL ... --target` command; the
restriction `plan MODEL --phase train --target` hands the solver."""

from __future__ import annotations

import ast
import json
import shlex

import pytest

from planner.cluster import Cluster, Workload
from planner.cost_table import CostTable, LayerCost, Link
from planner.engines import (
    ExportError,
    checked_flags,
    deepspeed_splits,
    export_plan,
    training_restriction,
)
from planner.plan import Plan
from planner.solver import solve
from tests.bad_input.cli_helpers import call, refused

#: pre (embedding), 8 decoder blocks, post (final norm and head): plan layers 0..9.
NAMES = ("pre", *(f"model.layers.{j}" for j in range(8)), "post")
ARCH = {"family": "llama", "num_heads": 4, "num_kv_heads": 2, "num_layers": 8}


def _build(mbs: int, m: int) -> CostTable:
    rows = tuple({t: LayerCost(1e-3 * mbs / t, 2e-5 * (t > 1), 10**8 // t) for t in (1, 2, 4)}
                 for _ in NAMES)
    return CostTable(rows, (2**20 * mbs,) * (len(NAMES) - 1), Link(1e-6, 1e11),
                     Link(1e-5, 1e10), mbs, m, stage_workspace_bytes={1: 7, 2: 7, 4: 7},
                     kv_heads_replicated={}, layer_names=NAMES, param_bytes=(10**8,) * 10)


@pytest.fixture(scope="module")
def base() -> dict:
    """An inference plan (dp 2 x pp 2 x tp 2 on 8 H100s, batch 16) as a dict: the training
    variants below edit it."""
    cluster = Cluster(1, 8, "H100")
    work = Workload(batch_size=16, seq_len=128, objective="throughput")
    sol = solve(_build, cluster, work, pins={"pp": 2, "tp": 2, "dp": 2, "microbatches": 2})
    plan = Plan.from_solution(sol, _build(sol.microbatch_size, sol.microbatches), cluster,
                              work, model_name="llama-tiny", fingerprint="abc")
    d = plan.to_dict()
    d["arch"], d["source"] = ARCH, {"model": "llama-tiny", "overrides": {}}
    return d


def _train(base: dict, tmp_path, blocks=(4, 4), *, pp=2, dp=2, tp=2, zero=1, schedule="1f1b",
           recompute="none", sp=True, dtype="bfloat16", microbatches=2, seq=128,
           name="train.json") -> Plan:
    """A train plan file with these choices (decoder blocks per stage, ``pre`` with the
    first stage and ``post`` with the last; ``tp`` and ``recompute`` per stage when lists),
    loaded back through the plan-file checks."""
    d = json.loads(json.dumps(base))
    n = len(blocks)
    tps = tp if isinstance(tp, list) else [tp] * n
    modes = recompute if isinstance(recompute, list) else [recompute] * n
    group, at = {}, 0  # devices of (replica, device group)
    for r in range(dp):
        for k in range(pp):
            group[r, k] = list(range(at, at + tps[k]))
            at += tps[k]
    stages, first = [], 0
    for i, b in enumerate(blocks):
        last = len(NAMES) - 1 if i == n - 1 else first + b - (i > 0)  # pre in stage 0
        stages.append({**d["stages"][0], "layers": [first, last], "tp": tps[i],
                       "devices": [group[r, i % pp] for r in range(dp)], "recompute": modes[i],
                       "sharding": {"templates": [], "boundary": []}})
        first = last + 1
    d["stages"] = stages
    d["cluster"].update(num_devices=max(8, at), devices_per_node=max(8, at))
    d["workload"].update(phase="train", dtype=dtype, seq_len=seq)
    d["parallelism"].update(dp=dp, pp=pp, microbatches=microbatches,
                            microbatch_size=16 // (dp * microbatches), zero=zero,
                            schedule=schedule, virtual_stages=n // pp, sequence_parallel=sp)
    d["predicted"]["mfu"] = 0.4
    path = tmp_path / name
    path.write_text(json.dumps(d))
    plan = Plan.load(path)
    assert _blocks(plan) == list(blocks)
    return plan


def _blocks(plan: Plan) -> list[int]:
    return [sum(1 for j in range(a, b + 1) if NAMES[j].startswith("model.")) for a, b in
            (s.layers for s in plan.stages)]


def _body(text: str) -> str:
    return "\n".join(x for x in text.splitlines() if not x.startswith("#"))


def _toml(text: str) -> dict:
    """torchtitan's export parsed, after asserting each key is in the checked list."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads(_body(text))
    keys = checked_flags()["torchtitan"]["keys"]
    emitted = {f"{section}.{k}" for section, values in config.items() for k in values}
    assert emitted <= set(keys), emitted - set(keys)
    return config


def _argv(text: str) -> tuple[dict, dict]:
    """(torchrun options, pretrain_gpt.py options) of Megatron's export, each checked."""
    [line] = [x for x in text.splitlines() if x and not x.startswith("#")]
    words = shlex.split(line)
    assert words[0] == "torchrun"
    cut = words.index(checked_flags()["megatron"]["command"])

    def options(rest: list[str]) -> dict:
        out = {}
        while rest:
            option = rest.pop(0)
            out[option] = rest.pop(0) if rest and not rest[0].startswith("--") else None
        return out

    launcher, args = options(words[1:cut]), options(words[cut + 1:])
    flags = checked_flags()["megatron"]
    assert set(launcher) <= set(flags["launcher"]) and set(args) <= set(flags["options"]), \
        (set(launcher) - set(flags["launcher"]), set(args) - set(flags["options"]))
    return launcher, args


def _deepspeed(text: str) -> tuple[dict, dict | None]:
    """(the JSON config, PipelineModule's keyword arguments or None), each key checked."""
    config = json.loads(_body(text))
    flags = checked_flags()["deepspeed"]

    def paths(d: dict, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from paths(v, prefix + k + ".")

    assert set(paths(config)) <= set(flags["keys"]), set(paths(config)) - set(flags["keys"])
    call_line = [x for x in text.splitlines() if x.startswith("# PipelineModule(")]
    if not call_line:
        return config, None
    node = ast.parse(call_line[0][2:]).body[0].value
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg != "layers"}
    assert set(kwargs) <= set(flags["pipeline_module"])
    return config, kwargs


def _refusal(plan: Plan, target: str) -> str:
    with pytest.raises(ExportError) as err:
        export_plan(plan, target, what="t.json")
    message = str(err.value)
    assert message.startswith(f"{target} cannot run t.json as planned: ")
    assert message.endswith(
        f"plan llama-tiny --cluster 8xH100 --batch 16 --seq {plan.workload.seq_len} --dtype "
        f"{plan.workload.dtype} --phase train --objective throughput --target {target} "
        f"--out plan-{target}.json")
    return message


def test_every_checked_entry_names_its_source():
    for target in ("torchtitan", "megatron", "deepspeed"):
        info = checked_flags()[target]
        entries = [v for key in ("keys", "options", "launcher", "pipeline_module")
                   for v in info.get(key, {}).values()]
        assert info["version"] and info["checked_in"] and len(entries) >= 3
        for entry in entries:
            assert entry["path"] and entry["meaning"] and entry["line"] > 0


def test_torchtitan_gets_the_plans_degrees_zero_and_uneven_split(base, tmp_path):
    plan = _train(base, tmp_path, (3, 5), zero=3, recompute="full")
    config = _toml(export_plan(plan, "torchtitan"))
    assert config["training"] == {"global_batch_size": 16, "local_batch_size": 8,
                                  "seq_len": 128, "mixed_precision_param": "bfloat16"}
    fqns = [["tok_embeddings", "layers.0", "layers.1", "layers.2"],
            ["layers.3", "layers.4", "layers.5", "layers.6", "layers.7", "norm", "output"]]
    assert config["parallelism"] == {
        "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": 2,
        "fsdp_reshard_after_forward": "always", "tensor_parallel_degree": 2,
        "pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "1F1B",
        "pipeline_parallel_microbatch_size": 4, "module_fqns_per_model_part": fqns}
    assert config["activation_checkpoint"] == {"mode": "full"}
    # torchtitan's own split of 8 blocks in 2 stages is [4, 4]: no module names needed;
    # ZeRO-2 keeps the parameters gathered from forward to backward
    even = _toml(export_plan(_train(base, tmp_path, (4, 4), zero=2, schedule="gpipe"),
                             "torchtitan"))["parallelism"]
    assert "module_fqns_per_model_part" not in even
    assert (even["fsdp_reshard_after_forward"], even["pipeline_parallel_schedule"]) == \
        ("never", "GPipe")


def test_torchtitan_interleaved_and_ddp(base, tmp_path):
    looped = _toml(export_plan(_train(base, tmp_path, (2, 2, 2, 2), zero=3,
                                      schedule="interleaved"), "torchtitan"))["parallelism"]
    assert looped["pipeline_parallel_schedule"] == "Interleaved1F1B"
    assert looped["module_fqns_per_model_part"] == [
        ["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "layers.3"],
        ["layers.4", "layers.5"], ["layers.6", "layers.7", "norm", "output"]]
    # its own 2-stages-per-rank split of 8 blocks is [2, 3, 2, 1]: no names needed
    own = _toml(export_plan(_train(base, tmp_path, (2, 3, 2, 1), zero=3,
                                   schedule="interleaved"), "torchtitan"))["parallelism"]
    assert "module_fqns_per_model_part" not in own
    ddp = _toml(export_plan(_train(base, tmp_path, (8,), pp=1, dp=2, tp=1, zero=0, sp=False,
                                   microbatches=4), "torchtitan"))
    assert ddp["parallelism"] == {"data_parallel_replicate_degree": 2,
                                  "data_parallel_shard_degree": 1,
                                  "tensor_parallel_degree": 1, "pipeline_parallel_degree": 1}
    # without pp the 4 microbatches are gradient-accumulation steps of 2 sequences
    assert (ddp["training"]["global_batch_size"], ddp["training"]["local_batch_size"]) == (16, 2)


def test_torchtitan_refuses_what_it_cannot_express(base, tmp_path):
    message = _refusal(_train(base, tmp_path, zero=0), "torchtitan")
    assert "ZeRO-0 (replicated, DDP), and torchtitan runs ZeRO 2/3 with dp 2 x pp 2 x tp 2" \
        in message
    assert "no ZeRO-1" not in message
    assert "runs ZeRO 2/3" in _refusal(_train(base, tmp_path, zero=1), "torchtitan")
    assert "the plan runs tp 2 without sequence parallelism" in _refusal(
        _train(base, tmp_path, zero=3, sp=False), "torchtitan")
    assert "the plan recomputes selective (the attention core only), which torchtitan has " \
        "no setting for" in _refusal(_train(base, tmp_path, zero=3, recompute="selective"),
                                     "torchtitan")
    assert "the stages recompute full/none, and torchtitan has one recompute setting" in \
        _refusal(_train(base, tmp_path, zero=3, recompute=["full", "none"]), "torchtitan")
    assert "the plan trains in float16" in _refusal(
        _train(base, tmp_path, zero=3, dtype="float16"), "torchtitan")
    assert "the sequence length 130 is not a multiple of 2 x tp = 4, which torchtitan " \
        "requires" in _refusal(_train(base, tmp_path, zero=3, seq=130), "torchtitan")


def test_megatron_gets_first_last_layers_or_a_layout(base, tmp_path):
    launcher, args = _argv(export_plan(_train(base, tmp_path, (3, 5), zero=1), "megatron"))
    assert launcher == {"--nnodes": "1", "--nproc-per-node": "8"}
    assert args == {"--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2",
                    "--num-layers": "8", "--decoder-first-pipeline-num-layers": "3",
                    "--decoder-last-pipeline-num-layers": "5", "--sequence-parallel": None,
                    "--use-distributed-optimizer": None, "--global-batch-size": "16",
                    "--micro-batch-size": "4", "--seq-length": "128", "--bf16": None}
    # pp 4 (one replica of tp 2 on 8 devices): even middle stages take first/last, others
    # the layout (E embedding, t decoder layer, L loss)
    first_last = _argv(export_plan(_train(base, tmp_path, (1, 3, 3, 1), pp=4, dp=1,
                                          microbatches=4), "megatron"))[1]
    assert (first_last["--decoder-first-pipeline-num-layers"],
            first_last["--decoder-last-pipeline-num-layers"]) == ("1", "1")
    layout = _argv(export_plan(_train(base, tmp_path, (2, 3, 2, 1), pp=4, dp=1,
                                      microbatches=4), "megatron"))[1]
    assert layout["--pipeline-model-parallel-layout"] == "Ett|ttt|tt|tL"
    assert "--decoder-first-pipeline-num-layers" not in layout
    even = _argv(export_plan(_train(base, tmp_path, (4, 4), zero=0, sp=False), "megatron"))[1]
    assert not {"--pipeline-model-parallel-layout", "--decoder-first-pipeline-num-layers",
                "--sequence-parallel", "--use-distributed-optimizer"} & set(even)


def test_megatron_interleaved_zero_and_recompute(base, tmp_path):
    even = _argv(export_plan(_train(base, tmp_path, (2, 2, 2, 2), zero=2,
                                    schedule="interleaved", recompute="selective"),
                             "megatron"))[1]
    assert even["--num-virtual-stages-per-pipeline-rank"] == "2"
    assert (even["--use-megatron-fsdp"], even["--data-parallel-sharding-strategy"],
            even["--ckpt-format"]) == (None, "optim_grads", "fsdp_dtensor")
    assert (even["--recompute-granularity"], even["--recompute-modules"]) == \
        ("selective", "core_attn")
    uneven = _argv(export_plan(_train(base, tmp_path, (3, 1, 2, 2), zero=3,
                                      schedule="interleaved", recompute="full"),
                               "megatron"))[1]
    # entry i runs on pipeline rank i mod 2: rank 0 holds stages 0 and 2
    assert uneven["--pipeline-model-parallel-layout"] == "Ettt|t|tt|ttL"
    assert "--num-virtual-stages-per-pipeline-rank" not in uneven
    assert uneven["--data-parallel-sharding-strategy"] == "optim_grads_params"
    assert (uneven["--recompute-granularity"], uneven["--recompute-method"],
            uneven["--recompute-num-layers"]) == ("full", "uniform", "1")


def test_megatron_refuses_what_it_cannot_express(base, tmp_path):
    assert "the plan's pipeline schedule is gpipe, and megatron runs 1f1b or interleaved" \
        in _refusal(_train(base, tmp_path, schedule="gpipe"), "megatron")
    assert "the stages have tp 2/1, and megatron runs one tp for every stage" in _refusal(
        _train(base, tmp_path, tp=[2, 1]), "megatron")
    assert "the stages recompute selective/none, and megatron has one recompute setting" in \
        _refusal(_train(base, tmp_path, recompute=["selective", "none"]), "megatron")
    assert "tp 4 does not divide the 2 KV heads" in _refusal(
        _train(base, tmp_path, (8,), pp=1, tp=4, microbatches=1), "megatron")


def test_deepspeed_config_and_its_partition_methods(base, tmp_path):
    names = NAMES
    # uniform over the 10 plan layers: 5 + 5 (blocks [4, 4]); blocks balanced (type:):
    # DeepSpeed's tie-break puts pre with 4 blocks and 4 blocks with post (the same here)
    assert deepspeed_splits(names, 2) == {"uniform": [(0, 4), (5, 9)],
                                          "type:BLOCK": [(0, 4), (5, 9)]}
    assert deepspeed_splits(names, 3) == {"uniform": [(0, 3), (4, 6), (7, 9)],
                                          "type:BLOCK": [(0, 3), (4, 6), (7, 9)]}
    assert deepspeed_splits(names, 4) == {"uniform": [(0, 2), (3, 5), (6, 7), (8, 9)],
                                          "type:BLOCK": [(0, 2), (3, 4), (5, 6), (7, 9)]}
    config, module = _deepspeed(export_plan(_train(base, tmp_path, (4, 4), zero=1, sp=False,
                                                   tp=1, recompute="full"), "deepspeed"))
    assert config == {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                      "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
                      "bf16": {"enabled": True},
                      "activation_checkpointing": {"partition_activations": False,
                                                   "cpu_checkpointing": False}}
    assert module == {"num_stages": 2, "partition_method": "uniform",
                      "activation_checkpoint_interval": 1}
    blocks = _train(base, tmp_path, (2, 2, 2, 2), pp=4, dp=1, tp=1, sp=False, microbatches=4)
    assert _deepspeed(export_plan(blocks, "deepspeed"))[1]["partition_method"] == "type:BLOCK"
    fsdp, module = _deepspeed(export_plan(_train(base, tmp_path, (8,), pp=1, tp=2, zero=3,
                                                 sp=False, dtype="float16"), "deepspeed"))
    assert module is None
    assert (fsdp["zero_optimization"], fsdp["tensor_parallel"], fsdp["fp16"]) == \
        ({"stage": 3}, {"autotp_size": 2}, {"enabled": True})


def test_deepspeed_refuses_what_it_cannot_express(base, tmp_path):
    message = _refusal(_train(base, tmp_path, (3, 5), tp=1, sp=False), "deepspeed")
    assert "Re-plan within what deepspeed can express (one tp for every stage, one recompute " \
        "setting for every stage (full/none), schedule 1f1b, no sequence parallelism, ZeRO " \
        "0/1 with pp, tp or pp, not both, its partition methods' split)" in message
    assert "the decoder layers per stage are [3, 5], and deepspeed's PipelineModule splits " \
           "them only by its partition_method (uniform gives [4, 4]; type:BLOCK gives [4, 4])" \
        in message
    assert "ZeRO-2 (optimizer states and gradients sharded), and deepspeed runs ZeRO 0/1 " \
        "with dp 2 x pp 2 x tp 1" in _refusal(_train(base, tmp_path, zero=2, tp=1, sp=False),
                                             "deepspeed")
    assert "the plan combines tp 2 with pp 2" in _refusal(_train(base, tmp_path, sp=False),
                                                          "deepspeed")
    assert "sequence parallelism, which deepspeed has no option for" in _refusal(
        _train(base, tmp_path, (8,), pp=1, microbatches=1), "deepspeed")
    assert "schedule is interleaved, and deepspeed runs 1f1b" in _refusal(
        _train(base, tmp_path, (2, 2, 2, 2), tp=1, sp=False, schedule="interleaved"),
        "deepspeed")


def test_the_phase_decides_which_targets_apply(base, tmp_path, capsys):
    path = tmp_path / "prefill.json"
    path.write_text(json.dumps(base))
    message = refused(["export", path, "--to", "megatron"], capsys)
    assert f"megatron trains models, and {path} is a prefill plan (inference)" in message
    assert "plan MODEL ... --phase train --target megatron" in message
    train = _train(base, tmp_path, name="t.json")
    message = refused(["export", tmp_path / "t.json", "--to", "vllm"], capsys)
    assert f"vllm serves models, and {tmp_path / 't.json'} is a train plan" in message
    code, out, _ = call(["export", tmp_path / "t.json", "--to", "megatron"], capsys)
    assert code == 0 and out == export_plan(train, "megatron", what=str(tmp_path / "t.json"))
    assert "cannot run" in refused(["export", tmp_path / "t.json", "--to", "deepspeed"],
                                   capsys)
    assert refused(["llama-tiny", "--cluster", "4xH100", "--target", "megatron"], capsys) == (
        "error: megatron trains models, and this request plans prefill: choose --target vllm, "
        "sglang or tensorrt-llm, or plan with --phase train --target megatron")


def test_training_restrictions_for_the_solver():
    names = list(NAMES)
    speed, tps, sp = training_restriction("deepspeed", names, ARCH, range(1, 9))
    assert speed.uniform_tp and speed.uniform_recompute and not speed.tp_with_pp
    assert speed.split(2) == [(0, 4), (5, 9)] and speed.split(4) == [(0, 2), (3, 4), (5, 6),
                                                                      (7, 9)]
    assert speed.split(11) is None  # more stages than layers
    assert (speed.zero_levels(2, 2, 1), speed.zero_levels(2, 1, 2)) == \
        (frozenset({0, 1}), frozenset({0, 1, 2, 3}))
    assert speed.schedules == {"1f1b"} and speed.recompute == {"none", "full"}
    assert (tps, sp, speed.sequence_parallel_with_tp) == (list(range(1, 9)), False, False)
    titan, tps, sp = training_restriction("torchtitan", names, ARCH, range(1, 9))
    assert titan.split is None and tps == [1, 2] and sp is True
    assert titan.sequence_parallel_with_tp is True
    assert (titan.zero_levels(2, 1, 1), titan.zero_levels(2, 2, 1),
            titan.zero_levels(1, 2, 2)) == (frozenset({0, 2, 3}), frozenset({2, 3}),
                                            frozenset({0, 1, 2, 3}))
    mega, tps, sp = training_restriction("megatron", names, ARCH, range(1, 9))
    assert mega.schedules == {"1f1b", "interleaved"} and tps == [1, 2] and sp is True
    assert mega.sequence_parallel_with_tp is None and mega.zero_levels(4, 2, 2) == \
        frozenset(range(4))

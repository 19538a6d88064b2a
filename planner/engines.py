"""Deploying a plan with the engines people run: what each can express, and the command
line or config that gives it the plan's parallelism (``plan export``, ``plan MODEL
--target``). Inference plans go to the serving engines (vLLM, SGLang, TensorRT-LLM), train
plans to the training frameworks (torchtitan's TOML keys, Megatron-LM's arguments,
DeepSpeed's JSON and ``PipelineModule`` arguments).

The options, environment variables and config keys an export may emit are the checked
list in ``planner/engines/flags.json`` (each with the engine's source file, line and
version); the rules below (one tp for every stage, head divisibility, sequence
parallelism, the layer split) are the ones that file cites. Everything is decided from the
plan's structure: its stages, its layers (``pre``, the blocks, ``post``) and the model's
recorded arch, never from a model's name.

>>> _even_split(81, 4, "tensorrt-llm"), _even_split(81, 4, "vllm"), _even_split(81, 4, "sglang")
([21, 20, 20, 20], [20, 20, 21, 20], [20, 20, 20, 21])
>>> _torchtitan_split(80, 4), _ds_partition_uniform(82, 4)
([20, 21, 20, 19], [0, 21, 42, 62, 82])
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from planner.plan import SCHEDULES
from planner.solver import Restriction

__all__ = ["TARGETS", "INFERENCE_TARGETS", "TRAINING_TARGETS", "ExportError", "EngineRules",
           "TrainingRules", "checked_flags", "rules", "training_rules", "differences",
           "training_differences", "export_plan", "target_command", "training_error",
           "block_split", "restriction", "training_restriction", "deepspeed_splits"]

INFERENCE_TARGETS = ("vllm", "sglang", "tensorrt-llm")
TRAINING_TARGETS = ("torchtitan", "megatron", "deepspeed")
TARGETS = INFERENCE_TARGETS + TRAINING_TARGETS
_FLAGS = Path(__file__).with_name("engines") / "flags.json"


class ExportError(ValueError):
    """The plan cannot be exported to that target; the message says what differs and how
    to get a plan that can."""


@cache
def checked_flags() -> dict:
    """``planner/engines/flags.json``: per target, the options / env / keys checked."""
    return json.loads(_FLAGS.read_text())


@dataclass(frozen=True)
class EngineRules:
    """What one inference engine can express.

    Attributes:
        name: the target.
        sequence_parallel: it has a sequence-parallel mode.
        heads_divisible: tp must divide the attention heads, and tp and the KV heads must
            divide one another (the KV heads are split, or replicated ``tp / kv`` times).
        free_split: any contiguous split of the blocks (an environment variable); else its
            own fixed split (``block_split``).
        replicas: it runs dp replicas itself (else one server per replica).
    """

    name: str
    sequence_parallel: bool
    heads_divisible: bool
    free_split: bool
    replicas: bool


_RULES = {
    "vllm": EngineRules("vllm", sequence_parallel=True, heads_divisible=True, free_split=True,
                        replicas=True),
    "sglang": EngineRules("sglang", sequence_parallel=False, heads_divisible=True,
                          free_split=True, replicas=True),
    "tensorrt-llm": EngineRules("tensorrt-llm", sequence_parallel=False, heads_divisible=False,
                                free_split=False, replicas=False),
}


def training_error(target: str, phase: str, what: str, request: bool = False) -> ExportError:
    """The error for a plan (or, with ``request``, a ``plan MODEL --target`` request) whose
    phase the target does not run: inference to a training framework, or training to a
    serving engine."""
    trains = target in TRAINING_TARGETS
    others = INFERENCE_TARGETS if trains else TRAINING_TARGETS
    choices = f"{', '.join(others[:-1])} or {others[-1]}"
    kind = (f"{target} trains models" if trains else f"{target} serves models")
    phases = "train" if trains else "prefill|decode"
    if request:
        return ExportError(f"{kind}, and this request plans {phase}: choose --target "
                           f"{choices}, or plan with --phase {phases} --target {target}")
    return ExportError(
        f"{kind}, and {what} is a {phase} plan" + (" (inference)" if trains else "")
        + f": export it with --to {choices}, or plan "
        + ("training" if trains else "inference")
        + f" for {target} with plan MODEL ... --phase {phases} --target {target}")


def rules(target: str) -> EngineRules:
    """The rules of an inference target.

    Raises:
        ExportError: a training target (``training_rules``) or an unknown name.
    """
    if target in TRAINING_TARGETS:
        raise ExportError(f"{target} is a training target: its rules are "
                          "planner.engines.training_rules")
    if target not in _RULES:
        raise ExportError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    return _RULES[target]


def _even_split(blocks: int, pp: int, target: str) -> list[int] | None:
    """The engine's own split of ``blocks`` decoder layers into ``pp`` stages (what it does
    without a partition variable), or None when it cannot split them so."""
    if pp > blocks:
        return None
    base, extra = divmod(blocks, pp)
    if target == "tensorrt-llm":  # torch.tensor_split: the first `extra` stages one more
        return [base + (i < extra) for i in range(pp)]
    if target == "sglang":  # the last stage takes the remainder
        return [base] * (pp - 1) + [base + extra]
    split = [base] * pp  # vllm: one more for each of the `extra` stages before the last
    for i in range(2, extra + 2):
        split[-i] += 1
    return split


def _block_layers(names: list[str]) -> tuple[int, int]:
    """``(first, count)`` of the decoder blocks among a plan's layers: the layers between
    an optional ``pre`` (embeddings) and an optional ``post`` (final norm, head)."""
    first = 1 if names and names[0] == "pre" else 0
    last = len(names) - (1 if names and names[-1] == "post" else 0)
    return first, last - first


def block_split(names: list[str], stages: list[tuple[int, int]]) -> list[int]:
    """Decoder blocks per stage: the stage's layers less ``pre`` and ``post``."""
    first, count = _block_layers(names)
    return [max(0, min(b, first + count - 1) - max(a, first) + 1) for a, b in stages]


def _stage_ranges(names: list[str], split: list[int]) -> list[tuple[int, int]]:
    """Plan layer ranges of a block split: ``pre`` with the first stage, ``post`` with the
    last."""
    first, _ = _block_layers(names)
    ranges, at = [], first
    for i, n in enumerate(split):
        a = 0 if i == 0 else at
        b = len(names) - 1 if i == len(split) - 1 else at + n - 1
        ranges.append((a, b))
        at += n
    return ranges


def _tp_allowed(engine: EngineRules, tp: int, arch: dict | None) -> str | None:
    """Why ``tp`` is not allowed by the engine for this arch (None: allowed)."""
    if not engine.heads_divisible or not arch or not arch.get("num_heads"):
        return None
    heads, kv = arch["num_heads"], arch.get("num_kv_heads") or arch["num_heads"]
    if heads % tp:
        return f"tp {tp} does not divide the {heads} attention heads"
    if (tp >= kv and tp % kv) or (tp < kv and kv % tp):
        return f"tp {tp} and the {kv} KV heads do not divide one another"
    return None


def restriction(target: str, names: list[str], arch: dict | None, degrees) -> tuple[
        Restriction, list[int], bool]:
    """The search space of ``plan MODEL --target``: ``(Restriction, tp degrees allowed,
    sequence parallelism allowed)`` for a model whose layers are ``names``."""
    if target in TRAINING_TARGETS:
        return training_restriction(target, names, arch, degrees)
    engine = rules(target)
    split = None
    if not engine.free_split:
        def split(pp: int, names=tuple(names)):
            blocks = _even_split(_block_layers(list(names))[1], pp, target)
            return None if blocks is None else _stage_ranges(list(names), blocks)
    tps = [t for t in degrees if _tp_allowed(engine, t, arch) is None]
    return Restriction(uniform_tp=True, split=split, name=target), tps, engine.sequence_parallel


def differences(plan, target: str) -> list[str]:
    """What ``plan`` does that ``target`` cannot express (empty: it can run it)."""
    if target in TRAINING_TARGETS:
        return training_differences(plan, target)
    engine = rules(target)
    names = [layer.name for layer in plan.layers]
    tps = sorted({s.tp for s in plan.stages})
    found = []
    if len(tps) > 1:
        found.append(f"the stages have tp {'/'.join(str(s.tp) for s in plan.stages)}, and "
                     f"{target} runs one tp for every stage")
    if plan.parallelism.sequence_parallel and not engine.sequence_parallel:
        found.append(f"the plan uses sequence parallelism, which {target} has no option for")
    arch = plan.extra.get("arch")
    for t in tps:
        why = _tp_allowed(engine, t, arch)
        if why:
            found.append(f"{why} ({target} splits heads evenly)")
    if not engine.free_split:
        ranges = [tuple(s.layers) for s in plan.stages]
        blocks = block_split(names, ranges)
        own = _even_split(sum(blocks), len(blocks), target)
        if blocks != own:
            found.append(f"the decoder layers per stage are {blocks}, and {target} splits "
                         f"them {own} (it has no option for another split)")
    return found


def _context(plan) -> int:
    full = plan.extra.get("workload_full") or {}
    if plan.workload.phase == "decode":
        return int(full.get("context_len") or plan.workload.seq_len)
    return plan.workload.seq_len


def _spec(cluster) -> str:
    per_node = f"{cluster.devices_per_node}x{cluster.device}"
    return per_node if cluster.nodes == 1 else f"{cluster.nodes}x{per_node}"


def target_command(plan, target: str, out: str = "plan-{target}.json") -> str:
    """The ``plan MODEL ... --target`` command that re-plans ``plan``'s request within
    what ``target`` can express."""
    source = plan.extra.get("source") or {}
    full = plan.extra.get("workload_full") or {}
    w = plan.workload
    words = ["plan", source.get("model") or plan.model.name]
    for key, value in (source.get("overrides") or {}).items():
        words += ["--set", f"{key}={json.dumps(value)}"]
    words += ["--cluster", _spec(plan.cluster), "--batch", str(w.batch_size), "--seq",
              str(w.seq_len), "--dtype", w.dtype, "--phase", w.phase, "--objective", w.objective]
    if w.phase == "decode" and full.get("context_len"):
        words += ["--context", str(full["context_len"])]
    if full.get("memory_headroom") is not None and full["memory_headroom"] != 0.1:
        words += ["--headroom", f"{full['memory_headroom']:g}"]
    words += ["--target", target, "--out", out.format(target=target)]
    return " ".join(shlex.quote(w) for w in words)


def export_plan(plan, target: str, what: str = "the plan") -> str:
    """The command line (and config) that deploys ``plan``'s parallelism with ``target``.

    Raises:
        ExportError: a training target, or a plan the target cannot express (the message
            lists the differences and the ``plan MODEL ... --target`` command).
    """
    if target in TRAINING_TARGETS:
        return _export_training(plan, target, what)
    if _is_train(plan):
        raise training_error(target, plan.workload.phase, what)
    engine = rules(target)
    found = differences(plan, target)
    if found:
        raise ExportError(
            f"{target} cannot run {what} as planned: " + "; ".join(found) + ". Re-plan "
            f"within what {target} can express (one tp for every stage"
            + (", no sequence parallelism" if not engine.sequence_parallel else "")
            + (", its own layer split" if not engine.free_split else "")
            + f"), proven optimal there: {target_command(plan, target)}")
    par = plan.parallelism
    tp, pp, dp = plan.stages[0].tp, par.pp, par.dp
    names = [layer.name for layer in plan.layers]
    blocks = block_split(names, [tuple(s.layers) for s in plan.stages])
    own = _even_split(sum(blocks), pp, target)
    info = checked_flags()[target]
    w = plan.workload
    head = [f"# {target} {info['version']} ({info['command']}), flags checked in "
            f"planner/engines/flags.json against {info['project']}",
            f"# {what}: {plan.model.name} on {_spec(plan.cluster)}, {w.phase} batch "
            f"{w.batch_size} seq {w.seq_len} {w.dtype}; dp {dp} x pp {pp} x tp {tp} = "
            f"{dp * pp * tp} devices; decoder layers per stage {blocks}"
            + (f" ({target}'s own split is {own})" if pp > 1 else ""),
            f"# MODEL: the weights of {plan.model.name} (the plan names no checkpoint)"]
    if par.microbatches > 1:
        head.append(f"# not set: the plan's {par.microbatches} microbatches per replica "
                    f"({target} forms its own batches)")
    context = _context(plan)
    env = ""
    if target == "vllm":
        if pp > 1 and blocks != own:
            env = f"VLLM_PP_LAYER_PARTITION={','.join(map(str, blocks))} "
        args = ["--tensor-parallel-size", tp, "--pipeline-parallel-size", pp,
                "--data-parallel-size", dp, "--dtype", w.dtype, "--max-model-len", context]
        if par.sequence_parallel:
            args += ["--compilation-config",
                     json.dumps({"pass_config": {"enable_sequence_parallelism": True}})]
        per_node = plan.cluster.devices_per_node
        if tp * pp > per_node:  # one replica spans nodes: vLLM's Ray executor
            head.append("# one replica spans nodes: start a Ray cluster over them, then run "
                        "this on its head node")
            args += ["--distributed-executor-backend", "ray"]
        elif dp * tp * pp > per_node:  # whole replicas per node: vLLM's multi-node dp
            local = per_node // (tp * pp)
            head.append(f"# {dp} replicas, {local} per node: run line n on node n; HEAD is "
                        "node 0's address, DP_RPC_PORT a port it can open")
            lines = []
            for node, start in enumerate(range(0, dp, local)):
                extra = ["--data-parallel-size-local", min(local, dp - start),
                         "--data-parallel-address", '"$HEAD"', "--data-parallel-rpc-port",
                         '"$DP_RPC_PORT"']
                if node:
                    extra += ["--data-parallel-start-rank", start, "--headless"]
                lines.append(env + 'vllm serve "$MODEL" ' + _join(args + extra))
            return "\n".join(head + lines) + "\n"
        return "\n".join(head + [env + 'vllm serve "$MODEL" ' + _join(args)]) + "\n"
    if target == "sglang":
        if pp > 1 and blocks != own:
            env = f"SGLANG_PP_LAYER_PARTITION={','.join(map(str, blocks))} "
        args = ["--model-path", '"$MODEL"', "--tp-size", tp, "--pp-size", pp, "--dp-size", dp,
                "--dtype", w.dtype, "--context-length", context]
        return "\n".join(head + [env + "python -m sglang.launch_server " + _join(args)]) + "\n"
    # tensorrt-llm: one server is one replica (world_size = tp x pp)
    if dp > 1:
        head.append(f"# dp {dp}: start {dp} such servers, each on tp x pp = {tp * pp} GPUs "
                    "of its own (one trtllm-serve has no replica count)")
    args = ["--tp_size", tp, "--pp_size", pp, "--max_seq_len", context]
    return "\n".join(head + ['trtllm-serve "$MODEL" ' + _join(args)]) + "\n"


def _join(args: list) -> str:
    return " ".join(a if isinstance(a, str) and a.startswith('"$') else shlex.quote(str(a))
                    for a in args)


# Training frameworks (train plans): torchtitan, Megatron-LM, DeepSpeed.

@dataclass(frozen=True)
class TrainingRules:
    """What one training framework can express (sources in ``planner/engines/flags.json``).

    Attributes:
        name: the target.
        schedules: pipeline schedules it runs when pp > 1.
        recompute: ``stages[i].recompute`` modes it has an exact setting for.
        sequence_parallel: ``"free"`` (an option), ``"with_tp"`` (always on when tp > 1)
            or ``"none"``.
        heads_divisible: tp divides the attention heads and the KV heads (no replication).
        tp_with_pp: tp > 1 and pp > 1 together.
        split: ``"free"`` (any split it can be given) or ``"deepspeed"`` (its partition
            methods' splits, ``deepspeed_splits``).
        dtypes: the plan dtypes it trains in.
        zero, zero_with_tp, zero_with_pp: the ZeRO levels it runs over dp > 1 replicas, and
            those it keeps when tp > 1 or pp > 1 join them.
        seq_multiple_of_2tp: the sequence length must be a multiple of 2 × tp.
    """

    name: str
    schedules: frozenset
    recompute: frozenset
    sequence_parallel: str
    heads_divisible: bool
    tp_with_pp: bool
    split: str
    dtypes: frozenset
    zero: frozenset = frozenset(range(4))
    zero_with_tp: frozenset = frozenset(range(4))
    zero_with_pp: frozenset = frozenset(range(4))
    seq_multiple_of_2tp: bool = False

    def zero_levels(self, dp: int, pp: int, tp: int) -> frozenset:
        """The ZeRO levels it runs with these degrees (any when dp is 1: nothing to shard)."""
        if dp == 1:
            return frozenset(range(4))
        return (self.zero & (self.zero_with_tp if tp > 1 else self.zero)
                & (self.zero_with_pp if pp > 1 else self.zero))


_TRAINING_RULES = {
    "torchtitan": TrainingRules(  # FSDP (ZeRO-2/3) with anything, DDP only on its own
        "torchtitan", schedules=frozenset({"gpipe", "1f1b", "interleaved"}),
        recompute=frozenset({"none", "full"}), sequence_parallel="with_tp",
        heads_divisible=True, tp_with_pp=True, split="free",
        dtypes=frozenset({"bfloat16", "float32"}), zero=frozenset({0, 2, 3}),
        zero_with_tp=frozenset({2, 3}), zero_with_pp=frozenset({2, 3}),
        seq_multiple_of_2tp=True),
    "megatron": TrainingRules(
        "megatron", schedules=frozenset({"1f1b", "interleaved"}),
        recompute=frozenset({"none", "selective", "full"}), sequence_parallel="free",
        heads_divisible=True, tp_with_pp=True, split="free",
        dtypes=frozenset({"bfloat16", "float16", "float32"})),
    "deepspeed": TrainingRules(  # its pipeline engine refuses ZeRO-2/3
        "deepspeed", schedules=frozenset({"1f1b"}), recompute=frozenset({"none", "full"}),
        sequence_parallel="none", heads_divisible=False, tp_with_pp=False, split="deepspeed",
        dtypes=frozenset({"bfloat16", "float16", "float32"}),
        zero_with_pp=frozenset({0, 1})),
}
_TORCHTITAN_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "Interleaved1F1B"}
_ZERO_NAMES = {0: "ZeRO-0 (replicated, DDP)", 1: "ZeRO-1 (optimizer states sharded)",
               2: "ZeRO-2 (optimizer states and gradients sharded)",
               3: "ZeRO-3 (parameters sharded too, FSDP)"}


def training_rules(target: str) -> TrainingRules:
    """The rules of a training target.

    Raises:
        ExportError: an inference target or an unknown name.
    """
    if target not in _TRAINING_RULES:
        raise ExportError(f"{target!r} is not a training target; one of "
                          f"{', '.join(TRAINING_TARGETS)}")
    return _TRAINING_RULES[target]


def _ds_partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_uniform`` (deepspeed/runtime/utils.py): part boundaries."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def _ds_partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_balanced`` (deepspeed/runtime/utils.py): part boundaries
    that minimise the spread (largest part less smallest) of the part weights, with its
    tie-break, so they are the ones DeepSpeed computes."""
    if len(weights) <= num_parts:
        return _ds_partition_uniform(len(weights), num_parts)
    position = _ds_balanced_positions(tuple(weights))
    parts = [len(weights)]
    for j in range(num_parts, 0, -1):
        parts.append(int(position[parts[-1], j]))
    return parts[::-1]


@cache
def _ds_balanced_positions(weights: tuple[int, ...]) -> np.ndarray:
    """``position[i, j]``: where the last of ``j`` parts of the first ``i`` items starts,
    from DeepSpeed's dynamic programme. Its cells do not depend on the number of parts
    asked for, so one table (every ``j`` up to ``n``) serves each stage count, and the
    scan over the split point ``k`` is one vector operation. DeepSpeed replaces its best
    ``k`` whenever a later ``k`` costs no more, so the ``k`` kept is the last one of least
    cost."""
    n = len(weights)
    prefix = np.zeros(n + 1)
    prefix[1:] = np.cumsum(weights)
    dp_max = np.full((n + 1, n + 1), np.inf)
    dp_min = np.full((n + 1, n + 1), np.inf)  # DeepSpeed leaves dp_min[0, 0] infinite
    position = np.zeros((n + 1, n + 1), dtype=int)
    dp_max[0, 0] = 0
    for j in range(1, n + 1):
        for i in range(j, n + 1):
            part = prefix[i] - prefix[:i]
            high = np.maximum(dp_max[:i, j - 1], part)
            low = np.minimum(dp_min[:i, j - 1], part)
            k = i - 1 - int(np.argmin((high - low)[::-1]))  # the last k of least cost
            dp_max[i, j], dp_min[i, j], position[i, j] = high[k], low[k], k
    return position


@cache
def deepspeed_splits(names: tuple[str, ...], pp: int) -> dict[str, list[tuple[int, int]]]:
    """The layer ranges DeepSpeed's ``PipelineModule`` gives ``pp`` stages when its layer
    list is the plan's layers (``pre``, each block, ``post``): ``{partition_method:
    ranges}`` for ``uniform`` (layers counted alike) and ``type:BLOCK`` (decoder blocks
    balanced; ``BLOCK`` matches the block's class name). A method that leaves a stage empty
    is left out."""
    first, count = _block_layers(list(names))
    weights = [1 if first <= j < first + count else 0 for j in range(len(names))]
    found = {}
    for method, parts in (("uniform", _ds_partition_uniform(len(names), pp)),
                          ("type:BLOCK", _ds_partition_balanced(weights, pp))):
        if all(b > a for a, b in zip(parts, parts[1:])):
            found[method] = [(a, b - 1) for a, b in zip(parts, parts[1:])]
    return found


def _torchtitan_split(blocks: int, stages: int) -> list[int]:
    """Blocks per stage of torchtitan's own split (``generate_llm_fqn_per_model_part``,
    embedding and output each weighed as one layer)."""
    if stages == 1:
        return [blocks]
    effective = blocks + 2
    base, extra = divmod(effective, stages)
    split, at = [], 0
    for i in range(stages):
        n = base + (i < extra) - (i == 0) - (i == stages - 1)
        take = max(0, min(n, blocks - at))
        split.append(take)
        at += take
    return split


def _is_train(plan) -> bool:
    return plan.workload.phase == "train"


def _arch_heads(arch: dict | None) -> tuple[int, int] | None:
    if not arch or not arch.get("num_heads"):
        return None
    return arch["num_heads"], arch.get("num_kv_heads") or arch["num_heads"]


def _training_tp_allowed(engine: TrainingRules, tp: int, arch: dict | None) -> str | None:
    heads = _arch_heads(arch)
    if not engine.heads_divisible or heads is None:
        return None
    if heads[0] % tp:
        return f"tp {tp} does not divide the {heads[0]} attention heads"
    if heads[1] % tp:
        return f"tp {tp} does not divide the {heads[1]} KV heads"
    return None


def training_restriction(target: str, names: list[str], arch: dict | None, degrees) -> tuple[
        Restriction, list[int], bool]:
    """The search space of ``plan MODEL --phase train --target``: ``(Restriction, tp
    degrees allowed, sequence parallelism allowed)``."""
    engine = training_rules(target)
    split = None
    if engine.split == "deepspeed":  # the type: partition (decoder blocks balanced, the
        # way Megatron-DeepSpeed builds its PipelineModule); uniform where it leaves a stage
        # empty. The export accepts either.
        def split(stages: int, names=tuple(names)):
            found = deepspeed_splits(names, stages)
            return found.get("type:BLOCK") or found.get("uniform")
    tps = [t for t in degrees if _training_tp_allowed(engine, t, arch) is None]
    return (Restriction(uniform_tp=True, split=split, name=target,
                        zero_levels=engine.zero_levels, schedules=engine.schedules,
                        recompute=engine.recompute, uniform_recompute=True,
                        tp_with_pp=engine.tp_with_pp,
                        sequence_parallel_with_tp={"with_tp": True, "none": False}.get(
                            engine.sequence_parallel)),
            tps, engine.sequence_parallel != "none")


def training_differences(plan, target: str) -> list[str]:
    """What the train ``plan`` does that ``target`` cannot express (empty: it can)."""
    engine = training_rules(target)
    par, w = plan.parallelism, plan.workload
    tps = sorted({s.tp for s in plan.stages})
    pp = par.pp
    found = []
    if len(tps) > 1:
        found.append(f"the stages have tp {'/'.join(str(s.tp) for s in plan.stages)}, and "
                     f"{target} runs one tp for every stage")
    for t in tps:
        why = _training_tp_allowed(engine, t, plan.extra.get("arch"))
        if why:
            found.append(f"{why} ({target} splits attention and KV heads evenly)")
    if engine.sequence_parallel == "none" and par.sequence_parallel:
        found.append(f"the plan uses sequence parallelism, which {target} has no option for")
    if engine.sequence_parallel == "with_tp" and max(tps) > 1 and not par.sequence_parallel:
        found.append(f"the plan runs tp {max(tps)} without sequence parallelism, and {target}'s "
                     "tensor parallelism always shards the norms' sequence (SequenceParallel)")
    if not engine.tp_with_pp and max(tps) > 1 and pp > 1:
        found.append(f"the plan combines tp {max(tps)} with pp {pp}, and {target} has no "
                     "setting that does both (AutoTP, tensor_parallel.autotp_size, sets up "
                     "its own tp groups on the engine; PipelineModule's topology is pipe x "
                     "data)")
    if pp > 1 and par.schedule not in engine.schedules:
        found.append(f"the plan's pipeline schedule is {par.schedule}, and {target} runs "
                     f"{' or '.join(sorted(engine.schedules))}")
    levels = engine.zero_levels(par.dp, pp, max(tps))
    if par.zero not in levels:
        found.append(f"the plan shards data parallelism at {_ZERO_NAMES[par.zero]}, and "
                     f"{target} runs ZeRO {'/'.join(map(str, sorted(levels)))} with dp "
                     f"{par.dp} x pp {pp} x tp {max(tps)}")
    modes = [s.recompute for s in plan.stages]
    if len(set(modes)) > 1:
        found.append(f"the stages recompute {'/'.join(modes)}, and {target} has one "
                     "recompute setting for every stage")
    for mode in sorted(set(modes) - engine.recompute):
        found.append(f"the plan recomputes {mode} (the attention core only), which {target} "
                     "has no setting for")
    if engine.seq_multiple_of_2tp and w.seq_len % (2 * max(tps)):
        found.append(f"the sequence length {w.seq_len} is not a multiple of 2 x tp = "
                     f"{2 * max(tps)}, which {target} requires")
    if w.dtype not in engine.dtypes:
        found.append(f"the plan trains in {w.dtype}, which {target} has no setting for")
    if engine.split == "deepspeed" and pp > 1:
        names = tuple(layer.name for layer in plan.layers)
        ranges = [tuple(s.layers) for s in plan.stages]
        own = deepspeed_splits(names, len(ranges))
        if ranges not in [[tuple(r) for r in v] for v in own.values()]:
            blocks = block_split(list(names), ranges)
            options = "; ".join(f"{m} gives {block_split(list(names), v)}"
                                for m, v in own.items())
            found.append(f"the decoder layers per stage are {blocks}, and {target}'s "
                         f"PipelineModule splits them only by its partition_method ({options})")
    return found


def _stage_modules(names: list[str], layers: tuple[int, int]) -> list[str]:
    """torchtitan's module names of a plan stage: ``tok_embeddings``, ``layers.<k>``, and
    ``norm`` with ``output`` (the names its ``generate_llm_fqn_per_model_part`` uses)."""
    first, _ = _block_layers(names)
    out = []
    for j in range(layers[0], layers[1] + 1):
        if names[j] == "pre" and j == 0:
            out.append("tok_embeddings")
        elif names[j] == "post" and j == len(names) - 1:
            out += ["norm", "output"]
        else:
            out.append(f"layers.{j - first}")
    return out


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)
    return str(value)


def _launch(plan) -> tuple[int, int]:
    """(nodes, processes per node) that run the plan's dp × pp × tp ranks."""
    par = plan.parallelism
    used = par.dp * par.pp * plan.stages[0].tp
    per_node = plan.cluster.devices_per_node
    nodes = -(-used // per_node)
    if used % nodes:
        raise ExportError(f"the plan uses {used} devices, which do not fill {nodes} nodes "
                          "evenly: launchers start the same number of ranks on every node")
    return nodes, used // nodes


def _training_head(plan, target: str, what: str, blocks: list[int]) -> list[str]:
    info = checked_flags()[target]
    par, w = plan.parallelism, plan.workload
    tp = plan.stages[0].tp
    modes = sorted({s.recompute for s in plan.stages})
    return [f"# {target} {info['version']} ({info['command']}), keys checked in "
            f"planner/engines/flags.json against {info['project']}",
            f"# {what}: {plan.model.name} on {_spec(plan.cluster)}, train batch "
            f"{w.batch_size} seq {w.seq_len} {w.dtype}; dp {par.dp} x pp {par.pp} x tp {tp} = "
            f"{par.dp * par.pp * tp} devices; ZeRO-{par.zero}"
            + (f", schedule {par.schedule}" if par.pp > 1 else "")
            + (f" with {par.virtual_stages} virtual stages per device" if
               par.virtual_stages > 1 else "")
            + f"; {par.microbatches} microbatch(es) of {par.microbatch_size} per replica; "
            f"recompute {'/'.join(modes)}; decoder layers per stage {blocks}"]


def _export_torchtitan(plan, what: str, blocks: list[int]) -> str:
    par, w = plan.parallelism, plan.workload
    tp, pp, dp = plan.stages[0].tp, par.pp, par.dp
    names = [layer.name for layer in plan.layers]
    head = _training_head(plan, "torchtitan", what, blocks)
    nodes, per_node = _launch(plan)
    head.append("# add these to the job's TOML (its [model], optimizer and data sections stay"
                f" yours) and run it on {nodes} node(s): torchrun --nnodes {nodes} "
                f"--nproc_per_node {per_node} -m torchtitan.train --job.config_file FILE")
    # per data-parallel rank: pp splits the local batch in microbatches, without pp the
    # microbatches are gradient-accumulation steps (global / (local x dp))
    local = w.batch_size // dp if pp > 1 else par.microbatch_size
    training = {"global_batch_size": w.batch_size, "local_batch_size": local,
                "seq_len": w.seq_len, "mixed_precision_param": w.dtype}
    if dp == 1:
        shard, replicate = 1, 1
    elif par.zero == 0:
        shard, replicate = 1, dp
    else:
        shard, replicate = dp, 1
    parallelism = {"data_parallel_replicate_degree": replicate,
                   "data_parallel_shard_degree": shard}
    if shard > 1:  # ZeRO-2: parameters stay gathered from forward to backward; ZeRO-3: not
        parallelism["fsdp_reshard_after_forward"] = "always" if par.zero == 3 else "never"
    parallelism["tensor_parallel_degree"] = tp
    parallelism["pipeline_parallel_degree"] = pp
    if pp > 1:
        parallelism["pipeline_parallel_schedule"] = _TORCHTITAN_SCHEDULES[par.schedule]
        parallelism["pipeline_parallel_microbatch_size"] = par.microbatch_size
        default = 1 if par.schedule != "interleaved" else 2  # torchtitan's stages per rank
        if par.virtual_stages != default or blocks != _torchtitan_split(sum(blocks),
                                                                        len(blocks)):
            parallelism["module_fqns_per_model_part"] = [
                _stage_modules(names, tuple(s.layers)) for s in plan.stages]
    mode = plan.stages[0].recompute
    sections = {"training": training, "parallelism": parallelism,
                "activation_checkpoint": {"mode": mode}}
    body = []
    for section, keys in sections.items():
        body += ["", f"[{section}]"]
        for k, v in keys.items():
            if k == "module_fqns_per_model_part":  # one stage per line
                body += [f"{k} = ["] + [f"    {_toml(stage)}," for stage in v] + ["]"]
            else:
                body.append(f"{k} = {_toml(v)}")
    return "\n".join(head + body) + "\n"


def _megatron_split_args(plan, blocks: list[int]) -> list:
    par = plan.parallelism
    pp, v = par.pp, par.virtual_stages
    if pp == 1:
        return []
    if len(set(blocks)) == 1:
        return ["--num-virtual-stages-per-pipeline-rank", v] if v > 1 else []
    middle = blocks[1:-1]
    if v == 1 and len(set(middle)) <= 1 and blocks[0] and blocks[-1]:
        return ["--decoder-first-pipeline-num-layers", blocks[0],
                "--decoder-last-pipeline-num-layers", blocks[-1]]
    # --pipeline-model-parallel-layout: one entry per (virtual) stage in the plan's order
    # (stage i on pipeline rank i mod pp), E the embedding, t a decoder layer, L the loss
    layout = [("E" if i == 0 else "") + "t" * n + ("L" if i == len(blocks) - 1 else "")
              for i, n in enumerate(blocks)]
    return ["--pipeline-model-parallel-layout", "|".join(layout)]


def _export_megatron(plan, what: str, blocks: list[int]) -> str:
    par, w = plan.parallelism, plan.workload
    tp, pp = plan.stages[0].tp, par.pp
    head = _training_head(plan, "megatron", what, blocks)
    head.append("# Megatron takes dp = world size / (tp x pp); add your model's own "
                "arguments (--hidden-size, --num-attention-heads, data, optimizer)")
    nodes, per_node = _launch(plan)
    if nodes > 1:
        head.append(f"# run this line on each of the {nodes} nodes with torchrun's "
                    "--node-rank, --master-addr and --master-port for your cluster")
    launcher = ["--nnodes", nodes, "--nproc-per-node", per_node]
    args = ["--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
            "--num-layers", sum(blocks)]
    args += _megatron_split_args(plan, blocks)
    if par.sequence_parallel and tp > 1:
        args.append("--sequence-parallel")
    if par.dp > 1 and par.zero == 1:
        args.append("--use-distributed-optimizer")
    elif par.dp > 1 and par.zero >= 2:
        args += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy",
                 "optim_grads" if par.zero == 2 else "optim_grads_params",
                 "--ckpt-format", "fsdp_dtensor"]
    mode = plan.stages[0].recompute
    if mode == "selective":
        args += ["--recompute-granularity", "selective", "--recompute-modules", "core_attn"]
    elif mode == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", 1]
    args += ["--global-batch-size", w.batch_size, "--micro-batch-size", par.microbatch_size,
             "--seq-length", w.seq_len]
    if w.dtype in ("bfloat16", "float16"):
        args.append("--bf16" if w.dtype == "bfloat16" else "--fp16")
    line = f"torchrun {_join(launcher)} pretrain_gpt.py {_join(args)}"
    return "\n".join(head + [line]) + "\n"


def _export_deepspeed(plan, what: str, blocks: list[int]) -> str:
    par, w = plan.parallelism, plan.workload
    tp, pp = plan.stages[0].tp, par.pp
    head = _training_head(plan, "deepspeed", what, blocks)
    mode = plan.stages[0].recompute
    config = {"train_batch_size": w.batch_size,
              "train_micro_batch_size_per_gpu": par.microbatch_size,
              "gradient_accumulation_steps": par.microbatches,
              "zero_optimization": {"stage": par.zero if par.dp > 1 else 0}}
    if w.dtype == "bfloat16":
        config["bf16"] = {"enabled": True}
    elif w.dtype == "float16":
        config["fp16"] = {"enabled": True}
    if tp > 1:
        config["tensor_parallel"] = {"autotp_size": tp}
    if mode == "full":
        config["activation_checkpointing"] = {"partition_activations": False,
                                              "cpu_checkpointing": False}
    if pp > 1:
        names = tuple(layer.name for layer in plan.layers)
        ranges = [tuple(s.layers) for s in plan.stages]
        method = next(m for m, v in deepspeed_splits(names, pp).items()
                      if [tuple(r) for r in v] == ranges)
        interval = 1 if mode == "full" else 0
        head.append(f"# PipelineModule(layers=LAYERS, num_stages={pp}, partition_method="
                    f"{json.dumps(method)}, activation_checkpoint_interval={interval})")
        head.append(f"# LAYERS: one entry per plan layer ({len(names)}: the embedding, each "
                    "decoder block, the final norm with the head)"
                    + ("; BLOCK: a regex matching the decoder block's class name"
                       if "BLOCK" in method else ""))
    elif mode == "full":
        head.append("# recompute full: call each decoder block through "
                    "deepspeed.checkpointing.checkpoint (configured by activation_checkpointing)")
    nodes, per_node = _launch(plan)
    head.append("# the DeepSpeed config (deepspeed.initialize(config=...)); launch on "
                f"{nodes} node(s) of {per_node} GPUs")
    return "\n".join(head) + "\n" + json.dumps(config, indent=2) + "\n"


def _export_training(plan, target: str, what: str) -> str:
    if not _is_train(plan):
        raise training_error(target, plan.workload.phase, what)
    found = training_differences(plan, target)
    if found:
        engine = training_rules(target)

        def levels(s: frozenset) -> str:
            return "ZeRO " + "/".join(map(str, sorted(s)))

        every = frozenset(range(4))
        limits = ["one tp for every stage",
                  f"one recompute setting for every stage ({'/'.join(sorted(engine.recompute))})"]
        if engine.schedules != frozenset(SCHEDULES):
            limits.append(f"schedule {'/'.join(sorted(engine.schedules))}")
        limits += {"with_tp": ["sequence parallelism with tp"],
                   "none": ["no sequence parallelism"]}.get(engine.sequence_parallel, [])
        if engine.zero != every:
            limits.append(levels(engine.zero))
        if engine.zero_with_tp == engine.zero_with_pp != every:
            limits.append(levels(engine.zero & engine.zero_with_tp) + " with tp or pp")
        else:
            limits += [levels(engine.zero & z) + f" with {d}" for z, d in
                       ((engine.zero_with_tp, "tp"), (engine.zero_with_pp, "pp")) if z != every]
        if not engine.tp_with_pp:
            limits.append("tp or pp, not both")
        if engine.split == "deepspeed":
            limits.append("its partition methods' split")
        raise ExportError(
            f"{target} cannot run {what} as planned: " + "; ".join(found) + ". Re-plan "
            f"within what {target} can express ({', '.join(limits)}), proven optimal there: "
            f"{target_command(plan, target)}")
    names = [layer.name for layer in plan.layers]
    blocks = block_split(names, [tuple(s.layers) for s in plan.stages])
    export = {"torchtitan": _export_torchtitan, "megatron": _export_megatron,
              "deepspeed": _export_deepspeed}[target]
    return export(plan, what, blocks)

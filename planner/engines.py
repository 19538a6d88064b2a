"""Deploying a plan with the engines people run: what each can express, and the command
line that gives it the plan's parallelism (``plan export``, ``plan MODEL --target``).

The options, environment variables and config keys an export may emit are the checked
list in ``planner/engines/flags.json`` (each with the engine's source file, line and
version); the rules below (one tp for every stage, head divisibility, sequence
parallelism, the layer split) are the ones that file cites. Everything is decided from the
plan's structure: its stages, its layers (``pre``, the blocks, ``post``) and the model's
recorded arch, never from a model's name.

>>> _even_split(81, 4, "tensorrt-llm"), _even_split(81, 4, "vllm"), _even_split(81, 4, "sglang")
([21, 20, 20, 20], [20, 20, 21, 20], [20, 20, 20, 21])
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from planner.solver import Restriction

__all__ = ["TARGETS", "INFERENCE_TARGETS", "TRAINING_TARGETS", "ExportError", "EngineRules",
           "checked_flags", "rules", "differences", "export_plan", "target_command",
           "training_error", "block_split"]

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


def training_error(target: str, phase: str, what: str) -> ExportError:
    """The error for a training target: the planner makes no training plans yet."""
    return ExportError(
        f"{target} trains models, and {what} is a {phase} plan (inference): export it with "
        f"--to {', '.join(INFERENCE_TARGETS[:-1])} or {INFERENCE_TARGETS[-1]}. The planner "
        "makes no training plans yet: every plan's workload.phase is prefill or decode, and a "
        "training plan (phase train: the backward pass, the optimizer's state and its "
        "sharding, the pipeline schedule, recomputation) is not planned yet, so there is "
        f"nothing to export to {', '.join(TRAINING_TARGETS)}")


def rules(target: str) -> EngineRules:
    """The rules of an inference target.

    Raises:
        ExportError: a training target (no training plans yet) or an unknown name.
    """
    if target in TRAINING_TARGETS:
        raise training_error(target, "prefill or decode", "every plan")
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

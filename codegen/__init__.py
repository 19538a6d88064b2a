"""codegen: turn (TracedModel, Plan) into per-rank modules that run under torchrun.

- ``stage_split``: one fx GraphModule per pipeline stage, carrying every cut tensor.
- ``tensor_parallel``: shard weights, propagate placements, insert all-reduces.
- ``runtime``: ``parallelize(model, plan, args)`` inside a rank; pipelining and dp.
- ``train``: a train plan's ``LocalModule.step`` (loss, backward, schedules, ZeRO, recompute).
- ``emit``: ``compile_plan(traced, plan, out_dir)`` writes readable per-stage source.
- ``check``: ``run_check(plan.json, model)`` launches torchrun and compares with eager.
"""

from codegen.check import run_check
from codegen.emit import compile_plan
from codegen.layout import LayoutError, ParallelLayout, StageLayout
from codegen.runtime import FingerprintMismatch, LocalModule, parallelize
from codegen.stage_split import StageGraph, StageSplitError, split_stages
from codegen.tensor_parallel import ShardingError, count_collectives, shard_stage

__all__ = [
    "split_stages",
    "StageGraph",
    "StageSplitError",
    "shard_stage",
    "count_collectives",
    "ShardingError",
    "parallelize",
    "LocalModule",
    "FingerprintMismatch",
    "ParallelLayout",
    "StageLayout",
    "LayoutError",
    "compile_plan",
    "run_check",
]

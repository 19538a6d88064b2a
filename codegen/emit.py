"""Emit readable per-stage Python source for a plan (``plan compile plan.json --out build/``).

For every stage, the tp-rank-0 module is generated (the code is the same on every rank of a
stage; only the weight slices differ) and written as ``stage<i>.py``: the GraphModule's
``print_readable`` source with the all-reduces as ``_c10d_functional.all_reduce`` /
``wait_tensor`` lines (reduce-scatter / all-gather under sequence parallelism), preceded by a header naming the stage's layers, devices, the tensors
it receives from / sends to which stage (the pipeline's send/recv), and each sharded weight
with its global and local shape. ``README.txt`` lists the files.
"""

from __future__ import annotations

from pathlib import Path

from codegen.layout import ParallelLayout
from codegen.stage_split import split_stages
from codegen.tensor_parallel import count_collectives, shard_stage

__all__ = ["compile_plan", "stage_source"]


def compile_plan(traced, plan, out_dir: str | Path) -> list[Path]:
    """Write one readable source file per stage of ``plan`` into ``out_dir``.

    Args:
        traced: the ``planner.TracedModel`` the plan was made for (at the microbatch size to
            get runnable literal shapes; any batch size gives the same structure).
        plan: a ``planner.plan.Plan`` or ``codegen.layout.ParallelLayout``.
        out_dir: created if missing.

    Returns:
        The paths written, stage files first.
    """
    layout = plan if isinstance(plan, ParallelLayout) else ParallelLayout.from_plan(plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = split_stages(traced, layout.stage_layers)
    paths, index = [], []
    for stage, stage_layout in zip(stages, layout.stages, strict=True):
        group = f"tp_stage{stage.index}"
        report = shard_stage(stage, traced, stage_layout.tp, 0, group,
                             sharding=stage_layout.sharding,
                             sequence_parallel=layout.sequence_parallel)
        path = out / f"stage{stage.index}.py"
        source = stage_source(stage, stage_layout, report, len(stages), traced)
        if not layout.uniform_tp:  # the project's own boundary transfer, not PipelineStage
            source = _boundary_note(layout, stage.index) + source
        path.write_text(source)
        paths.append(path)
        counts = count_collectives(stage.module)
        index.append(f"{path.name}: layers {list(stage.layers)}, tp {stage_layout.tp}, "
                     f"devices {[list(g) for g in stage_layout.devices]}, collectives {counts}")
    readme = out / "README.txt"
    readme.write_text(f"{traced.name}: dp {layout.dp}, pp {layout.pp}, microbatches "
                      f"{layout.microbatches}\n" + "\n".join(index) + "\n")
    return paths + [readme]


def _boundary_note(layout: ParallelLayout, index: int) -> str:
    """Which rank sends to / receives from which, for stages whose tp differ."""
    lines = []
    for group in layout.stages[index].devices:
        for rank in group:
            src, dst = layout.boundary_peers(rank)
            lines.append(f"# rank {rank}: recv from {src if src is not None else '-'}, "
                         f"send to {list(dst) or '-'}")
    return "\n".join(lines) + "\n"


def stage_source(stage, stage_layout, report, num_stages: int, traced) -> str:
    """The source of one stage with a header of its pipeline and tensor-parallel facts."""
    layers = traced.layers
    first, last = stage.layers
    cut_in = {t.name: t for t in traced.cuts[first - 1].tensors} if first > 0 else {}
    cut_out = {t.name: t for t in traced.cuts[last].tensors} if stage.index < num_stages - 1 else {}
    lines = [f"# Stage {stage.index} of {num_stages}: layers {first}..{last} "
             f"({layers[first].name} .. {layers[last].name})",
             f"# tp {stage_layout.tp}, devices per replica {[list(g) for g in stage_layout.devices]}"]
    if stage.index == 0:
        lines.append(f"# inputs: model inputs {list(stage.inputs)}")
    else:
        lines.append(f"# recv from stage {stage.index - 1}:")
        lines += [f"#   {n}: {list(cut_in[n].shape)} {cut_in[n].dtype} ({cut_in[n].role})"
                  for n in stage.inputs]
    if cut_out:
        lines.append(f"# send to stage {stage.index + 1}:")
        lines += [f"#   {n}: {list(cut_out[n].shape)} {cut_out[n].dtype} ({cut_out[n].role})"
                  for n in stage.outputs]
    else:
        lines.append(f"# returns the model outputs {list(stage.outputs)}")
    if report.sharded:
        lines.append(f"# sharded weights (rank 0 of {stage_layout.tp}): placement, global -> "
                     "local shape")
        lines += [f"#   {name}: {report.analysis.params[name]} {list(g)} -> {list(loc)}"
                  for name, (g, loc) in report.sharded.items()]
    lines.append(f"# collectives: {count_collectives(stage.module) or 'none'}")
    if report.analysis is not None:
        lines += [f"#   {c.kind} of {c.bytes} bytes after {c.after or c.value} ({c.reason})"
                  for c in report.analysis.collectives]
    body = stage.module.print_readable(print_output=False, include_stride=False,
                                       include_device=False)
    return "\n".join(lines) + "\n\n" + body

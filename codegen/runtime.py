"""Runtime: turn (model, plan) into this rank's module and run it under torchrun.

Inside a rank (``torch.distributed`` initialised, e.g. by ``torchrun``)::

    local = parallelize(model, plan, args=(ids,))   # this rank's stage, sharded
    with torch.no_grad():
        out = local(ids)        # last stage: this replica's outputs; other stages: None

Data-parallel replicas split the batch; each replica's pipeline runs its share in
``plan.parallelism.microbatches`` microbatches with ``torch.distributed.pipelining``
(``PipelineStage`` + ``ScheduleGPipe``) over the project's own stage modules when every
stage has the same tp; when stage tp degrees differ, with the project's own GPipe forward
and stage-boundary ``isend``/``irecv`` (rank ``j`` of the next stage receives from rank
``j % tp`` of this one, see ``ParallelLayout.boundary_peers``). Stage modules are traced at
the microbatch size (export bakes sizes into ``view`` shapes). Every process group gets
``timeout`` and every own send/recv waits at most ``timeout``, so a dead rank ends the job
with an error.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils import _pytree as pytree

from codegen.layout import ParallelLayout, RankCoords
from codegen.stage_split import StageGraph, model_tensor_inputs, split_stages
from codegen.tensor_parallel import TPReport, check_against, shard_stage

__all__ = ["FingerprintMismatch", "LocalModule", "ProcessGroups", "parallelize",
           "build_process_groups", "batch_slice"]

DEFAULT_TIMEOUT = datetime.timedelta(seconds=60)


class FingerprintMismatch(ValueError):
    """The plan was made for a different model or input shapes than the one given."""


@dataclass
class ProcessGroups:
    """This rank's groups: ``tp`` (its stage replica's tp ranks) and ``pp`` (the ranks with
    the same replica and tp index across stages, in stage order)."""

    tp: dist.ProcessGroup | None
    pp: dist.ProcessGroup | None


def build_process_groups(layout: ParallelLayout, rank: int,
                         timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> ProcessGroups:
    """Create every tp and pp group (all ranks must call this, in the same order).

    Returns:
        The groups this rank belongs to.
    """
    me = layout.coords(rank)
    tp_group = pp_group = None
    for i, stage in enumerate(layout.physical_stages):
        for r, ranks in enumerate(stage.devices):
            group = dist.new_group(list(ranks), timeout=timeout)
            if (i, r) == (me.stage, me.replica):
                tp_group = group
    if layout.pp > 1 and layout.uniform_tp:  # mixed tp uses point-to-point on the world group
        for r in range(layout.dp):
            for k in range(layout.stages[0].tp):
                ranks = [s.devices[r][k] for s in layout.physical_stages]
                group = dist.new_group(ranks, timeout=timeout)
                if (r, k) == (me.replica, me.tp_rank):
                    pp_group = group
    return ProcessGroups(tp_group, pp_group)


def batch_slice(args: tuple, kwargs: dict, start: int, stop: int) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with every tensor sliced to rows ``start:stop`` of dim 0."""
    def cut(x):
        return x[start:stop] if isinstance(x, torch.Tensor) and x.dim() > 0 else x
    return pytree.tree_map(cut, (tuple(args), dict(kwargs)))


class LocalModule(nn.Module):
    """This rank's part of the parallel model: one stage, sharded over its tp group.

    Call it on the *global* batch (the same inputs on every rank, as the eager model takes
    them). It runs this replica's rows through the pipeline and returns, on a last-stage
    rank, the flat model outputs for those rows (``pytree.tree_leaves`` order), elsewhere
    ``None``. ``rows`` says which rows of the global batch the result covers.

    Attributes:
        stage: the ``StageGraph`` (``stage.module`` is the sharded GraphModule).
        layout: the parallel layout.
        coords: this rank's stage, replica and tp rank.
        tp_report: what the tensor-parallel pass did.
    """

    def __init__(self, stage: StageGraph, layout: ParallelLayout, coords: RankCoords,
                 groups: ProcessGroups, tp_report: TPReport, device: torch.device,
                 timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> None:
        super().__init__()
        self.stage, self.layout, self.coords = stage, layout, coords
        self.module = stage.module
        self.groups, self.tp_report, self.device = groups, tp_report, device
        self.timeout = timeout
        self._schedule = None
        self.generator = None  # codegen.generate.Generator, for a decode plan
        self.trainer = None  # codegen.train.Trainer, for a train plan

    def step(self, *args, **kwargs) -> torch.Tensor:
        """One AdamW step of a train plan on the *global* batch (the model's inputs, the
        same on every rank): forward and backward over this rank's stages in the plan's
        schedule, data-parallel gradient reduction at the plan's ZeRO level, the update.

        Returns:
            The global batch's mean next-token cross-entropy (``codegen.train.
            next_token_loss``) before the update, the same float32 scalar on every rank.
        """
        if self.trainer is None:
            raise ValueError("step() needs a train plan (`plan MODEL --phase train`); this "
                             "plan is for inference: call the module instead")
        return self.trainer.step(model_tensor_inputs(args, kwargs))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy generation with a decode plan, on every rank at once: prefill, then up to
        ``max_new_tokens`` steps with each stage's (sharded) KV cache. Returns this rank's
        replica's rows of new tokens (``self.generator.rows``; every rank of the replica
        gets them). See ``codegen.generate.Generator``."""
        if self.generator is None:
            raise ValueError("generate() needs a decode plan (`plan MODEL --phase decode`); "
                             "this plan is for one forward pass: call the module instead")
        return self.generator.generate(input_ids, max_new_tokens, attention_mask,
                                       eos_token_id, pad_token_id)

    @property
    def is_first(self) -> bool:
        return self.coords.stage == 0

    @property
    def is_last(self) -> bool:
        return self.coords.stage == self.layout.pp - 1

    def rows(self, batch_size: int) -> tuple[int, int]:
        """The rows ``[start, stop)`` of a global batch that this rank's replica runs."""
        per_replica = batch_size // self.layout.dp
        return self.coords.replica * per_replica, (self.coords.replica + 1) * per_replica

    def forward(self, *args, **kwargs):
        flat = model_tensor_inputs(args, kwargs)
        start, stop = self.rows(flat[0].shape[0])
        inputs = [t[start:stop].to(self.device) for t in flat]
        if self.layout.pp == 1:
            return self._run_local(inputs)
        return self._run_pipeline(inputs)

    def _run_local(self, inputs) -> tuple:
        chunks = zip(*(t.tensor_split(self.layout.microbatches) for t in inputs), strict=True)
        outs = [self.module(*chunk) for chunk in chunks]
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    def _run_pipeline(self, inputs):
        if not self.layout.uniform_tp:
            return self._run_boundary_pipeline(inputs)
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        if self._schedule is None:
            pipe_stage = PipelineStage(self.module, self.coords.stage, self.layout.pp,
                                       self.device, group=self.groups.pp)
            self._schedule = ScheduleGPipe(pipe_stage, n_microbatches=self.layout.microbatches)
        out = self._schedule.eval(*inputs) if self.is_first else self._schedule.eval()
        if not self.is_last:
            return None
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


    def _run_boundary_pipeline(self, inputs):
        """GPipe forward with the project's own stage-boundary send/recv (stages whose tp
        differ, which ``PipelineStage``'s one-peer-per-stage pairing cannot express).

        Stage outputs are replicated over the stage's tp group, so rank ``j`` of the next
        stage receives them from rank ``j % tp`` of this stage (``boundary_peers``); every
        rank of a stage computes every microbatch (its all-reduces need the whole group).
        Each send and receive waits at most ``self.timeout``.
        """
        rank = dist.get_rank()
        recv_from, send_to = self.layout.boundary_peers(rank)
        micro = self.layout.microbatches
        if self.is_first:
            chunks = list(zip(*(t.tensor_split(micro) for t in inputs), strict=True))
        specs = node_specs(n for n in self.module.graph.nodes if n.op == "placeholder")
        sends, outs = [], []
        for m in range(micro):
            if self.is_first:
                args = chunks[m]
            else:
                args = [torch.empty(shape, dtype=dtype, device=self.device)
                        for shape, dtype in specs]
                works = [dist.irecv(t, src=recv_from, tag=m * len(args) + i)
                         for i, t in enumerate(args)]
                for w in works:
                    _wait(w, self.timeout, f"rank {rank} (stage {self.coords.stage}) waiting "
                          f"for microbatch {m} from rank {recv_from}")
            out = self.module(*args)
            if self.is_last:
                outs.append(out)
                continue
            for dst in send_to:
                for i, t in enumerate(out):
                    t = t.contiguous()
                    sends.append((dist.isend(t, dst=dst, tag=m * len(out) + i), t, dst, m))
        for w, _, dst, m in sends:
            _wait(w, self.timeout, f"rank {rank} (stage {self.coords.stage}) sending "
                  f"microbatch {m} to rank {dst}")
        if not self.is_last:
            return None
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def node_specs(nodes) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``(shape, dtype)`` of each graph node's traced value: the buffers a stage-boundary
    receive allocates."""
    return [(tuple(int(d) for d in n.meta["val"].shape), n.meta["val"].dtype) for n in nodes]


def _bytes_ratio(plan, traced) -> float | None:
    """Bytes of a collective here over the plan's: the dtype ratio when this run has the
    plan's step shape (microbatch and sequence, prefill), else ``None`` (compare kinds)."""
    w = plan.workload
    if w.phase != "prefill" or traced.batch_size != plan.parallelism.microbatch_size \
            or traced.seq_len != w.seq_len:
        return None
    from planner.cluster import DTYPES

    return DTYPES[traced.dtype].itemsize / DTYPES[w.dtype].itemsize


def _wait(work, timeout: datetime.timedelta, what: str) -> None:
    try:
        work.wait(timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"{what}: {exc} (timeout {timeout.total_seconds():.0f} s)") from exc


def parallelize(model: nn.Module, plan, args: tuple = (), kwargs: dict | None = None, *,
                check_fingerprint: bool = True, device: torch.device | str | None = None,
                timeout: datetime.timedelta = DEFAULT_TIMEOUT, train=None) -> LocalModule:
    """This rank's module for ``plan``: its pipeline stage, tensor-parallel sharded.

    Args:
        model: the full model, the same weights on every rank (e.g. same seed or checkpoint).
        plan: a ``planner.plan.Plan`` (or a ``codegen.layout.ParallelLayout``).
        args, kwargs: example inputs of the global batch (``workload.batch_size`` rows).
        check_fingerprint: refuse a plan whose ``model.fingerprint`` differs from this
            model traced on these inputs.
        device: where the stage runs (default: ``cuda:<local rank>`` under nccl, else cpu).
        timeout: for every process group this creates.
        train: a train plan's optimizer settings (``codegen.train.TrainConfig``; default
            AdamW with lr 1e-3). The stages get their own copies of the weights.

    Returns:
        A ``LocalModule``; call it on the global batch under ``torch.no_grad()``, or, for
        a train plan, ``local.step(*args, **kwargs)`` for one optimizer step.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        codegen.layout.LayoutError: the plan does not fit the world size.
        FingerprintMismatch: the plan was made for another model or input shapes.
    """
    import planner

    if not dist.is_initialized():
        raise RuntimeError("parallelize() runs inside a torchrun rank: call "
                           "torch.distributed.init_process_group() first")
    kwargs = dict(kwargs or {})
    is_layout = isinstance(plan, ParallelLayout)
    layout = plan if is_layout else ParallelLayout.from_plan(plan)
    rank = dist.get_rank()
    layout.validate(dist.get_world_size())
    batch = model_tensor_inputs(args, kwargs)[0].shape[0]
    if batch % (layout.dp * layout.microbatches):
        raise ValueError(f"batch {batch} is not divisible by dp {layout.dp} × microbatches "
                         f"{layout.microbatches}")
    micro = batch // (layout.dp * layout.microbatches)
    if check_fingerprint and not is_layout:
        full = planner.trace(model, args, kwargs)
        if full.fingerprint != plan.model.fingerprint:
            raise FingerprintMismatch(
                f"plan {plan.model.name!r} has fingerprint {plan.model.fingerprint} but this model "
                f"on these inputs traces to {full.fingerprint}; re-plan for this model and shape")
    mb_args, mb_kwargs = batch_slice(args, kwargs, 0, micro)
    traced = planner.trace(model, mb_args, mb_kwargs)
    coords = layout.coords(rank)
    groups = build_process_groups(layout, rank, timeout)
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
    if not is_layout and plan.workload.phase == "train":
        from codegen.train import TrainConfig, Trainer

        trainer = Trainer(traced, layout, plan, rank, groups, torch.device(device), timeout,
                          train or TrainConfig())
        for s in trainer.stages:
            if s.report.tp > 1 and layout.stages[s.index].sharding is not None:
                check_against(s.report, layout.stages[s.index].sharding, None)
        first = trainer.stages[0]
        local = LocalModule(first.graph, layout, coords, groups, first.report,
                            torch.device(device), timeout)
        local.trainer = trainer
        return local
    stage = split_stages(traced, layout.stage_layers)[coords.stage]
    stage_layout = layout.stages[coords.stage]
    group_name = groups.tp.group_name if stage_layout.tp > 1 else ""
    if stage_layout.tp > 1 and stage_layout.sharding is None and not is_layout:
        raise ValueError(f"stage {coords.stage} of this plan has tp {stage_layout.tp} but records "
                         "no tensor-parallel strategy (a plan built from a cost table without "
                         "a traced model); re-plan the model with `plan MODEL --out`")
    report = shard_stage(stage, traced, stage_layout.tp, coords.tp_rank, group_name,
                         sharding=stage_layout.sharding,
                         sequence_parallel=layout.sequence_parallel)
    if stage_layout.sharding is not None and not is_layout:
        check_against(report, stage_layout.sharding, _bytes_ratio(plan, traced))
    stage.module.to(device)
    local = LocalModule(stage, layout, coords, groups, report, torch.device(device), timeout)
    if not is_layout and plan.workload.phase == "decode":
        from codegen.generate import Generator

        local.generator = Generator(model, plan, tp_group=groups.tp,
                                    timeout_s=timeout.total_seconds())
    return local

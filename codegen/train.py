"""Training runtime: one AdamW step of a train plan on this rank (``LocalModule.step``).

``parallelize(model, plan, args)`` on a plan whose ``workload.phase`` is ``"train"``
builds a ``Trainer`` for this rank's stages (several with virtual stages):

- **loss**: ``next_token_loss``, the mean next-token cross-entropy over the *global*
  batch's tokens (labels are the token ids shifted by one). Each microbatch contributes
  its cross-entropy sum over the replica's token count, so the microbatches of a replica
  add up to the replica's mean and the data-parallel average of the replicas is the
  single-process loss exactly.
- **tensor parallelism, backward**: the stage graph's collectives (functional
  collectives, which have no autograd) become autograd functions whose backward is the
  collective's adjoint: an all-reduce's is an all-reduce, an all-gather's a
  reduce-scatter and a reduce-scatter's an all-gather. Every tp rank computes the
  (replicated) loss and scales it by ``1/tp``, so the tp ranks' losses add up to the
  loss; autograd then gives each rank the gradient of that sum. A sharded parameter's
  gradient is then its shard's whole gradient; a replicated parameter (a norm weight, a
  bias, an unsplit block of a fused projection) gets a part on each rank, so it passes
  through ``tp_grad_sum`` (identity forward, all-reduce backward over the tp group:
  Megatron's *f* on the parameter). Per layer without sequence parallelism that is one
  backward all-reduce per forward all-reduce, as many as Megatron's conjugate pairs.
- **pipeline**: ``torch.distributed.pipelining``'s ``PipelineStage`` over the project's
  stage modules with ``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``
  (virtual stages: this rank holds stages ``i ≡ its stage (mod pp)``), the loss on the
  last stage, ``scale_grads=False`` (the loss is already scaled); pp 1 runs the
  microbatches in a loop. Stages whose tp degrees differ run the Trainer's own GPipe or
  1F1B (torch's order of forwards and backwards) with its own stage-boundary
  ``isend``/``irecv``: rank ``j`` of a stage receives its inputs from rank
  ``j % tp_prev`` and sends their gradient back there; a sender sums what its receivers
  send. A weight two stages share (GPT-2's tied embedding and head)
  is held by each; their gradients are summed over the ranks holding it before the
  optimizer step (Megatron's embedding group), so the copies stay equal.
- **data parallelism** (``parallelism.zero``): 0 ``DistributedDataParallel`` (in a
  pipeline: one flat all-reduce of the gradients after the schedule, as DDP's reducer
  fails under the pipelining schedules); 1 the same + ``ZeroRedundancyOptimizer``
  (optimizer states sharded); 2 ``fully_shard`` with
  ``reshard_after_forward=False`` (gradients and states sharded; parameters gathered once
  per step); 3 ``fully_shard`` (parameters resharded after forward, gathered again for
  backward). Each shards over this stage's dp group (same stage, same tp rank).
- **recompute** (``stages[i].recompute``): ``full`` outlines each transformer block
  (``Layer.kind == "block"``) into a submodule run under ``torch.utils.checkpoint``;
  ``selective`` outlines only the attention core, found from the graph: an
  ``aten.scaled_dot_product_attention`` node, or the nodes between a softmax's nearest
  matmul ancestor and descendant.

The loss every rank returns is the global batch's: the last stage's replica losses
all-reduced over the world.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["TrainConfig", "Trainer", "untrainable", "next_token_loss", "token_ids", "logits_index",
           "make_differentiable", "recompute", "attention_cores", "reference_train"]

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


@dataclass(frozen=True)
class TrainConfig:
    """AdamW's settings (fp32). The defaults are torch's, with ``lr`` 1e-3, and torch's
    fused kernel (``fused=True``, CPU and CUDA): one pass over parameters, gradients and
    both moments per step, the update ``cost_models.training.optimizer_s`` prices (torch's
    default per-tensor loop makes about six passes: 6.39 ms against 1.98 ms fused for a
    1.0 M-parameter model on this CPU, docs/training.md)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    fused: bool = True

    def adamw(self) -> dict:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "fused": self.fused}


# --------------------------------------------------------------------------- the loss


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                    total_tokens: int) -> torch.Tensor:
    """Cross-entropy of predicting ``input_ids[:, t + 1]`` from ``logits[:, t]``, summed
    over these rows and divided by ``total_tokens``.

    With ``total_tokens`` the token count of the whole batch (``B × (T − 1)``) this is
    the mean loss; over a part of the batch it is that part's share, so the parts add up
    to the mean. The single-process reference and every rank use this one function.
    """
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B·(T-1), V)
    target = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(pred, target, reduction="sum") / total_tokens


def token_ids(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The token ids among the model's tensor inputs: the first integer tensor of two
    dims ``(B, T)``."""
    for t in inputs:
        if t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool:
            return t
    raise ValueError("a training step needs token ids: an integer (batch, sequence) tensor "
                     f"among the model's inputs (got {[tuple(t.shape) for t in inputs]})")


def logits_index(module: fx.GraphModule, batch: int, seq: int) -> int:
    """Which of a last stage's outputs are the logits: the first floating
    ``(batch, seq, vocab)`` tensor."""
    out = next(n for n in module.graph.nodes if n.op == "output")
    for i, node in enumerate(out.args[0]):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() == 3 \
                and tuple(val.shape[:2]) == (batch, seq):
            return i
    raise ValueError(f"the model's outputs have no floating (batch {batch}, sequence {seq}, "
                     "vocab) tensor to take a next-token loss of; train plans are for "
                     "causal language models")


# --------------------------------------------------------------------------- collectives


def _wait(t: torch.Tensor) -> torch.Tensor:
    return _c10d.wait_tensor(t)


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _wait(_c10d.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, g):
        return _wait(_c10d.all_reduce(g.contiguous(), "sum", ctx.group)), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, group):
        ctx.tp, ctx.group = tp, group
        return _wait(_c10d.all_gather_into_tensor(x.contiguous(), tp, group))

    @staticmethod
    def backward(ctx, g):
        return _wait(_c10d.reduce_scatter_tensor(g.contiguous(), "sum", ctx.tp, ctx.group)), \
            None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp, group):
        ctx.tp, ctx.group = tp, group
        return _wait(_c10d.reduce_scatter_tensor(x.contiguous(), "sum", tp, group))

    @staticmethod
    def backward(ctx, g):
        return _wait(_c10d.all_gather_into_tensor(g.contiguous(), ctx.tp, ctx.group)), \
            None, None


class _GradSum(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over ``group`` (all of it, or
    the slices ``ranges`` of dim ``dim``: the unsplit blocks of a sharded parameter)."""

    @staticmethod
    def forward(ctx, x, group, dim, ranges):
        ctx.group, ctx.dim, ctx.ranges = group, dim, ranges
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if ctx.ranges is None:
            return _wait(_c10d.all_reduce(g, "sum", ctx.group)), None, None, None
        g = g.clone()
        for start, length in ctx.ranges:
            part = g.narrow(ctx.dim, start, length)
            part.copy_(_wait(_c10d.all_reduce(part.contiguous(), "sum", ctx.group)))
        return g, None, None, None


def tp_all_reduce(x, op, group):
    """Sum over the tp group; backward: the same sum (the all-reduce's adjoint)."""
    assert op == "sum", op
    return _AllReduce.apply(x, group)


def tp_all_gather(x, tp, group):
    """Concatenate the group's pieces along dim 0; backward: reduce-scatter."""
    return _AllGather.apply(x, tp, group)


def tp_reduce_scatter(x, op, tp, group):
    """Sum over the group and keep this rank's dim-0 piece; backward: all-gather."""
    assert op == "sum", op
    return _ReduceScatter.apply(x, tp, group)


def tp_grad_sum(x, group, dim=0, ranges=None):
    """A replicated parameter (or the unsplit ``ranges`` of a sharded one): identity
    forward, its gradient summed over the tp group backward."""
    return _GradSum.apply(x, group, dim, ranges)


_AUTOGRAD = {_c10d.all_reduce.default: tp_all_reduce,
             _c10d.all_gather_into_tensor.default: tp_all_gather,
             _c10d.reduce_scatter_tensor.default: tp_reduce_scatter}


def make_differentiable(module: fx.GraphModule, params: dict, tp: int, group: str) -> dict:
    """Make a tensor-parallel stage graph differentiable, in place.

    Every functional collective becomes its autograd twin (``tp_all_reduce``...) and its
    ``wait_tensor`` is dropped (the twin waits); every read of a parameter that is not
    wholly sharded (``params``: target -> placement, the analysis's) goes through
    ``tp_grad_sum``.

    Returns:
        ``{"all_reduce": n, ...}`` forward collectives made differentiable, and
        ``"grad_sum"``: the parameters whose gradient is summed over the group.
    """
    from planner.sharding import Shard

    counts: dict = {}
    names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    for node in list(module.graph.nodes):
        if node.op == "call_function" and node.target is _c10d.wait_tensor.default:
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
        elif node.op == "call_function" and node.target in _AUTOGRAD:
            counts[node.target._opname] = counts.get(node.target._opname, 0) + 1
            node.target = _AUTOGRAD[node.target]
    summed = []
    if tp > 1:
        for node in list(module.graph.nodes):
            if node.op != "get_attr" or node.target not in names:
                continue
            p = params.get(node.target)
            ranges = None
            if isinstance(p, Shard):
                if p.plain:
                    continue
                ranges, offset = [], 0
                for size, split in p.blocks:
                    if not split:
                        ranges.append((offset, size))
                    offset += size // tp if split else size
                if not ranges:
                    continue
            with module.graph.inserting_after(node):
                f = module.graph.call_function(
                    tp_grad_sum, (node, group, p.dim if ranges else 0,
                                  tuple(ranges) if ranges else None))
            f.meta = dict(node.meta)
            node.replace_all_uses_with(f, delete_user_cb=lambda u, f=f: u is not f)
            summed.append(node.target)
    module.graph.lint()
    module.recompile()
    counts["grad_sum"] = summed
    return counts


# --------------------------------------------------------------------------- recompute


class Recomputed(nn.Module):
    """Runs ``inner`` under ``torch.utils.checkpoint``: its activations are not kept but
    recomputed in backward."""

    def __init__(self, inner: fx.GraphModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


_MATMULS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_SDPA = aten.scaled_dot_product_attention.default


def _computes(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def attention_cores(module: fx.GraphModule) -> list[list[fx.Node]]:
    """The attention cores of a graph, each a list of nodes in graph order: an SDPA node
    alone, or (unfused attention) the nodes that descend from the matmul feeding a
    softmax and lead to the matmul the softmax feeds (``q @ kᵀ``, scale, mask, softmax,
    ``@ v``)."""
    order = {n: i for i, n in enumerate(module.graph.nodes)}
    cores = []
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _SDPA:
            cores.append([node])
        elif node.target in _SOFTMAX:
            qk = _nearest(node, lambda n: n.all_input_nodes)
            av = _nearest(node, lambda n: list(n.users))
            if qk is None or av is None:
                continue
            down = _reach(qk, lambda n: list(n.users), stop=av)
            up = _reach(av, lambda n: n.all_input_nodes, stop=qk)
            cores.append(sorted(down & up, key=order.__getitem__))
    return cores


def _nearest(node, step):
    seen, frontier = set(), [node]
    while frontier:
        nxt = []
        for n in frontier:
            for m in step(n):
                if m in seen:
                    continue
                seen.add(m)
                if m.op == "call_function" and m.target in _MATMULS:
                    return m
                if _computes(m):
                    nxt.append(m)
        frontier = nxt
    return None


def _reach(start, step, stop):
    seen, frontier = {start}, [start]
    while frontier:
        n = frontier.pop()
        if n is stop:
            continue
        for m in step(n):
            if m not in seen and _computes(m):
                seen.add(m)
                frontier.append(m)
    return seen


def _outline(gm: fx.GraphModule, region: list[fx.Node], name: str) -> None:
    """Replace ``region`` (nodes in graph order) by one ``call_module`` of a ``Recomputed``
    submodule taking the values it reads and returning those used after it."""
    inside = set(region)
    inputs: list[fx.Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in region:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    gm.add_submodule(name, Recomputed(fx.GraphModule(gm, sub, class_name="RecomputedRegion")))
    # nodes between the region's first and last that depend on it move after it
    last = region[-1]
    tainted, late = set(inside), []
    node = region[0]
    while node is not last:
        if node not in inside and any(a in tainted for a in node.all_input_nodes):
            tainted.add(node)
            late.append(node)
        node = node.next
    for n in reversed(late):
        last.append(n)
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(name, tuple(inputs))
    prev = call
    for i, o in enumerate(outputs):
        with gm.graph.inserting_after(prev):
            prev = gm.graph.call_function(_getitem, (call, i))
        prev.meta = dict(o.meta)
        o.replace_all_uses_with(prev, delete_user_cb=lambda u: u not in inside)
    for n in reversed(region):
        gm.graph.erase_node(n)


def _getitem(x, i):
    return x[i]


def recompute(gm: fx.GraphModule, mode: str, layer_of: dict[str, int],
              blocks: set[int]) -> list[list[str]]:
    """Outline what ``mode`` recomputes into checkpointed submodules, in place.

    Args:
        gm: a stage graph (sharded and differentiable).
        mode: ``"none"``, ``"selective"`` (attention cores) or ``"full"`` (each block).
        layer_of: node name -> layer index (nodes added since tracing take the layer of
            their first input that has one).
        blocks: the indices of transformer blocks (``Layer.kind == "block"``).

    Returns:
        Each recomputed region's node names (as they were before outlining).
    """
    if mode == "none":
        return []
    if mode == "selective":
        regions = attention_cores(gm)
    elif mode == "full":
        layer: dict[fx.Node, int | None] = {}
        for n in gm.graph.nodes:
            layer[n] = layer_of.get(n.name)
            if layer[n] is None:
                layer[n] = next((layer[a] for a in n.all_input_nodes
                                 if layer.get(a) is not None), None)
        by_block: dict[int, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if _computes(n) and layer[n] in blocks:
                by_block.setdefault(layer[n], []).append(n)
        regions = [by_block[j] for j in sorted(by_block)]
    else:
        raise ValueError(f"recompute is 'none', 'selective' or 'full', not {mode!r}")
    names = []
    for k, region in enumerate(regions):
        names.append([n.name for n in region])
        _outline(gm, region, f"recompute_{k}")
    gm.graph.lint()
    gm.recompile()
    return names


# --------------------------------------------------------------------------- the step


def untrainable(layout, schedule: str | None) -> str | None:
    """Why this runtime cannot train ``layout`` with ``schedule`` (``None`` when it can):
    what to change, in one sentence."""
    pp, m = len(layout.physical_stages), layout.microbatches
    if pp == 1 and len(layout.stages) > 1:
        return (f"its {len(layout.stages)} virtual stages share one device group (pp 1); "
                "interleaved 1F1B needs pp >= 2: re-plan with --pp 2 or more, or "
                "--virtual-stages 1")
    if pp > 1 and not layout.uniform_tp and schedule == "interleaved":
        return (f"its stages have different tp degrees ({[s.tp for s in layout.stages]}) and "
                "interleaved 1F1B runs only pipelines whose stages share one tp: re-plan with "
                "--schedule 1f1b or gpipe (they run mixed tp), or with --tp N")
    if pp > 1 and schedule == "1f1b" and m < pp:
        return (f"1F1B needs at least as many microbatches as stages (microbatches {m}, "
                f"pp {pp}); re-plan with more microbatches or --schedule gpipe")
    if pp > 1 and schedule == "interleaved":
        rounds = max(1, m // pp)
        if m % rounds:
            return (f"interleaved 1F1B runs microbatches in rounds of pp {pp}; microbatches "
                    f"{m} is not a multiple of its {rounds} rounds: re-plan with a multiple "
                    f"of {pp} microbatches")
    return None


@dataclass
class LocalStage:
    """One stage this rank trains: its graph, tp report and what the passes did."""

    index: int
    graph: object  # codegen.stage_split.StageGraph
    report: object  # codegen.tensor_parallel.TPReport
    module: nn.Module  # what runs: the graph module, wrapped by DDP or fully_shard
    differentiable: dict = field(default_factory=dict)
    recomputed: list = field(default_factory=list)


class Trainer:
    """This rank's training step (built by ``parallelize`` for a train plan)."""

    def __init__(self, traced, layout, plan, rank: int, groups, device: torch.device,
                 timeout: datetime.timedelta, config: TrainConfig) -> None:
        from codegen.stage_split import split_stages
        from codegen.tensor_parallel import shard_stage

        self.layout, self.plan, self.rank, self.device = layout, plan, rank, device
        self.timeout, self.config = timeout, config
        par = plan.parallelism
        self.zero, self.schedule_name = par.zero, par.schedule or "gpipe"
        why = untrainable(layout, self.schedule_name)
        if why is not None:
            raise ValueError(f"this train plan cannot run: {why}")
        self.pp = len(layout.physical_stages)
        me = layout.coords(rank)
        self.coords, self.groups = me, groups
        self.tp = layout.stages[me.stage].tp
        self.micro = traced.batch_size
        self.seq = traced.seq_len
        all_stages = split_stages(traced, layout.stage_layers)
        self._tied = self._tied_groups(traced, all_stages)
        self.dp_group = self._dp_group()
        blocks = {j for j, layer in enumerate(traced.layers) if layer.kind == "block"}
        group_name = groups.tp.group_name if self.tp > 1 else ""
        self.stages: list[LocalStage] = []
        for i in layout.local_stages(rank):
            graph = all_stages[i]
            report = shard_stage(graph, traced, self.tp, me.tp_rank, group_name,
                                 sharding=layout.stages[i].sharding,
                                 sequence_parallel=layout.sequence_parallel)
            _own_parameters(graph.module)
            diff = make_differentiable(graph.module, report.analysis.params
                                       if report.analysis else {}, self.tp, group_name)
            regions = recompute(graph.module, plan.stages[i].recompute,
                                traced.layer_of_node, blocks)
            graph.module.to(device)
            self.stages.append(LocalStage(i, graph, report, graph.module, diff, regions))
        self._wrap_data_parallel()
        params = list(dict.fromkeys(p for s in self.stages for p in s.module.parameters()))
        if self.zero == 1 and self.dp_group is not None:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer = ZeroRedundancyOptimizer(
                params, optimizer_class=torch.optim.AdamW, process_group=self.dp_group,
                **config.adamw())
        else:
            self.optimizer = torch.optim.AdamW(params, **config.adamw())
        last = self.stages[-1]
        self.is_last = last.index == len(layout.stages) - 1
        self.logits = logits_index(last.graph.module, self.micro, self.seq) \
            if self.is_last else None
        self._schedule = None

    # ------------------------------------------------------------- groups

    def _dp_group(self):
        """This rank's data-parallel group (same stage, same tp rank, every replica);
        every rank creates every group, in one order."""
        mine = None
        for stage in self.layout.physical_stages:
            for k in range(stage.tp):
                ranks = [stage.devices[r][k] for r in range(self.layout.dp)]
                g = dist.new_group(ranks, timeout=self.timeout) if len(ranks) > 1 else None
                if self.rank in ranks:
                    mine = g
        return mine

    def _tied_groups(self, traced, all_stages) -> list:
        """Weights that several stages hold: ``[(names per stage, group or None, whole)]``
        for those this rank holds, with the group of the ranks holding the other copies.

        Copies in stages of one tp hold the same piece on tp rank k: the group pairs tp
        rank k of each. Copies in stages whose tp differs (``whole``) meet as whole
        weights: the group is every rank of the replica that holds a copy."""
        owners: dict[int, dict[int, str]] = {}
        for s in all_stages:
            for name, p in s.module.named_parameters(remove_duplicate=False):
                owners.setdefault(id(p), {}).setdefault(s.index, name)
        tied = sorted((sorted(v.items()) for v in owners.values() if len(v) > 1),
                      key=lambda v: v[0][1])
        out = []
        me = self.layout.coords(self.rank)
        mine = set(self.layout.local_stages(self.rank))
        for copies in tied:
            held = [i for i, _ in copies]
            whole = len({self.layout.stages[i].tp for i in held}) > 1
            group = None
            for r in range(self.layout.dp):
                if whole:
                    ranks = sorted({d for i in held for d in self.layout.stages[i].devices[r]})
                    g = dist.new_group(ranks, timeout=self.timeout)
                    if r == me.replica:
                        group = g
                    continue
                for k in range(self.layout.stages[held[0]].tp):
                    ranks = sorted({self.layout.stages[i].devices[r][k] for i in held})
                    g = dist.new_group(ranks, timeout=self.timeout) if len(ranks) > 1 else None
                    if (r, k) == (me.replica, me.tp_rank):
                        group = g
            if mine & set(held):
                out.append(([(i, n) for i, n in copies if i in mine], group, whole))
        return out

    def _wrap_data_parallel(self) -> None:
        if self.dp_group is None:
            return
        if self.zero <= 1:
            if self.pp > 1:  # averaged by _average_grads after the schedule (see there)
                return
            from torch.nn.parallel import DistributedDataParallel

            for s in self.stages:
                s.module = DistributedDataParallel(s.graph.module, process_group=self.dp_group)
            return
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(self.dp_group, self.device.type)
        for s in self.stages:
            s.module = fully_shard(s.graph.module, mesh=mesh,
                                   reshard_after_forward=self.zero == 3)

    # ------------------------------------------------------------- the step

    def _loss_fn(self, replica_tokens: int):
        scale = replica_tokens * self.tp

        def loss_fn(output, ids):
            logits = output[self.logits] if isinstance(output, (tuple, list)) else output
            return next_token_loss(logits, ids, scale)
        return loss_fn

    def step(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """One AdamW step on the global batch ``inputs`` (the model's tensor inputs).

        Returns:
            The global batch's mean next-token loss (a float32 scalar, the same on every
            rank), computed before the update.
        """
        ids = token_ids(inputs)
        batch = ids.shape[0]
        per_replica = batch // self.layout.dp
        lo = self.coords.replica * per_replica
        inputs = [t[lo:lo + per_replica].to(self.device) for t in inputs]
        ids = ids[lo:lo + per_replica].to(self.device)
        replica_tokens = per_replica * (ids.shape[1] - 1)
        loss_fn = self._loss_fn(replica_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        if self.pp == 1:
            losses = self._run_local(inputs, ids, loss_fn)
        else:
            losses = self._run_pipeline(inputs, ids, loss_fn)
        if self.pp > 1 and self.zero <= 1 and self.dp_group is not None:
            self._average_grads()
        self._sum_tied()
        self.optimizer.step()
        mine = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.is_last and self.coords.tp_rank == 0:
            mine = torch.stack([x.detach().float() for x in losses]).sum() * self.tp \
                / self.layout.dp
        work = dist.all_reduce(mine, async_op=True)
        work.wait(self.timeout)
        return mine

    def _run_local(self, inputs, ids, loss_fn) -> list:
        (stage,) = self.stages
        m = self.layout.microbatches
        chunks = list(zip(*(t.tensor_split(m) for t in inputs), strict=True))
        id_chunks = ids.tensor_split(m)
        losses = []
        for k, chunk in enumerate(chunks):
            last = k == m - 1
            with _no_sync(stage.module, last):
                loss = loss_fn(stage.module(*chunk), id_chunks[k])
                loss.backward()
            losses.append(loss)
        return losses

    def _run_pipeline(self, inputs, ids, loss_fn) -> list:
        if not self.layout.uniform_tp:
            return self._run_boundary_pipeline(inputs, ids, loss_fn)
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        n = len(self.layout.stages)
        if self._schedule is None:
            pipe = [PipelineStage(s.module, s.index, n, self.device, group=self.groups.pp)
                    for s in self.stages]
            m = self.layout.microbatches
            if self.schedule_name == "interleaved":
                self._schedule = ScheduleInterleaved1F1B(pipe, m, loss_fn=loss_fn,
                                                         scale_grads=False)
            else:
                kind = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
                self._schedule = kind(pipe[0], m, loss_fn=loss_fn, scale_grads=False)
        self._schedule._loss_fn = loss_fn
        first = self.stages[0].index == 0
        losses: list = []
        if first:
            self._schedule.step(*inputs, target=ids if self.is_last else None,
                                losses=losses if self.is_last else None)
        elif self.is_last:
            self._schedule.step(target=ids, losses=losses)
        else:
            self._schedule.step()
        return losses

    def _run_boundary_pipeline(self, inputs, ids, loss_fn) -> list:
        """GPipe or 1F1B over stages whose tp degrees differ, with the project's own
        stage-boundary ``isend``/``irecv`` (``PipelineStage`` pairs tp rank k of every
        stage, which different degrees cannot).

        Forward: rank ``j`` of stage i + 1 receives the (replicated) stage outputs from rank
        ``j % tp_i`` of stage i (``ParallelLayout.boundary_peers``). Backward mirrors it:
        each rank sends the gradient of its stage inputs back to the rank it received them
        from, and a sender sums what its receivers send (zeros when it fed none). That sum
        is the gradient its outputs need: a replicated value's gradient on a tp rank is
        that rank's part, the tp group's parts add up to the whole (each rank's loss is
        scaled by ``1/tp``; the row-parallel all-reduce's adjoint sums them), so the parts
        the receivers computed from rank k's copy belong to rank k, each counted once.
        Every rank of a stage runs every forward and backward (their collectives need the
        whole tp group), in torch's order (``_pipeline_order``). Every send and receive
        waits at most ``self.timeout``.
        """
        from codegen.runtime import _wait, node_specs

        (stage,) = self.stages
        module, m = stage.module, self.layout.microbatches
        recv_from, send_to = self.layout.boundary_peers(self.rank)
        graph = stage.graph.module.graph
        specs = node_specs(n for n in graph.nodes if n.op == "placeholder")
        out_specs = node_specs(next(n for n in graph.nodes if n.op == "output").args[0])
        n_in, n_out = len(specs), len(out_specs)
        chunks = list(zip(*(t.tensor_split(m) for t in inputs), strict=True))
        id_chunks = ids.tensor_split(m)
        where = f"rank {self.rank} (stage {stage.index})"
        saved: dict = {}
        sends: list = []
        losses: list = []

        def send(t, dst, tag, what):
            t = t.detach().contiguous()
            sends.append((dist.isend(t, dst=dst, tag=tag), t, f"{where} sending {what} to "
                          f"rank {dst}"))

        def recv(spec, src, tag, what):
            t = torch.empty(spec[0], dtype=spec[1], device=self.device)
            return dist.irecv(t, src=src, tag=tag), t, f"{where} waiting for {what} from " \
                f"rank {src}"

        def wait_all(works):
            for w, _, what in works:
                _wait(w, self.timeout, what)

        def forward(k):
            if recv_from is None:
                args = list(chunks[k])
            else:
                works = [recv(sp, recv_from, 2 * k * n_in + i, f"microbatch {k}")
                         for i, sp in enumerate(specs)]
                wait_all(works)
                args = [t.requires_grad_() if t.is_floating_point() else t
                        for _, t, _ in works]
            out = module(*args)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            if self.is_last:
                loss = loss_fn(out, id_chunks[k])
                losses.append(loss)
                saved[k] = (args, loss)
                return
            for dst in send_to:
                for i, t in enumerate(out):
                    send(t, dst, 2 * k * n_out + i, f"microbatch {k}")
            saved[k] = (args, out)

        def backward(k):
            args, out = saved.pop(k)
            with _no_sync(module, k == m - 1):
                if self.is_last:
                    out.backward()
                else:
                    floating = [i for i, (_, dtype) in enumerate(out_specs)
                                if dtype.is_floating_point]
                    grads = {i: torch.zeros(out_specs[i][0], dtype=out_specs[i][1],
                                            device=self.device) for i in floating}
                    for src in send_to:
                        works = [recv(out_specs[i], src, (2 * k + 1) * n_out + i,
                                      f"the gradient of microbatch {k}") for i in floating]
                        wait_all(works)
                        for i, (_, g, _) in zip(floating, works, strict=True):
                            grads[i] += g
                    pairs = [(out[i], grads[i]) for i in floating if out[i].requires_grad]
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            if recv_from is None:
                return
            for i, a in enumerate(args):
                if a.is_floating_point():
                    g = a.grad if a.grad is not None else torch.zeros_like(a)
                    send(g, recv_from, (2 * k + 1) * n_in + i, f"the gradient of microbatch {k}")

        for kind, k in _pipeline_order(self.schedule_name, stage.index, self.pp, m):
            (forward if kind == "F" else backward)(k)
        wait_all(sends)
        return losses

    def _average_grads(self) -> None:
        """ZeRO 0/1 in a pipeline: average the gradients over the dp group in one flat
        all-reduce after the schedule. (DDP under ``torch.distributed.pipelining``'s 1F1B
        fails in torch 2.13: its reducer's bucket rebuild counts every parameter twice,
        ``rebuilt parameter indices size is not same as original model parameters
        size``.)"""
        params = list(dict.fromkeys(p for s in self.stages
                                    for p in s.graph.module.parameters() if p.grad is not None))
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        work = dist.all_reduce(flat, group=self.dp_group, async_op=True)
        work.wait(self.timeout)
        flat /= self.layout.dp
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def _sum_tied(self) -> None:
        """Sum the gradient of each weight several stages hold over its copies."""
        for copies, group, whole in self._tied:
            if whole:
                self._sum_tied_whole(copies, group)
                continue
            grads = []
            for i, name in copies:
                stage = next(s for s in self.stages if s.index == i)
                p = stage.graph.module.get_parameter(name)
                grads.append(p)
            total = None
            for p in grads:
                g = _local(p.grad) if p.grad is not None else None
                if g is not None:
                    total = g.clone() if total is None else total + g
            if total is None:
                total = torch.zeros_like(_local(grads[0]))
            if group is not None:
                work = dist.all_reduce(total, group=group, async_op=True)
                work.wait(self.timeout)
            for p in grads:
                if p.grad is None:
                    p.grad = _like(p, total.clone())
                else:
                    _local(p.grad).copy_(total)

    def _sum_tied_whole(self, copies, group) -> None:
        """Sum a tied weight's gradient over copies in stages of different tp: each holder
        adds its stage's gradient to a whole-weight buffer (a tp piece at its place; a
        replicated part, which every tp rank has whole after ``tp_grad_sum``, from tp
        rank 0 only, so it counts once), the buffers are summed over the holders and each
        takes its piece back (its ZeRO-2/3 shard of it under ``fully_shard``)."""
        from planner.sharding import Shard

        k = self.coords.tp_rank
        held = []
        total = None
        for i, name in copies:
            stage = next(s for s in self.stages if s.index == i)
            p = stage.graph.module.get_parameter(name)
            g = p.grad if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype,
                                                                device=self.device)
            g = g.full_tensor() if hasattr(g, "full_tensor") else g  # gathered over dp
            place = stage.report.analysis.params.get(name) if stage.report.analysis else None
            tp = self.layout.stages[i].tp
            if not isinstance(place, Shard) or tp == 1:
                place = None
                full = g.clone() if k == 0 else torch.zeros_like(g)
            else:
                shape = list(g.shape)
                shape[place.dim] = sum(size for size, _ in place.blocks)
                full = torch.zeros(shape, dtype=g.dtype, device=g.device)
                offset = 0
                for (start, n), (_, split) in zip(place.pieces(tp, k), place.blocks,
                                                  strict=True):
                    if split or k == 0:
                        full.narrow(place.dim, start, n).copy_(g.narrow(place.dim, offset, n))
                    offset += n
            total = full if total is None else total + full
            held.append((p, place, tp))
        work = dist.all_reduce(total, group=group, async_op=True)
        work.wait(self.timeout)
        for p, place, tp in held:
            piece = total if place is None else torch.cat(
                [total.narrow(place.dim, a, n) for a, n in place.pieces(tp, k)], place.dim)
            if hasattr(p, "device_mesh"):  # this rank's fully_shard shard of its piece
                from torch.distributed.tensor import distribute_tensor

                piece = distribute_tensor(piece, p.device_mesh, p.placements,
                                          src_data_rank=None).to_local()
            if p.grad is None:
                p.grad = _like(p, piece.clone())
            else:
                _local(p.grad).copy_(piece)


def _pipeline_order(schedule: str, stage: int, pp: int, m: int) -> list[tuple[str, int]]:
    """Stage ``stage``'s forwards ``("F", k)`` and backwards ``("B", k)`` in the order of
    torch's ``ScheduleGPipe`` (every forward, then every backward) or ``Schedule1F1B``
    (``min(m, pp − stage)`` forwards, then one backward and one forward in turn, then
    the remaining backwards), microbatches in order.

    >>> _pipeline_order("1f1b", 1, 3, 4)
    [('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('F', 3), ('B', 2), ('B', 3)]
    """
    if schedule == "gpipe":
        return [("F", k) for k in range(m)] + [("B", k) for k in range(m)]
    warmup = min(m, pp - stage)
    order = [("F", k) for k in range(warmup)]
    for k in range(m):
        order.append(("B", k))
        if warmup + k < m:
            order.append(("F", warmup + k))
    return order


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _like(p, local: torch.Tensor):
    if hasattr(p, "to_local"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False)
    return local


class _no_sync:
    """Skip the data-parallel gradient reduction of every microbatch but the last."""

    def __init__(self, module, last: bool) -> None:
        self.module, self.last, self.ctx = module, last, None

    def __enter__(self):
        if self.last:
            return
        if hasattr(self.module, "no_sync"):
            self.ctx = self.module.no_sync()
            self.ctx.__enter__()
        elif hasattr(self.module, "set_requires_gradient_sync"):
            self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)
        elif not self.last and hasattr(self.module, "set_requires_gradient_sync"):
            self.module.set_requires_gradient_sync(True)


def _own_parameters(module: nn.Module) -> None:
    """Give the stage its own trainable parameters (copies; tied names stay tied), so that
    training never writes into the model that was traced."""
    copies: dict[int, nn.Parameter] = {}
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) not in copies:
            copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=True)
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        owner.register_parameter(leaf, copies[id(p)])


# --------------------------------------------------------------------------- reference


def reference_train(model: nn.Module, batches: list[tuple[tuple, dict]],
                    config: TrainConfig = TrainConfig()) -> list[float]:
    """Single-process training, the reference of ``plan run --check --steps``: one AdamW
    step per batch on ``model`` (in place), each loss ``next_token_loss`` of the whole
    batch. Returns the losses (before each update)."""
    from torch.utils import _pytree as pytree

    from codegen.stage_split import model_tensor_inputs

    opt = torch.optim.AdamW(model.parameters(), **config.adamw())
    losses = []
    for args, kwargs in batches:
        ids = token_ids(model_tensor_inputs(args, kwargs))
        out = [x for x in pytree.tree_leaves(model(*args, **kwargs))
               if isinstance(x, torch.Tensor)]
        logits = next(x for x in out if x.is_floating_point() and x.dim() == 3
                      and tuple(x.shape[:2]) == tuple(ids.shape))
        loss = next_token_loss(logits, ids, ids.shape[0] * (ids.shape[1] - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses

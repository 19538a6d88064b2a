"""Apply a recorded tensor-parallel strategy to one stage's graph, for one rank.

The strategy (which parameter is sharded how) comes from the plan
(``planner.sharding.StageSharding``). This pass decides nothing: it asks
``planner.sharding.analyse_stage`` for the placement of every node under that strategy
(the same pure function the planner priced) and rewrites the graph to match, node by
node:

- parameters are replaced by this rank's pieces (``Shard(dim, blocks)``: for every block,
  its ``r``-th of ``tp`` pieces, or the whole block when it is not split);
- literal sizes of sharded dims in ``view``/``reshape``/``expand``/``slice``/``split``
  become local sizes (``[B, T, 4, 16] -> [B, T, 2, 16]``);
- each conversion the analysis lists is inserted where it says: a partial sum is reduced
  right after its matmul (``all_reduce``, or ``reduce_scatter`` over the sequence), a shard
  a rule cannot keep is gathered (``all_gather_into_tensor``, then the blocks put back in
  global order), a replicated value meeting a shard is sliced locally (no communication);
- a row-parallel matmul's bias is added after the reduction; a vocab-parallel embedding
  masks the ids outside this rank's rows.

Collectives are functional collectives (``torch.ops._c10d_functional``) with their
``wait_tensor``, visible in ``plan compile``'s source. ``TPReport.collectives`` lists what
was inserted, ``(kind, bytes)`` with the bytes of the whole tensor, and equals the
analysis's list; ``check_against`` compares it with the plan's record.

>>> import torch, planner
>>> from planner.models import load_model
>>> from codegen.stage_split import split_stages
>>> lm = load_model("llama-tiny", batch_size=1, seq_len=8)
>>> traced = planner.trace(lm.model, lm.args, lm.kwargs)
>>> stage = split_stages(traced, [(0, 5)])[0]
>>> report = shard_stage(stage, traced, tp=2, tp_rank=0, group_name="tp0")
>>> count_collectives(stage.module)
{'all_reduce': 9, 'all_gather_into_tensor': 1}
>>> report.sharded["model.layers.0.self_attn.q_proj.weight"]
((64, 64), (32, 64))
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from planner.sharding import (
    REPLICATE,
    Analysis,
    Partial,
    Replicate,
    Shard,
    StageSharding,
    analyse_stage,
    block_state,
    hidden_values,
    local_shape,
)

__all__ = ["ShardingError", "TPReport", "shard_stage", "count_collectives", "stage_strategy"]

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


class ShardingError(ValueError):
    """The graph does not match the recorded strategy (a plan made for another model)."""


@dataclass
class TPReport:
    """What ``shard_stage`` did.

    Attributes:
        tp: the degree.
        sharded: parameter target -> (global shape, local shape).
        state: state input (a decode step's KV cache) -> (global shape, local shape): the
            piece of the cache this rank allocates and feeds (the graph's input then has
            the local shape).
        collectives: ``(kind, bytes of the whole tensor)`` of every collective inserted.
        analysis: the analysis the rewrite followed.
    """

    tp: int
    sharded: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    state: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    collectives: list[tuple[str, int]] = field(default_factory=list)
    analysis: Analysis | None = None

    @property
    def all_reduces(self) -> int:
        return sum(1 for k, _ in self.collectives if k == "all_reduce")

    def param_bytes(self, module: nn.Module) -> int:
        """Bytes of every parameter this rank holds for the stage."""
        return sum(p.numel() * p.element_size() for p in module.parameters())


def stage_strategy(traced, stage_layers: tuple[int, int], sharding: StageSharding | None,
                   tp: int, sequence_parallel: bool = False) -> dict:
    """Parameter target -> placement for one stage: the plan's record, or (for a layout
    built without a plan) the greedy strategy of each layer from the analysis."""
    names = [layer.name for layer in traced.layers]
    kinds = [layer.kind for layer in traced.layers]
    if sharding is not None:
        return _named_in(traced.graph_module, sharding.strategy(names, kinds))
    from planner.sharding import analyse_layer

    out: dict = {}
    for j in range(stage_layers[0], stage_layers[1] + 1):
        analysis = analyse_layer(traced, j, tp, sequence_parallel=sequence_parallel)
        for target, p in (*analysis.params.items(), *analysis.state.items()):
            out.setdefault(target, p)
    return out


def _named_in(gm: fx.GraphModule, strategy: dict) -> dict:
    """The recorded strategy under ``gm``'s parameter names: a plan made for a model applies
    to a wrapper of it (``planner.decode.DecodeStep`` holds the model as ``model``, so the
    recorded ``lm_head.weight`` is ``model.lm_head.weight`` there). A name that is not a
    parameter of ``gm`` is matched by path suffix when exactly one parameter ends with it."""
    params = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    have = set(params)
    out = {}
    for name, placement in strategy.items():
        if name not in have:
            found = [q for q in params if q.endswith("." + name)]
            if len(found) == 1:
                name = found[0]
        out[name] = placement
    return out


def shard_stage(stage, traced, tp: int, tp_rank: int, group_name: str, *,
                sharding: StageSharding | None = None,
                sequence_parallel: bool = False) -> TPReport:
    """Shard ``stage.module`` for rank ``tp_rank`` of its tp group, in place.

    Args:
        stage: a ``codegen.stage_split.StageGraph``.
        traced: the ``TracedModel`` the stage was cut from (layer of every node).
        tp: tensor-parallel degree (1 leaves the module as it is).
        tp_rank: this rank's index in its group.
        group_name: the group's name (``ProcessGroup.group_name``) for the collectives.
        sharding: the plan's record for this stage (default: the greedy strategy).
        sequence_parallel: partial sums of hidden states are reduce-scattered over T.
    """
    report = TPReport(tp)
    if tp == 1:
        return report
    if not 0 <= tp_rank < tp:
        raise ShardingError(f"tp_rank {tp_rank} is outside 0..{tp - 1}")
    module = stage.module
    strategy = stage_strategy(traced, stage.layers, sharding, tp, sequence_parallel)
    state, state_out = block_state(traced)
    analysis = analyse_stage(module, traced.layer_of_node, hidden_values(traced), tp, strategy,
                             sequence_parallel=sequence_parallel, state=state,
                             state_out=state_out)
    report.analysis = analysis
    _Rewrite(module, analysis, tp, tp_rank, group_name, report).run()
    for node in module.graph.nodes:  # each rank feeds its piece of the cache
        if node.op == "placeholder" and node.name in analysis.state:
            val = node.meta["val"]
            local = local_shape(tuple(val.shape), analysis.state[node.name], tp)
            report.state[node.name] = (tuple(val.shape), local)
            node.meta["val"] = torch.empty(local, dtype=val.dtype, device="meta")
    module.graph.lint()
    module.recompile()
    return report


def check_against(report: TPReport, sharding: StageSharding, ratio: float | None = 1.0) -> None:
    """The inserted collectives equal the plan's record: kind and bytes (the recorded bytes
    times ``ratio``, the dtype ratio of this run to the plan's), or kinds and counts only
    when ``ratio`` is ``None`` (a run at another shape than the plan's step, e.g. the
    prefill graph of a decode plan).

    Raises:
        ShardingError: listing both when they differ.
    """
    if ratio is None:
        want = Counter(k for k, _ in sharding.collectives())
        have = Counter(k for k, _ in report.collectives)
    else:
        want = Counter((k, round(b * ratio)) for k, b in sharding.collectives())
        have = Counter(report.collectives)
    if want != have:
        raise ShardingError(f"the stage's collectives {sorted(have.elements())} differ from the "
                            f"plan's {sorted(want.elements())}; re-plan for this model")


def count_collectives(module: fx.GraphModule) -> dict[str, int]:
    """Functional collective nodes in a graph by op name (``{"all_reduce": 8}``)."""
    counts: dict[str, int] = {}
    for node in module.graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "namespace", None) == "_c10d_functional":
            name = target._opname
            if name != "wait_tensor":
                counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------- the rewrite


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _nbytes(node) -> int:
    v = _val(node)
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


class _Rewrite:
    def __init__(self, module, analysis: Analysis, tp, rank, group, report):
        self.m, self.a, self.tp, self.rank, self.group = module, analysis, tp, rank, group
        self.report = report
        self.graph = module.graph
        self.converted: dict[tuple[str, object], fx.Node] = {}
        self.now: dict[str, fx.Node] = {}  # value name -> the node that carries it now
        self.buffers = 0
        self.pieces: dict[int, nn.Parameter] = {}
        self.names: dict[int, list[str]] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(param), []).append(name)

    def run(self) -> None:
        for node in list(self.graph.nodes):
            self.now.setdefault(node.name, node)
            if node.op == "get_attr":
                self._param(node)
                continue
            plan = self.a.nodes.get(node.name)
            if plan is None:
                continue
            if plan.args is not None:
                self._set_args(node, plan.args)
            for arg_name, target in plan.inputs.items():
                carrier = self.now[arg_name]
                converted = self._convert(arg_name, carrier, self._placement(arg_name), target)
                node.replace_input_with(carrier, converted)
            carrier = self._mask_embedding(node) if plan.vocab else node
            if plan.post is not None:
                self._post(node, carrier, plan)

    # ----------------------------------------------------------------- pieces

    def _placement(self, name: str):
        plan = self.a.nodes.get(name)
        if plan is not None:
            return plan.post if plan.post is not None else plan.placement
        return self.a.params.get(self.now[name].target, REPLICATE) if \
            self.now[name].op == "get_attr" else REPLICATE

    def _param(self, node: fx.Node) -> None:
        p = self.a.params.get(node.target)
        if not isinstance(p, Shard) or node.target in self.report.sharded:
            return
        original = self.m.get_parameter(node.target)
        full = original.detach()
        local = self.pieces.get(id(original))  # a tied table fetched under two names
        if local is None:
            parts = [full.narrow(p.dim, start, length)
                     for start, length in p.pieces(self.tp, self.rank)]
            local = nn.Parameter((torch.cat(parts, p.dim) if len(parts) > 1 else parts[0])
                                 .contiguous(), requires_grad=False)
            self.pieces[id(original)] = local
        for name in self.names.get(id(original), [node.target]):
            path, _, leaf = name.rpartition(".")
            owner = self.m.get_submodule(path) if path else self.m
            owner.register_parameter(leaf, local)
            self.report.sharded[name] = (tuple(full.shape), tuple(local.shape))

    def _set_args(self, node, args) -> None:
        if args and args[0] == "split_with_sizes":
            node.target = aten.split_with_sizes.default
            node.args = tuple(args[1:])
            node.kwargs = {}
        else:
            node.args = tuple(args)

    def _call(self, target, args, val, like: fx.Node, kwargs=None) -> fx.Node:
        new = self.graph.call_function(target, tuple(args), kwargs or {})
        new.meta["val"] = val
        if "nn_module_stack" in like.meta:
            new.meta["nn_module_stack"] = like.meta["nn_module_stack"]
        return new

    # ----------------------------------------------------------------- conversions

    def _convert(self, name: str, x: fx.Node, have, want) -> fx.Node:
        """Value ``name`` (carried by ``x``, placed ``have``) as ``want``; cached, so its
        consumers share one collective."""
        key = (name, want)
        if key in self.converted:
            return self.converted[key]
        cur = x
        if x.op == "placeholder":  # after the last placeholder: the graph's inputs come first
            cur = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        self._src = x
        if isinstance(have, Partial):
            cur = self._reduce(cur, x, want)
        elif isinstance(have, Shard) and have != want:
            cur = self._gather(cur, x, have)
            if isinstance(want, Shard):
                self._src = cur
                cur = self._slice(cur, x, want)
        elif isinstance(have, Replicate) and isinstance(want, Shard):
            cur = self._slice(cur, x, want)
        self.converted[key] = cur
        return cur

    def _first(self, cur: fx.Node) -> fx.Node:
        """The input of the conversion's first op: the value itself."""
        src, self._src = self._src, None
        return src if src is not None else cur

    def _after(self, cur: fx.Node, target, args, val, like, kwargs=None) -> fx.Node:
        with self.graph.inserting_after(cur):
            return self._call(target, args, val, like, kwargs)

    def _slice(self, cur: fx.Node, x: fx.Node, want: Shard) -> fx.Node:
        src = self._first(cur)
        pieces = []
        for start, length in want.pieces(self.tp, self.rank):
            cur = self._after(cur, aten.slice.Tensor, (src, want.dim, start, start + length),
                              _val(x), x)
            pieces.append(cur)
        if len(pieces) > 1:
            cur = self._after(cur, aten.cat.default, (pieces, want.dim), _val(x), x)
        return cur

    def _moved(self, cur, x, dim, back=False):
        nd = _val(x).dim()
        front = [dim] + [d for d in range(nd) if d != dim]
        perm = [front.index(d) for d in range(nd)] if back else front
        cur = self._after(cur, aten.permute.default, (self._first(cur), perm), _val(x), x)
        return self._after(cur, aten.clone.default, (cur,), _val(x), x,
                           {"memory_format": torch.contiguous_format})

    def _gather(self, cur: fx.Node, x: fx.Node, have: Shard) -> fx.Node:
        self.report.collectives.append(("all_gather", _nbytes(x)))
        if have.dim != 0:
            cur = self._moved(cur, x, have.dim)
        cur = self._after(cur, _c10d.all_gather_into_tensor.default,
                          (self._first(cur), self.tp, self.group), _val(x), x)
        cur = self._after(cur, _c10d.wait_tensor.default, (cur,), _val(x), x)
        if not have.plain:
            cur = self._reorder(cur, x, have)
        if have.dim != 0:
            cur = self._moved(cur, x, have.dim, back=True)
        return cur

    def _reorder(self, cur, x, have: Shard) -> fx.Node:
        """Gathered ``[rank 0's pieces, rank 1's pieces, ...]`` back to global order."""
        local = have.local(self.tp)
        index, offset = [], 0
        for size, split in have.blocks:
            if split:
                piece = size // self.tp
                for r in range(self.tp):
                    index += range(r * local + offset, r * local + offset + piece)
                offset += piece
            else:
                index += range(offset, offset + size)
                offset += size
        name = f"_tp_gather_index_{self.buffers}"
        self.buffers += 1
        self.m.register_buffer(name, torch.tensor(index, dtype=torch.long), persistent=False)
        with self.graph.inserting_after(cur):
            idx = self.graph.get_attr(name)
        idx.meta["val"] = torch.empty(len(index), dtype=torch.long, device="meta")
        return self._after(idx, aten.index_select.default, (cur, 0, idx), _val(x), x)

    def _reduce(self, cur: fx.Node, x: fx.Node, want) -> fx.Node:
        if isinstance(want, Shard):
            self.report.collectives.append(("reduce_scatter", _nbytes(x)))
            if want.dim != 0:
                cur = self._moved(cur, x, want.dim)
            cur = self._after(cur, _c10d.reduce_scatter_tensor.default,
                              (self._first(cur), "sum", self.tp, self.group), _val(x), x)
            cur = self._after(cur, _c10d.wait_tensor.default, (cur,), _val(x), x)
            if want.dim != 0:
                cur = self._moved(cur, x, want.dim, back=True)
            return cur
        self.report.collectives.append(("all_reduce", _nbytes(x)))
        cur = self._after(cur, _c10d.all_reduce.default, (self._first(cur), "sum", self.group),
                          _val(x), x)
        return self._after(cur, _c10d.wait_tensor.default, (cur,), _val(x), x)

    # ----------------------------------------------------------------- node rewrites

    def _post(self, node: fx.Node, carrier: fx.Node, plan) -> None:
        """Convert ``node``'s output (carried by ``carrier``) for every consumer: reduce a
        partial sum, make a boundary value whole or sequence-sharded."""
        users = [u for u in carrier.users]
        bias = self._drop_bias(node) if plan.bias_after_reduce else None
        out = self._convert(node.name, carrier, plan.placement, plan.post)
        if bias is not None:
            out = self._after(out, aten.add.Tensor, (out, bias), _val(node), node)
            self.converted[(node.name, plan.post)] = out
        for user in users:
            user.replace_input_with(carrier, out)
        self.now[node.name] = out

    def _drop_bias(self, node: fx.Node) -> fx.Node:
        """``linear(x, w, b)`` -> ``linear(x, w)``; ``addmm(b, x, w)`` -> ``mm(x, w)``."""
        if node.target is aten.addmm.default:
            bias, x, w = node.args[:3]
            node.target = aten.mm.default
            node.args, node.kwargs = (x, w), {}
        else:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            node.args, node.kwargs = tuple(node.args[:2]), {}
        return bias

    def _mask_embedding(self, node: fx.Node) -> fx.Node:
        """Vocab-parallel lookup: ids outside ``[r·rows, (r+1)·rows)`` read row 0 and are
        zeroed, so the all-reduce that follows sums exactly one real row per id. Returns
        the node that carries the (partial) result."""
        weight, ids = node.args[0], node.args[1]
        rows = self.m.get_parameter(weight.target).shape[0]
        lo = self.rank * rows
        ids_val = _val(ids)
        mask_val = torch.empty(ids_val.shape, dtype=torch.bool, device="meta")
        with self.graph.inserting_before(node):
            local = self._call(aten.sub.Tensor, (ids, lo), ids_val, node)
            below = self._call(aten.lt.Scalar, (local, 0), mask_val, node)
            above = self._call(aten.ge.Scalar, (local, rows), mask_val, node)
            outside = self._call(aten.bitwise_or.Tensor, (below, above), mask_val, node)
            safe = self._call(aten.masked_fill.Scalar, (local, outside, 0), ids_val, node)
        node.args = (weight, safe, *node.args[2:])
        users = list(node.users)
        with self.graph.inserting_after(node):
            keep = self._call(aten.unsqueeze.default, (outside, -1), mask_val, node)
        with self.graph.inserting_after(keep):
            zeroed = self._call(aten.masked_fill.Scalar, (node, keep, 0.0), _val(node), node)
        for user in users:
            user.replace_input_with(node, zeroed)
        self.now[node.name] = zeroed
        return zeroed

"""Tensor parallelism as a graph pass: shard weights, propagate placements, insert all-reduces.

The pass works on one stage's ATen graph (from ``codegen.stage_split``):

1. Weights of the projections named in ``TP_PLAN`` (a table keyed by module-path suffix)
   are sliced for this rank: column-parallel (q/k/v, gate/up, c_fc, fused c_attn) along
   the output dimension, row-parallel (o_proj, down_proj, c_proj) along the input
   dimension. Which tensor dimension is "output" comes from the consuming op
   (``aten.linear``: weight ``(out, in)``; ``aten.addmm``, HF ``Conv1D``: ``(in, out)``).
   Fused projections (``q|k|v`` in one matrix) are split into parts, each part sharded,
   and the shards re-joined, so rank ``r`` holds ``q_r|k_r|v_r``.
2. Placements flow through the graph in order: every value is ``Replicate`` or sharded on
   some dims (``Placement.divisors``: global size / local size per dim). Literal sizes in
   ``view``/``reshape``/``expand``/``split`` on sharded dims are rewritten to local sizes
   (``[B, T, 4, 16] -> [B, T, 2, 16]`` for 4 heads at tp 2).
3. A row-parallel matmul yields a partial sum; an all-reduce (functional collective:
   ``_c10d_functional.all_reduce`` + ``wait_tensor``, visible graph nodes) follows it, then
   the bias, which every rank holds whole.
4. With ``sequence_parallel=True`` that all-reduce becomes a reduce-scatter along the
   sequence; residual adds, dropout and norms run on the local sequence shard, and the
   sequence is all-gathered before the next op that needs it whole (``_SeqParallel``).

GQA: KV heads are sharded when ``num_kv_heads % tp == 0``. When ``tp % num_kv_heads == 0``
(fewer KV heads than ranks) each rank holds the one KV head its query heads use; the
tensor is "owed" the remaining factor ``tp / num_kv_heads``, paid where GQA broadcasts
the KV head over its query group (the ``expand`` before ``reshape``).

5. Vocab parallelism (``_vocab_parallel``): the token embedding and the LM head (weights
   with ``arch.vocab_size`` rows; tied or not) are split by vocabulary rows, rank ``r``
   holding rows ``[r·c, (r+1)·c)`` with ``c = ceil(V / tp)`` (the last shard zero-padded).
   The embedding looks up the ids in its range, zeroes the others and all-reduces (1
   all-reduce); the head computes its ``c`` logits and all-gathers them (1 all-gather),
   dropping the padding. This is what the cost model charges (``layer_cost``) and what
   the memory model assumes (embedding and head weights ``/ tp``).

Ops that the table of rules does not know are fine on replicated values and refused on
sharded ones, so a wrongly sharded graph fails at compile time instead of computing
nonsense.

>>> import torch, planner
>>> from planner.models import load_model
>>> from codegen.stage_split import split_stages
>>> lm = load_model("llama-tiny", batch_size=1, seq_len=8)
>>> stage = split_stages(planner.trace(lm.model, lm.args, lm.kwargs), [(0, 5)])[0]
>>> report = shard_stage(stage.module, tp=2, tp_rank=0, group_name="tp0", arch=lm.arch)
>>> report.all_reduces, report.sharded["model.layers.0.self_attn.q_proj.weight"]
(9, ((64, 64), (32, 64)))
>>> report.vocab_parallel
['model.embed_tokens.weight', 'lm_head.weight']
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["TP_PLAN", "Placement", "ShardingError", "TPReport", "shard_stage", "count_collectives"]

aten = torch.ops.aten
_c10d = torch.ops._c10d_functional

# Module-path suffix -> (style, fused parts along the output dim). Data, not branches.
TP_PLAN: dict[str, tuple[str, int]] = {
    "q_proj": ("colwise", 1),
    "k_proj": ("colwise_kv", 1),
    "v_proj": ("colwise_kv", 1),
    "o_proj": ("rowwise", 1),
    "gate_proj": ("colwise", 1),
    "up_proj": ("colwise", 1),
    "down_proj": ("rowwise", 1),
    "attn.c_attn": ("colwise", 3),  # GPT and HF GPT-2: q|k|v fused
    "attn.c_proj": ("rowwise", 1),
    "mlp.c_fc": ("colwise", 1),
    "mlp.c_proj": ("rowwise", 1),
}

# Matmul op -> (input arg, weight arg, bias arg, weight's output dim).
_MATMULS = {
    aten.linear.default: (0, 1, 2, 0),  # nn.Linear: weight (out, in)
    aten.addmm.default: (1, 2, 0, 1),  # HF Conv1D: addmm(bias, x, weight (in, out))
}

_ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.silu.default, aten.gelu.default,
    aten.tanh.default, aten.relu.default, aten.sigmoid.default, aten.exp.default,
    aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.alias.default, aten.clone.default, aten.contiguous.default, aten.where.self,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_METADATA_ONLY = {aten._assert_tensor_metadata.default}


class ShardingError(ValueError):
    """The graph cannot be sharded as asked; names the node, its op and the placements."""


@dataclass(frozen=True)
class Placement:
    """How one value is laid out across the tp ranks of a stage.

    Attributes:
        divisors: per dim, global size / local size (all 1: ``Replicate``).
        owed: a factor of ``tp`` not yet split (KV heads replicated for GQA, kv < tp); it is
            paid on the dim a later ``expand`` broadcasts over.
        fused: the sharded dim holds this many re-joined parts (q|k|v); only a ``split``
            into exactly these parts may consume it.
        repeated: inner sharded dims hold broadcast copies (after paying ``owed``), so a
            view may merge several sharded dims.
        seq: the sharded dim is the sequence (sequence parallelism: between a
            reduce-scatter and the next all-gather).
    """

    divisors: tuple[int, ...]
    owed: int = 1
    fused: int = 1
    repeated: bool = False
    seq: bool = False

    @classmethod
    def replicate(cls, ndim: int) -> Placement:
        return cls((1,) * ndim)

    @property
    def is_replicate(self) -> bool:
        return all(d == 1 for d in self.divisors) and self.owed == 1

    def __str__(self) -> str:
        dims = [i for i, d in enumerate(self.divisors) if d > 1]
        if not dims:
            return "Replicate" if self.owed == 1 else f"Replicate(owed {self.owed})"
        kind = "ShardSeq(" if self.seq else "Shard("
        return kind + ", ".join(f"{i}/{self.divisors[i]}" for i in dims) + ")"


@dataclass
class TPReport:
    """What ``shard_stage`` did.

    Attributes:
        tp: the degree.
        sharded: parameter target -> (global shape, local shape); vocab-parallel shards
            are ``ceil(V / tp)`` rows (zero-padded on the last rank).
        all_reduces: number of all-reduce nodes inserted (embedding included).
        vocab_parallel: parameter targets split by vocabulary rows.
        placements: fx node name -> placement (as text) of every tensor value.
    """

    tp: int
    sharded: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    all_reduces: int = 0
    placements: dict[str, str] = field(default_factory=dict)
    vocab_parallel: list[str] = field(default_factory=list)


def shard_stage(module: fx.GraphModule, tp: int, tp_rank: int, group_name: str,
                arch=None, *, sequence_parallel: bool = False) -> TPReport:
    """Shard one stage's graph for rank ``tp_rank`` of a tensor-parallel group, in place.

    Args:
        module: a stage GraphModule (ATen ops, parameters as ``get_attr``).
        tp: tensor-parallel degree (1 leaves the module as it is).
        tp_rank: this rank's index in its tp group.
        group_name: the tp process group's name (``ProcessGroup.group_name``), written into
            the all-reduce nodes.
        arch: ``planner.ModelArch``; needed for KV-head replication (``num_kv_heads < tp``).
        sequence_parallel: replace each row-parallel all-reduce by a reduce-scatter along
            the sequence dim, run residual adds, dropout and norms on the local sequence
            shard, and all-gather the sequence before the next op that needs it whole (the
            next column-parallel matmul, a view, the stage output).

    Returns:
        A ``TPReport``.

    Raises:
        ShardingError: heads, KV heads or widths that ``tp`` does not divide, or a sharded
            value reaching an op that has no sharding rule.
    """
    report = TPReport(tp)
    if tp == 1:
        return report
    if not 0 <= tp_rank < tp:
        raise ShardingError(f"tp_rank {tp_rank} is outside 0..{tp - 1}")
    weights = _shard_weights(module, tp, tp_rank, arch, report)
    _vocab_parallel(module, tp, tp_rank, group_name, arch, report)
    sp = _SeqParallel(tp, tp_rank, group_name) if sequence_parallel else None
    _propagate(module, tp, group_name, weights, report, sp)
    module.graph.lint()
    module.recompile()
    return report


def count_collectives(module: fx.GraphModule) -> dict[str, int]:
    """Functional collective nodes in a graph by op name (``{"all_reduce": 8}``)."""
    counts: dict[str, int] = {}
    for node in module.graph.nodes:
        target = node.target
        if node.op == "call_function" and getattr(target, "namespace", None) == "_c10d_functional":
            name = target._opname  # OpOverload: "all_reduce", "wait_tensor", ...
            if name != "wait_tensor":
                counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------- weights


def _style_of(target: str) -> tuple[str, int] | None:
    module_path = target.rsplit(".", 1)[0]
    for suffix, style in TP_PLAN.items():
        if module_path == suffix or module_path.endswith("." + suffix):
            return style
    return None


def _shard_weights(module, tp, rank, arch, report) -> dict[fx.Node, Placement]:
    """Slice the table's weights and biases; return their placements by get_attr node."""
    placements: dict[fx.Node, Placement] = {}
    for node in list(module.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS:
            continue
        _, w_arg, b_arg, out_dim = _MATMULS[node.target]
        weight = node.args[w_arg]
        bias = node.args[b_arg] if len(node.args) > b_arg else None
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            continue
        style = _style_of(weight.target)
        if style is None:
            continue
        kind, parts = style
        if len(weight.users) != 1:
            raise ShardingError(f"weight {weight.target} is used by {len(weight.users)} ops; a "
                                "sharded weight must feed exactly one matmul")
        w = module.get_parameter(weight.target).detach()
        in_dim = 1 - out_dim
        divisors = [1, 1]
        owed = 1
        if kind == "rowwise":
            local_w = _chunk(w, tp, in_dim, rank, weight.target)  # (in/tp) Shard(in)
            divisors[in_dim] = tp
        else:
            if kind == "colwise_kv":
                local_w, divisor, owed = _kv_slice(w, out_dim, tp, rank, arch, weight.target)
            else:
                local_w, divisor = _fused_chunk(w, parts, tp, out_dim, rank, weight.target), tp
            divisors[out_dim] = divisor
        placements[weight] = Placement(tuple(divisors), owed, parts if kind == "colwise" else 1)
        _replace_param(module, weight.target, local_w)
        report.sharded[weight.target] = (tuple(w.shape), tuple(local_w.shape))
        if isinstance(bias, fx.Node) and bias.op == "get_attr" and kind != "rowwise":
            b = module.get_parameter(bias.target).detach()
            if kind == "colwise_kv":
                local_b, divisor, _ = _kv_slice(b, 0, tp, rank, arch, bias.target)
            else:
                local_b, divisor = _fused_chunk(b, parts, tp, 0, rank, bias.target), tp
            placements[bias] = Placement((divisor,), owed, parts if kind == "colwise" else 1)
            _replace_param(module, bias.target, local_b)
            report.sharded[bias.target] = (tuple(b.shape), tuple(local_b.shape))
    return placements


def _chunk(t: torch.Tensor, tp: int, dim: int, rank: int, name: str) -> torch.Tensor:
    if t.shape[dim] % tp:
        raise ShardingError(f"{name} has size {t.shape[dim]} on dim {dim}, which tp {tp} does "
                            f"not divide; choose a tp that divides {t.shape[dim]}")
    return t.chunk(tp, dim)[rank]


def _fused_chunk(t, parts, tp, dim, rank, name) -> torch.Tensor:
    """Split ``q|k|v`` into parts, shard each, re-join: rank r holds ``q_r|k_r|v_r``."""
    pieces = [_chunk(p, tp, dim, rank, name) for p in t.chunk(parts, dim)]
    return torch.cat(pieces, dim)  # (3*out/tp, in) Shard(out)


def _kv_slice(t, dim, tp, rank, arch, name) -> tuple[torch.Tensor, int, int]:
    """K/V projection slice: (local tensor, divisor on ``dim``, factor still owed)."""
    kv = getattr(arch, "num_kv_heads", None)
    if kv is None or kv % tp == 0:
        return _chunk(t, tp, dim, rank, name), tp, 1
    if tp % kv:
        raise ShardingError(f"{name}: {kv} KV heads and tp {tp}: tp must divide the KV heads "
                            f"or be a multiple of them (try tp in {_divisors_or_multiples(kv)})")
    group = rank // (tp // kv)  # the KV head this rank's query heads attend with
    head = t.shape[dim] // kv
    return t.narrow(dim, group * head, head), kv, tp // kv  # (head_dim, in) KV head replicated


def _divisors_or_multiples(n: int) -> list[int]:
    return sorted({d for d in range(1, n + 1) if n % d == 0} | {2 * n, 4 * n})


def _replace_param(module: nn.Module, target: str, value: torch.Tensor) -> None:
    path, _, leaf = target.rpartition(".")
    owner = module.get_submodule(path) if path else module
    owner.register_parameter(leaf, nn.Parameter(value.contiguous(), requires_grad=False))


# --------------------------------------------------------------------------- vocab parallel


def _vocab_parallel(module, tp, rank, group_name, arch, report) -> None:
    """Split the token embedding and the LM head by vocabulary rows (module docstring, 5)."""
    vocab = getattr(arch, "vocab_size", None)
    if not vocab:
        return
    rows = -(-vocab // tp)  # c = ceil(V / tp)
    local: dict[str, torch.Tensor] = {}

    def shard(weight: fx.Node) -> bool:
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return False
        w = module.get_parameter(weight.target)
        if weight.target not in local:  # a tied table is split once, by the embedding
            if w.dim() not in (1, 2) or w.shape[0] != vocab or _style_of(weight.target):
                return False
            full = w.detach()
            part = full.new_zeros((rows, *full.shape[1:]))
            lo, hi = rank * rows, min((rank + 1) * rows, vocab)
            if hi > lo:
                part[: hi - lo] = full[lo:hi]
            local[weight.target] = part
            _replace_param(module, weight.target, part)
            report.sharded[weight.target] = (tuple(full.shape), tuple(part.shape))
            report.vocab_parallel.append(weight.target)
        weight.meta["val"] = torch.empty(local[weight.target].shape, dtype=w.dtype, device="meta")
        return True

    for node in list(module.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.embedding.default and shard(node.args[0]):
            _embedding(node, rank * rows, rows, group_name, report)
        elif node.target is aten.linear.default and len(node.args) > 1 and shard(node.args[1]):
            bias = node.args[2] if len(node.args) > 2 else None
            if bias is not None and not shard(bias):
                raise ShardingError(f"LM head {node.name}: its bias must have {vocab} rows too")
            _head(node, tp, rows, vocab, group_name)


def _new(graph, target, args, val, like: fx.Node, kwargs=None) -> fx.Node:
    node = graph.call_function(target, args, kwargs or {})
    node.meta["val"] = val
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = like.meta["nn_module_stack"]
    return node


def _embedding(node, lo: int, rows: int, group_name: str, report) -> None:
    """``E[ids]`` with E split by rows: look up the ids in ``[lo, lo + rows)``, zero the
    others, all-reduce."""
    graph, weight, ids = node.graph, node.args[0], node.args[1]
    ids_val, out_val = ids.meta["val"], node.meta["val"]
    meta = functools.partial(torch.empty, device="meta")
    with graph.inserting_before(node):
        shifted = _new(graph, aten.sub.Tensor, (ids, lo), ids_val, node)
        below = _new(graph, aten.lt.Scalar, (shifted, 0), meta(ids_val.shape, dtype=torch.bool),
                     node)
        above = _new(graph, aten.ge.Scalar, (shifted, rows), below.meta["val"], node)
        outside = _new(graph, aten.bitwise_or.Tensor, (below, above), below.meta["val"], node)
        safe = _new(graph, aten.masked_fill.Scalar, (shifted, outside, 0), ids_val, node)
    node.args = (weight, safe)  # padding_idx only matters for gradients
    users = list(node.users)
    with graph.inserting_after(node):
        mask = _new(graph, aten.unsqueeze.default, (outside, -1),
                    meta((*ids_val.shape, 1), dtype=torch.bool), node)
    with graph.inserting_after(mask):
        zeroed = _new(graph, aten.masked_fill.Scalar, (node, mask, 0.0), out_val, node)
    with graph.inserting_after(zeroed):
        reduced = _new(graph, _c10d.all_reduce.default, (zeroed, "sum", group_name), out_val, node)
    with graph.inserting_after(reduced):
        waited = _new(graph, _c10d.wait_tensor.default, (reduced,), out_val, node)
    for user in users:
        user.replace_input_with(node, waited)
    report.all_reduces += 1


def _head(node, tp: int, rows: int, vocab: int, group_name: str) -> None:
    """``x @ Wᵀ`` with W split by rows: local logits ``(..., c)``, all-gathered along a new
    leading dim, moved back to the last dim, padding dropped."""
    graph, out_val = node.graph, node.meta["val"]
    lead = tuple(out_val.shape[:-1])
    meta = functools.partial(torch.empty, dtype=out_val.dtype, device="meta")
    node.meta["val"] = meta((*lead, rows))
    users = list(node.users)
    n = len(lead)
    steps = [
        (aten.clone.default, lambda c: (c,), (*lead, rows),
         {"memory_format": torch.contiguous_format}),
        (_c10d.all_gather_into_tensor.default, lambda c: (c, tp, group_name),
         (tp * lead[0], *lead[1:], rows), None),
        (_c10d.wait_tensor.default, lambda c: (c,), (tp * lead[0], *lead[1:], rows), None),
        (aten.view.default, lambda c: (c, [tp, *lead, rows]), (tp, *lead, rows), None),
        (aten.permute.default, lambda c: (c, [*range(1, n + 1), 0, n + 1]), (*lead, tp, rows),
         None),
        (aten.reshape.default, lambda c: (c, [*lead, tp * rows]), (*lead, tp * rows), None),
        (aten.slice.Tensor, lambda c: (c, -1, 0, vocab), (*lead, vocab), None),
        (aten.clone.default, lambda c: (c,), (*lead, vocab),
         {"memory_format": torch.contiguous_format}),
    ]
    cur = node
    for target, make, shape, kwargs in steps:
        with graph.inserting_after(cur):
            cur = _new(graph, target, make(cur), meta(shape), node, kwargs)
    for user in users:
        user.replace_input_with(node, cur)


# --------------------------------------------------------------------------- propagation


def _val(node) -> object:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple[int, ...]:
    return tuple(int(s) for s in _val(node).shape)


def _propagate(module, tp, group_name, weights, report, sp=None) -> None:
    graph = module.graph
    places: dict[fx.Node, object] = {}

    def place(arg) -> Placement | None:
        if not isinstance(arg, fx.Node):
            return None
        return places.get(arg)

    for node in list(graph.nodes):
        if getattr(node, "_erased", False):
            continue  # a Conv1D view folded into a reduce-scatter
        if node.op == "output":
            if sp is not None:
                sp.gather_inputs(node, places)
            for arg in _nodes_in(node.args):
                p = place(arg)
                if isinstance(p, Placement) and not p.is_replicate:
                    raise ShardingError(f"stage output {arg.name} is {p}; stage outputs must be "
                                        "replicated (they cross to the next stage)")
            continue
        if node.op == "get_attr" and node in weights:
            places[node] = weights[node]
            continue
        if node.op in ("placeholder", "get_attr"):
            places[node] = _replicated(_val(node))
            continue
        places[node] = _rule(node, place, tp, group_name, places, report, sp)
        if isinstance(places[node], Placement):
            report.placements[node.name] = str(places[node])
    for node, p in places.items():  # shapes in meta (and printed annotations) become local
        if node.graph is graph:
            node.meta["val"] = _local_val(node.meta.get("val"), p)


def _local_val(val, p):
    if isinstance(val, torch.Tensor) and isinstance(p, Placement) and not p.is_replicate:
        shape = [s // d for s, d in zip(val.shape, p.divisors)]
        return torch.empty(shape, dtype=val.dtype, device="meta")
    if isinstance(val, (tuple, list)) and isinstance(p, list):
        return type(val)(_local_val(v, q) for v, q in zip(val, p))
    return val


def _nodes_in(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _replicated(val):
    if isinstance(val, torch.Tensor):
        return Placement.replicate(val.dim())
    if isinstance(val, (tuple, list)):
        return [_replicated(v) for v in val]
    return None


def _error(node: fx.Node, why: str, inputs: Sequence) -> ShardingError:
    shown = ", ".join(f"{a.name}: {p}" for a, p in inputs)
    return ShardingError(f"cannot shard {node.name} ({node.target}): {why} [{shown}]")


def _rule(node, place, tp, group_name, places, report, sp=None):
    target = node.target
    if sp is not None:
        if target in _SEQ_LOCAL:
            sp.slice_replicated(node, places)
        else:
            sp.gather_inputs(node, places)
    inputs = [(a, place(a)) for a in _nodes_in(node.args) + _nodes_in(node.kwargs)]
    sharded = [(a, p) for a, p in inputs if isinstance(p, Placement) and not p.is_replicate]
    if target in _MATMULS:
        return _matmul(node, place, group_name, places, report, sp)
    if not sharded:
        if target is operator.getitem and isinstance(place(node.args[0]), list):
            return place(node.args[0])[node.args[1]]
        return _replicated(_val(node))
    if target in _ELEMENTWISE:
        return _elementwise(node, inputs)
    if target is aten.layer_norm.default:
        p = place(node.args[0])
        if any(d > 1 for d in p.divisors[len(p.divisors) - len(node.args[1]):]):
            raise _error(node, "layer_norm over a sharded dim", sharded)
        return p
    if target is aten.mean.dim:
        p = place(node.args[0])
        dims = {d % len(p.divisors) for d in node.args[1]}
        if any(p.divisors[d] > 1 for d in dims):
            raise _error(node, "reducing over a sharded dim", sharded)
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        divs = tuple(1 if i in dims else d for i, d in enumerate(p.divisors)) if keep else \
            tuple(d for i, d in enumerate(p.divisors) if i not in dims)
        return replace(p, divisors=divs)
    if target in _VIEWS:
        return _view(node, place(node.args[0]))
    if target is aten.expand.default:
        return _expand(node, place(node.args[0]))
    if target is aten.transpose.int:
        p = place(node.args[0])
        a, b = (d % len(p.divisors) for d in node.args[1:3])
        divs = list(p.divisors)
        divs[a], divs[b] = divs[b], divs[a]
        return replace(p, divisors=tuple(divs))
    if target is aten.permute.default:
        p = place(node.args[0])
        return replace(p, divisors=tuple(p.divisors[d] for d in node.args[1]))
    if target is aten.unsqueeze.default:
        p = place(node.args[0])
        d = node.args[1] % (len(p.divisors) + 1)
        return replace(p, divisors=p.divisors[:d] + (1,) + p.divisors[d:])
    if target is aten.slice.Tensor:
        p = place(node.args[0])
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(p.divisors)
        if p.divisors[dim] > 1:
            raise _error(node, f"slicing sharded dim {dim}", sharded)
        return p
    if target is aten.cat.default:
        tensors = node.args[0]
        ps = [place(t) for t in tensors]
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(ps[0].divisors)
        if len({q.divisors for q in ps}) != 1 or ps[0].divisors[dim] > 1:
            raise _error(node, f"cat on dim {dim} needs equal placements, unsharded on dim {dim}",
                         sharded)
        return replace(ps[0], owed=max(q.owed for q in ps))
    if target is aten.split.Tensor:
        return _split(node, place(node.args[0]), sharded)
    if target is operator.getitem and isinstance(place(node.args[0]), list):
        return place(node.args[0])[node.args[1]]
    if target is aten.scaled_dot_product_attention.default:
        q, k, v = (place(a) for a in node.args[:3])
        if not (q.divisors == k.divisors == v.divisors) or q.owed != 1 or k.owed != 1:
            raise _error(node, "query, key and value must be sharded alike on the heads dim",
                         sharded)
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and _shape(mask)[-3] not in (1,) and \
                not place(mask).divisors == q.divisors:
            raise _error(node, "a per-head attention mask must be sharded like the heads", sharded)
        return q
    if target in _METADATA_ONLY:
        return None
    raise _error(node, "no sharding rule for this op on a sharded input; keep this module "
                 "replicated (remove it from TP_PLAN) or add a rule", sharded)



def _elementwise(node, inputs) -> Placement:
    out_shape = _shape(node)
    n = len(out_shape)
    divs = [1] * n
    owed, fused, repeated = 1, 1, False
    tensors = [(a, p) for a, p in inputs if isinstance(p, Placement)]
    seq = any(p.seq for _, p in tensors)
    for _, p in tensors:
        offset = n - len(p.divisors)
        for i, d in enumerate(p.divisors):
            if d > 1:
                if divs[offset + i] not in (1, d):
                    raise _error(node, f"inputs sharded differently on dim {offset + i}", tensors)
                divs[offset + i] = d
        owed, fused, repeated = max(owed, p.owed), max(fused, p.fused), repeated or p.repeated
    for a, p in tensors:
        shape = _shape(a)
        offset = n - len(shape)
        for i, size in enumerate(shape):
            if size != 1 and p.divisors[i] != divs[offset + i]:
                raise _error(node, f"a replicated input meets a sharded one on dim {offset + i}",
                             tensors)
    return Placement(tuple(divs), owed, fused, repeated, seq)


def _view_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims with equal products: (B, T, C) -> (B, T, nh, hs) gives
    ``[([0], [0]), ([1], [1]), ([2], [2, 3])]``."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        a, b, pa, pb = [], [], 1, 1
        if i < len(src):
            a.append(i)
            pa, i = pa * src[i], i + 1
        if j < len(dst):
            b.append(j)
            pb, j = pb * dst[j], j + 1
        while pa != pb:
            if pa < pb and i < len(src):
                a.append(i)
                pa, i = pa * src[i], i + 1
            elif j < len(dst):
                b.append(j)
                pb, j = pb * dst[j], j + 1
            else:
                raise ShardingError(f"view from {list(src)} to {list(dst)} is not a reshape")
        groups.append((a, b))
    return groups


def _view(node, p: Placement) -> Placement:
    src, dst = _shape(node.args[0]), _shape(node)
    divs = [1] * len(dst)
    for a, b in _view_groups(src, dst):
        total = 1
        for d in a:
            total *= p.divisors[d]
        if total == 1:
            continue
        sharded = [d for d in a if p.divisors[d] > 1]
        outer = next(d for d in a if src[d] > 1)
        if (sharded[0] != outer or len(sharded) > 1) and not p.repeated:
            raise _error(node, f"view splits sharded dim {sharded[0]} of {list(src)} into "
                         f"{list(dst)} so that shards are not contiguous", [(node.args[0], p)])
        target = next((d for d in b if dst[d] > 1), b[0])
        if p.fused > 1 and dst[target] != src[outer]:
            raise _error(node, f"reshaping a fused (q|k|v) sharded dim before splitting its "
                         f"{p.fused} parts", [(node.args[0], p)])
        if dst[target] % total:
            raise _error(node, f"size {dst[target]} of dim {target} is not divisible by {total}; "
                         "tp must divide the number of heads", [(node.args[0], p)])
        divs[target] = total
    sizes = list(node.args[1])
    node.args = (node.args[0], [s if s == -1 or d == 1 else s // d for s, d in zip(sizes, divs)])
    return replace(p, divisors=tuple(divs), repeated=False)  # e.g. [B, T, nh/tp, hs]


def _expand(node, p: Placement) -> Placement:
    src, dst = _shape(node.args[0]), _shape(node)
    offset = len(dst) - len(src)
    divs = [1] * offset + list(p.divisors)
    owed, repeated = p.owed, p.repeated
    for j in range(offset, len(dst)):
        if src[j - offset] == 1 and dst[j] > 1 and owed > 1 and dst[j] % owed == 0:
            divs[j], owed, repeated = owed, 1, True  # GQA: pay the KV heads' owed factor here
    sizes = list(node.args[1])
    node.args = (node.args[0], [s if s == -1 or d == 1 else s // d for s, d in zip(sizes, divs)])
    return Placement(tuple(divs), owed, p.fused, repeated)  # (B, kv, rep, T, hs) local


def _split(node, p: Placement, sharded) -> list[Placement]:
    x, size = node.args[0], node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(p.divisors)
    d = p.divisors[dim]
    pieces = -(-_shape(x)[dim] // size)
    if d > 1 and pieces != p.fused:
        raise _error(node, f"splitting sharded dim {dim} into {pieces} pieces; only a fused "
                     f"projection's {p.fused} parts may be split", sharded)
    if d > 1:
        node.args = (x, size // d, *node.args[2:])  # q|k|v: (B, T, C/tp) Shard(-1) each
    return [replace(p, fused=1)] * pieces


def _matmul(node, place, group_name, places, report, sp=None) -> Placement:
    x_arg, w_arg, b_arg, out_dim = _MATMULS[node.target]
    x, w = node.args[x_arg], node.args[w_arg]
    bias = node.args[b_arg] if len(node.args) > b_arg else None
    px, pw = place(x), place(w)
    in_dim = 1 - out_dim
    x_in, w_in, w_out = px.divisors[-1], pw.divisors[in_dim], pw.divisors[out_dim]
    if x_in == 1 and w_in == 1:
        return Placement(px.divisors[:-1] + (w_out,), max(px.owed, pw.owed), pw.fused)
    if x_in == w_in and w_out == 1 and px.owed == 1:
        if sp is not None:
            return sp.reduce_scatter(node, x, w, bias, places, report)
        _insert_all_reduce(node, x, w, bias, group_name, places)
        report.all_reduces += 1
        return Placement.replicate(len(px.divisors))
    raise _error(node, f"input sharded {x_in}-way on its last dim against a weight sharded "
                 f"{w_in}-way on its input dim", [(x, px), (w, pw)])


def _insert_all_reduce(node, x, w, bias, group_name, places) -> None:
    """``y = x @ w + b`` with x, w sharded on the contracted dim: y = all_reduce(x @ w) + b."""
    graph = node.graph
    users = list(node.users)
    val = node.meta.get("val")
    with graph.inserting_after(node):
        if node.target is aten.addmm.default:
            partial = graph.call_function(aten.mm.default, (x, w))  # (BT, out) Partial
        else:
            node.args = (x, w)  # bias added once, after the sum
            partial = node
        with graph.inserting_after(partial):
            reduced = graph.call_function(_c10d.all_reduce.default, (partial, "sum", group_name))
        with graph.inserting_after(reduced):
            waited = graph.call_function(_c10d.wait_tensor.default, (reduced,))  # Replicate
        out = waited
        if bias is not None:
            with graph.inserting_after(waited):
                out = graph.call_function(aten.add.Tensor, (waited, bias))
    for new in {partial, reduced, waited, out}:
        new.meta["val"] = val
        new.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack"))
        places[new] = Placement.replicate(val.dim())
    for user in users:
        user.replace_input_with(node, out)
    if partial is not node:
        graph.erase_node(node)


# --------------------------------------------------------------------------- sequence parallel

# Ops that run on a sequence shard as they are (rows of the sequence are independent).
_SEQ_LOCAL = _ELEMENTWISE | {aten.layer_norm.default, aten.mean.dim} | _METADATA_ONLY


class _SeqParallel:
    """Sequence parallelism (Megatron-style) over ``[B, T, C]`` activations.

    A row-parallel matmul's partial sum is reduce-scattered along T (``ShardSeq(1)``),
    ops in ``_SEQ_LOCAL`` (residual add, dropout, norms) run on the local T / tp rows, a
    replicated operand of such an op is sliced to this rank's rows, and any other op (the
    next matmul, a view, the stage output) gets the sequence all-gathered first. The
    functional collectives work on dim 0, so T is moved to the front around them.
    """

    def __init__(self, tp: int, rank: int, group_name: str) -> None:
        self.tp, self.rank, self.group_name = tp, rank, group_name
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.sliced: dict[fx.Node, fx.Node] = {}
        self.reduce_scatters = self.all_gathers = 0

    def _call(self, graph, target, args, val, places, placement, kwargs=None):
        node = graph.call_function(target, args, kwargs or {})
        node.meta["val"] = val
        places[node] = placement
        for arg in _nodes_in(args):  # keep the module path of what it works on
            if "nn_module_stack" in arg.meta:
                node.meta.setdefault("nn_module_stack", arg.meta["nn_module_stack"])
        return node

    def gather_inputs(self, node: fx.Node, places) -> None:
        """All-gather every sequence-sharded input of ``node`` (once per value)."""
        for arg in _nodes_in(node.args) + _nodes_in(node.kwargs):
            p = places.get(arg)
            if not (isinstance(p, Placement) and p.seq):
                continue
            if arg not in self.gathered:
                self.gathered[arg] = self._gather(arg, p, places)
            node.replace_input_with(arg, self.gathered[arg])

    def _gather(self, x: fx.Node, p: Placement, places) -> fx.Node:
        graph, val = x.graph, x.meta["val"]
        dim = p.divisors.index(self.tp)
        rep = Placement.replicate(val.dim())
        front = [dim] + [d for d in range(val.dim()) if d != dim]
        back = [front.index(d) for d in range(val.dim())]
        moved_val = val.permute(front)
        with graph.inserting_after(x):
            moved = self._call(graph, aten.permute.default, (x, front), moved_val, places,
                               replace(p, divisors=tuple(p.divisors[d] for d in front)))
        with graph.inserting_after(moved):
            packed = self._call(graph, aten.clone.default, (moved,), moved_val, places,
                                places[moved], {"memory_format": torch.contiguous_format})
        with graph.inserting_after(packed):
            gathered = self._call(graph, _c10d.all_gather_into_tensor.default,
                                  (packed, self.tp, self.group_name), moved_val, places, rep)
        with graph.inserting_after(gathered):
            waited = self._call(graph, _c10d.wait_tensor.default, (gathered,), moved_val,
                                places, rep)
        with graph.inserting_after(waited):
            restored = self._call(graph, aten.permute.default, (waited, back), val, places, rep)
        with graph.inserting_after(restored):
            out = self._call(graph, aten.clone.default, (restored,), val, places, rep,
                             {"memory_format": torch.contiguous_format})
        self.all_gathers += 1
        return out

    def slice_replicated(self, node: fx.Node, places) -> None:
        """For an op mixing sequence shards and replicated values: slice the replicated
        operands (with the full T on the sequence dim) to this rank's rows."""
        args = _nodes_in(node.args) + _nodes_in(node.kwargs)
        shards = [places[a] for a in args if isinstance(places.get(a), Placement)
                  and places[a].seq]
        if not shards or not isinstance(_val(node), torch.Tensor):
            return
        out = _shape(node)
        seq_dim = len(out) - len(shards[0].divisors) + shards[0].divisors.index(self.tp)
        for arg in args:
            p = places.get(arg)
            if not isinstance(p, Placement) or p.seq or not p.is_replicate:
                continue
            shape = _shape(arg)
            dim = seq_dim - (len(out) - len(shape))
            if dim < 0 or shape[dim] == 1:
                continue  # broadcast over the sequence: nothing to slice
            if arg not in self.sliced:
                size = shape[dim] // self.tp
                divs = [1] * len(shape)
                divs[dim] = self.tp
                with node.graph.inserting_before(node):
                    self.sliced[arg] = self._call(
                        node.graph, aten.slice.Tensor,
                        (arg, dim, self.rank * size, (self.rank + 1) * size),
                        arg.meta["val"], places, Placement(tuple(divs), seq=True))
            node.replace_input_with(arg, self.sliced[arg])

    def reduce_scatter(self, node, x, w, bias, places, report) -> Placement:
        """``y = x @ w + b`` with x, w sharded on the contracted dim: reduce-scatter the
        partial sum along the sequence, then add the bias to the local rows."""
        graph, users = node.graph, list(node.users)
        val = node.meta["val"]
        target3d = None
        if node.target is aten.addmm.default:  # HF Conv1D: (B*T, C), viewed to (B, T, C)
            views = [u for u in users if u.target in _VIEWS and len(_shape(u)) == 3]
            if len(users) != 1 or not views:
                raise ShardingError(f"sequence parallelism: {node.name} (addmm) must be "
                                    "followed by one view to (B, T, C)")
            target3d = views[0]
            shape3 = list(_shape(target3d))
        elif val.dim() != 3:
            raise ShardingError(f"sequence parallelism needs (B, T, C) activations; {node.name} "
                                f"gives {list(val.shape)}")
        else:
            shape3 = list(val.shape)
        if shape3[1] % self.tp:
            raise ShardingError(f"sequence parallelism: sequence length {shape3[1]} is not "
                                f"divisible by tp {self.tp}")
        val3 = torch.empty(shape3, dtype=val.dtype, device="meta")
        moved_val = val3.transpose(0, 1)
        seq = Placement((1, self.tp, 1), seq=True)
        seq_front = Placement((self.tp, 1, 1), seq=True)
        rep = Placement.replicate(3)
        with graph.inserting_after(node):
            if node.target is aten.addmm.default:
                mm = self._call(graph, aten.mm.default, (x, w), val, places,
                                Placement.replicate(2))
            else:
                node.args = (x, w)
                mm = node
        cur = mm
        steps = []
        if node.target is aten.addmm.default:
            steps.append((aten.view.default, lambda c: (c, shape3), val3, rep, None))
        steps += [
            (aten.transpose.int, lambda c: (c, 0, 1), moved_val, rep, None),
            (aten.clone.default, lambda c: (c,), moved_val, rep,
             {"memory_format": torch.contiguous_format}),
            (_c10d.reduce_scatter_tensor.default,
             lambda c: (c, "sum", self.tp, self.group_name), moved_val, seq_front, None),
            (_c10d.wait_tensor.default, lambda c: (c,), moved_val, seq_front, None),
            (aten.transpose.int, lambda c: (c, 0, 1), val3, seq, None),
        ]
        for target, make, v, placement, kwargs in steps:
            with graph.inserting_after(cur):
                cur = self._call(graph, target, make(cur), v, places, placement, kwargs)
        if bias is not None:
            with graph.inserting_after(cur):
                cur = self._call(graph, aten.add.Tensor, (cur, bias), val3, places, seq)
        if target3d is not None:  # the Conv1D's own view becomes the identity on (B, T/tp, C)
            target3d.replace_all_uses_with(cur)
            graph.erase_node(target3d)
            graph.erase_node(node)
        else:
            for user in users:
                user.replace_input_with(node, cur)
        self.reduce_scatters += 1
        return Placement.replicate(val.dim())  # of ``node``: the partial sum (or erased)

"""Tensor parallelism from the graph: placements, rules per aten op, strategies, analysis.

This module decides how one tensor-parallel group of ``tp`` ranks runs a piece of an ATen
graph, and nothing else: it never edits a graph. ``codegen.tensor_parallel`` applies what
it returns; the cost model prices it (``cost_models.sharded.ShardedLayer``); the plan
records it. One function, ``propagate``, computes for a choice of parameter placements the
placement of every value, the local shape arguments of every shape op, and the exact
collectives; the same call serves the planner's choice and codegen's rewrite, so what is
priced, recorded and run cannot differ.

**Placements** (DTensor's vocabulary on a 1-D mesh):

- ``Replicate()``: every rank holds the whole value;
- ``Partial()``: every rank holds a summand (a row-parallel matmul); reduced where it is
  produced (all-reduce, or reduce-scatter along the sequence under sequence parallelism);
- ``Shard(dim, blocks)``: the dim is a concatenation of blocks ``(size, split)``; rank
  ``r`` holds, for each block in order, its ``r``-th of ``tp`` equal pieces when ``split``
  and the whole block otherwise. ``Shard(d, ((n, True),))`` is DTensor's ``Shard(d)``;
  equal split blocks are its ``_StridedShard``; unequal blocks are the fused ``q|k|v``
  projection under GQA (``(64, 32, 32)``); an unsplit block is a part every rank keeps
  whole (the K and V heads of a multi-query projection).

**Rules** are functions registered by aten overload packet (``_RULES``); each reads the
placements of a node's inputs, may request conversions of them (``_Walk.convert``) and
returns the output placement. Ops whose inputs are all replicated need no rule. An op with
no rule, or a rule that cannot keep a shard, gathers its sharded inputs (all-gather) and
computes replicated: a priced fallback, never an exception.

**Strategies** come from structure: every parameter consumed by a matmul-like op may be
column-sharded (its output dim, in the blocks its consumers cut the output into),
row-sharded (its input dim, when the activation arrives sharded on the contracted dim) or
replicated; a parameter consumed by an embedding may be split by rows (vocab parallel).
``choose`` tries the greedy Megatron-style strategy (shard every parameter it can, reduce
every partial sum where it is produced), the strategy without any fallback gather (the
parameters whose shards reach a gather are replicated, repeatedly) and full replication,
and keeps the cheapest under the caller's price.

>>> import torch, planner
>>> from planner.models import load_model
>>> lm = load_model("llama-tiny", batch_size=1, seq_len=8)
>>> traced = planner.trace(lm.model, lm.args, lm.kwargs)
>>> result = analyse_layer(traced, 1, tp=2)
>>> [(c.kind, c.bytes) for c in result.collectives]
[('all_reduce', 2048), ('all_reduce', 2048)]
>>> str(result.params["model.layers.0.self_attn.q_proj.weight"])
'S(0)'
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from cost_models.sharded import ShardedLayer

__all__ = [
    "Replicate", "Partial", "Shard", "Placement", "REPLICATE", "PARTIAL", "Collective",
    "NodePlan", "Analysis", "propagate", "analyse_layer", "choose", "local_shape",
    "local_fraction", "placement_to_json", "placement_from_json", "LayerRecord",
    "TemplateSharding", "StageSharding", "analyse_stage", "hidden_values", "to_sharded",
    "same_params", "greedy_stage_sharding", "block_state",
]

aten = torch.ops.aten
_MAX_FLIPS = 12


# --------------------------------------------------------------------------- placements


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Summands on each rank (``Partial("sum")``)."""

    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    """``dim`` is a concatenation of ``blocks`` ``(global size, split)``."""

    dim: int
    blocks: tuple[tuple[int, bool], ...]

    @property
    def size(self) -> int:
        return sum(s for s, _ in self.blocks)

    @property
    def plain(self) -> bool:
        return len(self.blocks) == 1 and self.blocks[0][1]

    def local(self, tp: int) -> int:
        return sum(s // tp if split else s for s, split in self.blocks)

    def at(self, dim: int) -> Shard:
        return Shard(dim, self.blocks)

    def pieces(self, tp: int, rank: int) -> list[tuple[int, int]]:
        """``(global start, length)`` of this rank's pieces along ``dim``, in local order."""
        out, start = [], 0
        for size, split in self.blocks:
            if split:
                out.append((start + rank * (size // tp), size // tp))
            else:
                out.append((start, size))
            start += size
        return out

    def __str__(self) -> str:
        if self.plain:
            return f"S({self.dim})"
        parts = "|".join(f"{s}" if split else f"{s}r" for s, split in self.blocks)
        return f"S({self.dim},[{parts}])"


Placement = Replicate | Partial | Shard
REPLICATE = Replicate()
PARTIAL = Partial()


def shard(dim: int, size: int) -> Shard:
    return Shard(dim, ((size, True),))


def _normal(blocks: Iterable[tuple[int, bool]]) -> tuple[tuple[int, bool], ...]:
    """Merge neighbouring unsplit blocks (the same layout either way)."""
    out: list[tuple[int, bool]] = []
    for size, split in blocks:
        if out and not split and not out[-1][1]:
            out[-1] = (out[-1][0] + size, False)
        else:
            out.append((size, split))
    return tuple(out)


def _make_shard(dim: int, blocks: Iterable[tuple[int, bool]]) -> Placement:
    blocks = _normal(blocks)
    return Shard(dim, blocks) if any(split for _, split in blocks) else REPLICATE


def local_shape(shape: Sequence[int], p, tp: int) -> tuple[int, ...]:
    out = list(shape)
    if isinstance(p, Shard):
        out[p.dim] = p.local(tp)
    return tuple(out)


def local_fraction(shape: Sequence[int], p, tp: int) -> float:
    if isinstance(p, Shard) and shape[p.dim]:
        return p.local(tp) / shape[p.dim]
    return 1.0


def placement_to_json(p) -> dict:
    if isinstance(p, Shard):
        out = {"dim": p.dim, "blocks": [s for s, _ in p.blocks]}
        whole = [i for i, (_, split) in enumerate(p.blocks) if not split]
        if whole:
            out["replicated_blocks"] = whole
        return out
    return {"replicate": True}


def placement_from_json(d: dict) -> Placement:
    if d.get("replicate"):
        return REPLICATE
    whole = set(d.get("replicated_blocks", ()))
    return Shard(int(d["dim"]), tuple((int(s), i not in whole) for i, s in enumerate(d["blocks"])))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Collective:
    """One collective of a tensor-parallel group.

    Attributes:
        kind: ``all_reduce``, ``all_gather`` or ``reduce_scatter``.
        bytes: of the whole (global) tensor at the analysed shape.
        value: the fx node whose value it converts.
        after: where, readably: ``<module path relative to the layer>:<op>``.
        reason: ``reduce`` (a partial sum), ``gather`` (a rule needs it whole: the
            fallback), ``sequence`` (sequence parallelism gathers before a matmul),
            ``boundary`` (a layer or stage output must be whole).
        algorithm: how the cost model priced it, where it chose: NCCL's
            ``"<algorithm>/<protocol>"`` on GPUs (``cost_models.nccl``); ``""`` otherwise.
    """

    kind: str
    bytes: int
    value: str
    after: str
    reason: str
    batched: bool = True  # the tensor's leading dim is the batch (its bytes scale with it)
    algorithm: str = ""

    def scaled(self, ratio: float) -> Collective:
        """The same collective for a batch ``ratio`` times the analysed one."""
        nbytes = int(round(self.bytes * ratio)) if self.batched else self.bytes
        return Collective(self.kind, nbytes, self.value, self.after, self.reason, self.batched)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "bytes": self.bytes, "after": self.after}
        if self.algorithm:
            out["algorithm"] = self.algorithm
        return out


@dataclass
class NodePlan:
    """What codegen does at one node.

    Attributes:
        placement: of the node's output (a tuple for multi-output ops) before ``post``.
        inputs: arg node name -> placement the arg must be converted to first.
        args: rewritten positional args (local sizes), or ``None`` to keep them.
        post: the placement the output is converted to right after the node (a partial
            sum reduced, a boundary value gathered or sliced); ``None`` when unchanged.
        bias_after_reduce: a row-parallel matmul's bias, added after the reduction.
        vocab: the embedding's table is split by rows: mask ids outside this rank's rows.
    """

    placement: object
    inputs: dict[str, Placement] = field(default_factory=dict)
    args: tuple | None = None
    post: Placement | None = None
    bias_after_reduce: bool = False
    vocab: bool = False


@dataclass
class Analysis:
    """Placements of every node of one piece of graph under one parameter strategy.

    Attributes:
        tp, sequence_parallel: the group's degree and whether sequence parallelism is on.
        params: parameter target -> placement (every parameter the nodes read).
        nodes: node name -> ``NodePlan``.
        collectives: every collective, in graph order.
        fallbacks: node names whose sharded inputs had to be gathered (no rule kept them).
        guilty: parameters whose shards reached a fallback gather.
        param_bytes: local bytes of the parameters read, by target.
        work: node name -> (op class, global flops, local flops, global activation bytes,
            local activation bytes, global weight bytes, local weight bytes).
        kv_fraction: local share of the keys/values attention reads (1 when replicated).
        state: state input (a decode step's KV cache, ``planner.decode``) -> placement: the
            layout each rank keeps its piece of the cache in (it never crosses a cut and is
            never gathered).
        state_bytes: local bytes of each state input.
    """

    tp: int
    sequence_parallel: bool
    params: dict[str, Placement]
    nodes: dict[str, NodePlan]
    collectives: list[Collective]
    fallbacks: list[str]
    guilty: set[str]
    param_bytes: dict[str, int]
    work: dict[str, tuple]
    kv_fraction: float = 1.0
    state: dict[str, Placement] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def sharded_params(self) -> list[str]:
        return [t for t, p in self.params.items() if isinstance(p, Shard)]


@dataclass(frozen=True)
class LayerRecord:
    """One layer's chosen strategy at one tp, as the plan records it.

    Attributes:
        template: key shared by the layers whose strategy is the same (a layer group).
        params: sharded parameters only, relative to the layer's module path for blocks.
        collectives: per microbatch of the plan's workload (bytes scaled to its tokens).
        strategy: the candidate chosen.
    """

    template: int
    params: dict[str, Placement]
    collectives: tuple[Collective, ...]
    strategy: str


# --------------------------------------------------------------------------- helpers


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node) -> tuple[int, ...]:
    v = _val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else ()


def _is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(_val(node), torch.Tensor)


def _nbytes(node) -> int:
    v = _val(node)
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))
    return 0


def _packet(node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _module_path(node, prefix: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    for value in stack.values():
        p = value[0] if isinstance(value, tuple) else str(value)
        path = p
    path = path.removeprefix("L['self'].").removeprefix("L__self__.")
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return path


def _view_groups(src: Sequence[int], dst: Sequence[int]):
    """Pair runs of dims with equal products: ``(B, T, C) -> (B, T, nh, hs)`` gives
    ``[([0], [0]), ([1], [1]), ([2], [2, 3])]``; ``None`` if not a reshape."""
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
                return None
        groups.append((a, b))
    return groups


def _flat_blocks(shape, p: Shard, dims: list[int]) -> list[tuple[int, bool]] | None:
    """The blocks of ``p`` in the flattened index space of ``dims`` (one run of dims)."""
    outer = math.prod(shape[d] for d in dims if d < p.dim)
    inner = math.prod(shape[d] for d in dims if d > p.dim)
    return [(s * inner, split) for s, split in p.blocks] * outer


def _unflat(flat, shape, dims: list[int], tp: int):
    """A dim of ``dims`` (in ``shape``) whose shard reproduces the flat blocks, and its
    blocks; ``None`` when no single dim can."""
    for t in dims:
        if shape[t] == 1:
            continue
        outer = math.prod(shape[d] for d in dims if d < t)
        inner = math.prod(shape[d] for d in dims if d > t)
        chunk = shape[t] * inner
        pattern, ok = None, True
        blocks = list(flat)
        for _ in range(outer):
            taken, total = [], 0
            while total < chunk and blocks:
                taken.append(blocks.pop(0))
                total += taken[-1][0]
            if total != chunk:
                ok = False
                break
            if pattern is None:
                pattern = taken
            elif taken != pattern:
                ok = False
                break
        if not ok or blocks or pattern is None:
            continue
        if any(s % inner for s, _ in pattern):
            continue
        local = [(s // inner, split) for s, split in pattern]
        if any(split and s % tp for s, split in local):
            continue
        if any(split and (s // tp) * inner % 1 for s, split in local):
            continue
        return t, tuple(local)
    return None


# --------------------------------------------------------------------------- the walk


class _Pending:
    """A parameter (or a transpose of one) whose placement its consumer decides."""

    def __init__(self, param: fx.Node, perm: tuple[int, ...]):
        self.param, self.perm = param, perm


class _Walk:
    """One pass over nodes in graph order (see ``propagate``)."""

    def __init__(self, gm, nodes, tp, *, sequence_parallel, strategy, allowed, inputs,
                 boundary, prefix, state=()):
        self.gm, self.tp, self.sp = gm, tp, sequence_parallel
        self.state = set(state)  # state inputs (KV caches): placed by their first consumer
        self.state_out: set[str] = set()  # their updated copies: kept as they are
        self.strategy = strategy  # target -> placement (fixed) or None (decide)
        self.allowed = allowed  # targets that may be sharded when deciding
        self.nodes = nodes
        self.inputs = inputs
        self.boundary = boundary  # name -> placement its producer must convert to
        self.prefix = prefix
        self.place: dict[str, object] = {}
        self.prov: dict[str, frozenset] = {}
        self.plans: dict[str, NodePlan] = {}
        self.params: dict[str, Placement] = {}
        self.collectives: list[Collective] = []
        self.converted: dict[tuple[str, Placement], Placement] = {}
        self.fallbacks: list[str] = []
        self.guilty: set[str] = set()
        self.kv: list[float] = []
        self._cur: fx.Node | None = None
        self.batch: int | None = None  # the traced batch and sequence (for ``batched``)
        self.seq: int | None = None

    # ----------------------------------------------------------------- placements

    def p(self, node):
        if not isinstance(node, fx.Node):
            return REPLICATE
        if node.name not in self.place:
            self.place[node.name] = self.inputs.get(node.name, REPLICATE)
        return self.place[node.name]

    def param(self, node) -> _Pending | None:
        """The undecided parameter behind ``node`` (through 2-D transposes)."""
        place = self.p(node)
        return place if isinstance(place, _Pending) else None

    def decide(self, pending: _Pending, placement: Placement) -> Placement:
        """Fix a parameter's placement (given in the consumer's view of it)."""
        target = self.key(pending.param.target)
        if target in self.params:
            chosen = self.params[target]
        else:
            fixed = self.fixed(target)
            if fixed != "decide":
                chosen = fixed
            elif not ({target, pending.param.target} & (self.allowed | self.state)) or \
                    not isinstance(placement, Shard):
                chosen = REPLICATE
            else:
                chosen = Shard(pending.perm[placement.dim], placement.blocks)
            self.params[target] = chosen
        return _permute(chosen, pending.perm)

    def key(self, target: str) -> str:
        """One name per parameter tensor (a tied table is fetched as ``wte.weight`` and as
        ``lm_head.weight``): its placement is decided once, for every name."""
        return _aliases(self.gm).get(target, (target,))[0]

    def fixed(self, target: str):
        """The strategy's placement for a parameter under any of its names, or "decide"."""
        if not self.strategy:
            return "decide"
        for name in _aliases(self.gm).get(target, (target,)):
            if name in self.strategy:
                return self.strategy[name]
        return "decide"

    def resolve(self, node) -> Placement:
        """The placement of an input, deciding a pending parameter as replicated."""
        place = self.p(node)
        if isinstance(place, _Pending):
            place = self.decide(place, REPLICATE)
            self.place[node.name] = place
        return place

    # ----------------------------------------------------------------- conversions

    def convert(self, node: fx.Node, arg: fx.Node, target: Placement, reason: str) -> Placement:
        """Request ``arg`` as ``target`` for ``node``; record the collective it needs."""
        have = self.resolve(arg)
        if have == target:
            return target
        plan = self.plans.setdefault(node.name, NodePlan(None))
        plan.inputs[arg.name] = target
        key = (arg.name, target)
        if key not in self.converted:
            self.converted[key] = target
            self._record(arg, have, target, reason)
            if isinstance(have, Shard) and reason in ("gather", "boundary"):
                self.guilty |= self.prov.get(arg.name, frozenset())
                if reason == "gather" and node.name not in self.fallbacks:
                    self.fallbacks.append(node.name)
        return target

    def _record(self, value: fx.Node, have, target, reason: str) -> None:
        after = f"{_module_path(value, self.prefix)}:{_packet(value)}".lstrip(":")
        nbytes = _nbytes(value)
        shape = _shape(value)
        batched = self.batch is None or (bool(shape) and shape[0] in (
            self.batch, self.batch * (self.seq or 1)))
        if isinstance(have, Partial):
            kind = "reduce_scatter" if isinstance(target, Shard) else "all_reduce"
            self.collectives.append(Collective(kind, nbytes, value.name, after, "reduce",
                                               batched))
        elif isinstance(have, Shard) and target != have:
            self.collectives.append(Collective("all_gather", nbytes, value.name, after, reason,
                                               batched))

    def gather(self, node: fx.Node, args: Iterable) -> None:
        for a in args:
            if _is_tensor(a) and not isinstance(self.resolve(a), Replicate):
                self.convert(node, a, REPLICATE, "gather")

    # ----------------------------------------------------------------- the pass

    def run(self) -> None:
        for node in self.nodes:
            self._cur = node
            if node.op == "placeholder" and node.name in self.state:
                fixed = self.fixed(node.name)
                if fixed != "decide":
                    self.params[node.name] = fixed
                    self.place[node.name] = fixed
                else:
                    self.place[node.name] = _Pending(node, tuple(range(len(_shape(node)))))
            elif node.op == "placeholder":
                self.place[node.name] = self.inputs.get(node.name, REPLICATE)
            elif node.op == "get_attr":
                val = _val(node)
                is_param = isinstance(val, torch.Tensor) and _is_parameter(self.gm, node.target)
                if is_param and val.dim() >= 1:
                    target = self.key(node.target)
                    fixed = self.fixed(target)
                    if target in self.params:
                        self.place[node.name] = self.params[target]
                    elif fixed != "decide":
                        self.params[target] = fixed
                        self.place[node.name] = fixed
                    else:
                        self.place[node.name] = _Pending(node, tuple(range(val.dim())))
                else:
                    self.place[node.name] = REPLICATE
            elif node.op == "output":
                for a in _tensor_args(node):
                    if a.name in self.state_out:
                        continue
                    if not isinstance(self.resolve(a), Replicate):
                        self.convert(node, a, REPLICATE, "boundary")
                continue
            elif node.op == "call_function":
                self._call(node)
            else:  # call_module / call_method: no rule, run replicated
                self.gather(node, _tensor_args(node))
                self.place[node.name] = REPLICATE
            self._post(node)
        # parameters fetched but never decided (unused or only by replicated ops), and the
        # transposes of parameters, once their consumer decided
        for node in self.nodes:
            place = self.place.get(node.name)
            if isinstance(place, _Pending):
                target = self.key(place.param.target)
                if target not in self.params:
                    self.params[target] = REPLICATE
                self.place[node.name] = _permute(self.params[target], place.perm)
                if node.name in self.plans:
                    self.plans[node.name].placement = self.place[node.name]
        # every name a parameter was fetched under carries its placement
        for node in self.nodes:
            if node.op == "get_attr" and self.key(node.target) in self.params:
                self.params.setdefault(node.target, self.params[self.key(node.target)])

    def _call(self, node: fx.Node) -> None:
        args = _tensor_args(node)
        places = [self.p(a) for a in args]
        plan = self.plans.setdefault(node.name, NodePlan(None))
        if all(isinstance(p, Replicate) for p in places):
            out = _replicated(node)
        else:
            rule = _RULES.get(_packet(node))
            if rule is None and isinstance(node.target, torch._ops.OpOverload) and (
                    torch.Tag.pointwise in node.target.tags):
                rule = _pointwise
            out = rule(self, node) if rule is not None else None
            if out is None:  # no rule kept the shards: gather, compute replicated
                self.gather(node, args)
                plan.args = None
                out = _replicated(node)
        plan.placement = out
        self.place[node.name] = out
        prov = frozenset().union(*(self.prov.get(a.name, frozenset()) for a in args)) if args \
            else frozenset()
        if prov and not isinstance(out, (Replicate, Partial)):
            self.prov[node.name] = self.prov.get(node.name, frozenset()) | prov

    def _post(self, node: fx.Node) -> None:
        """Reduce a partial sum where it is produced; make a boundary value whole (or
        sequence-sharded) where it leaves the piece of graph."""
        place = self.place.get(node.name)
        want = self.boundary.get(node.name)
        if isinstance(place, Partial):
            if want is None:
                want = self._reduced(node)
            self._set_post(node, place, want, "reduce")
        elif want is not None and isinstance(place, (Replicate, Shard)) and place != want:
            self._set_post(node, place, want, "boundary")

    def _reduced(self, node) -> Placement:
        shape = _shape(node)
        if self.sp and len(shape) == 3 and node.name not in self.boundary and \
                shape[1] % self.tp == 0 and shape[1] > 1:
            return shard(1, shape[1])  # sequence parallelism: reduce-scatter over T
        return REPLICATE

    def _set_post(self, node, have, want, reason) -> None:
        plan = self.plans.setdefault(node.name, NodePlan(have))
        plan.post = want
        self._record(node, have, want, reason)
        if isinstance(have, Shard) and reason == "boundary":
            self.guilty |= self.prov.get(node.name, frozenset())
        self.place[node.name] = want
        if isinstance(have, Partial) or not isinstance(want, Shard):
            self.prov.pop(node.name, None)


def _is_parameter(gm, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _tensor_args(node) -> list[fx.Node]:
    out = []
    for a in node.all_input_nodes:
        if isinstance(_val(a), (torch.Tensor, list, tuple)) or a.op == "get_attr":
            out.append(a)
    return out


def _replicated(node):
    v = _val(node)
    if isinstance(v, (list, tuple)):
        return tuple(REPLICATE for _ in v)
    return REPLICATE


def _permute(p, perm: tuple[int, ...]):
    """A parameter's placement seen through a permutation of its dims (view dim i is
    parameter dim ``perm[i]``)."""
    if isinstance(p, Shard):
        return p.at(perm.index(p.dim))
    return p


# --------------------------------------------------------------------------- rules


def _pointwise(w: _Walk, node: fx.Node):
    """Elementwise with broadcasting: the shards must agree; replicated operands are
    sliced locally to the shard (no communication)."""
    out_shape = _shape(node)
    if not out_shape and not isinstance(_val(node), torch.Tensor):
        return None
    nd = len(out_shape)
    target = None
    for a in _tensor_args(node):
        pa = w.resolve(a)
        if isinstance(pa, Shard):
            aligned = pa.at(pa.dim + nd - len(_shape(a)))
            if target is None:
                target = aligned
            elif aligned != target:
                return None
    if target is None:
        return REPLICATE
    for a in _tensor_args(node):
        shape = _shape(a)
        d = target.dim - (nd - len(shape))
        pa = w.resolve(a)
        if d < 0 or shape[d] == 1:
            if isinstance(pa, Shard):
                return None
            continue
        if not _slice_to(w, node, a, target.at(d)):
            return None
    return target


def _slice_to(w: _Walk, node: fx.Node, a: fx.Node, want: Placement) -> bool:
    """Request operand ``a`` of ``node`` as ``want``: a replicated operand is sliced
    locally (no communication); False when it is sharded some other way."""
    have = w.resolve(a)
    if have == want:
        return True
    if isinstance(have, Shard):
        return False
    w.convert(node, a, want, "slice")
    return True


def _unary(w: _Walk, node: fx.Node):
    """Ops that keep the layout of their first input (copies, dtype casts, dropout)."""
    x = node.args[0]
    others = [a for a in _tensor_args(node) if a is not x]
    if any(not isinstance(w.resolve(a), Replicate) for a in others):
        return None
    return w.resolve(x)


def _dims_of(node, i, name, ndim, default=None) -> list[int] | None:
    d = _arg(node, i, name, default)
    if d is None:
        return None
    d = [d] if isinstance(d, int) else list(d)
    return [x % ndim for x in d] if ndim else d


def _reduction(dim_index: int, keepdim_index: int | None, default_dims=None):
    def rule(w: _Walk, node: fx.Node):
        x = node.args[0]
        px = w.resolve(x)
        if not isinstance(px, Shard) or any(
                not isinstance(w.resolve(a), Replicate) for a in _tensor_args(node)[1:]):
            return None
        nd = len(_shape(x))
        dims = _dims_of(node, dim_index, "dim", nd, default_dims)
        if dims is None:  # a full reduction
            return None
        if px.dim in dims:
            return None
        keep = bool(_arg(node, keepdim_index, "keepdim", False)) if keepdim_index else True
        out_dim = px.dim if keep else px.dim - sum(1 for d in dims if d < px.dim)
        v = _val(node)
        if isinstance(v, (list, tuple)):
            return tuple(px.at(out_dim) if isinstance(t, torch.Tensor) and t.dim() == nd - (
                0 if keep else len(dims)) else REPLICATE for t in v)
        return px.at(out_dim)
    return rule


def _norm(w: _Walk, node: fx.Node):
    """layer_norm / rms_norm over the last dims: the shard must be outside them."""
    x = node.args[0]
    px = w.resolve(x)
    normalized = node.args[1]
    nd = len(_shape(x))
    if not isinstance(px, Shard) or px.dim >= nd - len(normalized):
        return None
    for a in _tensor_args(node)[1:]:
        if not isinstance(w.resolve(a), Replicate):
            return None
    v = _val(node)
    if isinstance(v, (list, tuple)):  # native_layer_norm: (out, mean, rstd)
        return tuple(px if i == 0 else px.at(px.dim) for i, _ in enumerate(v))
    return px


def _view(w: _Walk, node: fx.Node):
    """view / reshape / _unsafe_view / flatten / unflatten through the dim-map algebra."""
    x = node.args[0]
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    src, dst = _shape(x), _shape(node)
    groups = _view_groups(src, dst)
    if groups is None:
        return None
    for a, b in groups:
        if px.dim in a:
            flat = _flat_blocks(src, px, a)
            found = _unflat(flat, dst, b, w.tp)
            if found is None:
                return None
            t, blocks = found
            out = Shard(t, blocks)
            _localise_sizes(w, node, dst, out)
            return out
    return None


def _localise_sizes(w: _Walk, node: fx.Node, dst, out: Shard) -> None:
    """Rewrite the literal size of the sharded dim in a shape argument."""
    plan = w.plans.setdefault(node.name, NodePlan(None))
    name = _packet(node)
    if name in ("view", "reshape", "_unsafe_view", "expand"):
        sizes = list(node.args[1])
        offset = len(sizes) - len(dst)
        i = out.dim + offset
        if 0 <= i < len(sizes) and sizes[i] != -1:
            sizes[i] = out.local(w.tp)
        plan.args = (node.args[0], sizes, *node.args[2:])
    elif name == "unflatten":
        dim, sizes = node.args[1] % len(_shape(node.args[0])), list(node.args[2])
        i = out.dim - dim
        if 0 <= i < len(sizes) and sizes[i] != -1:
            sizes[i] = out.local(w.tp)
        plan.args = (node.args[0], node.args[1], sizes, *node.args[3:])


def _expand(w: _Walk, node: fx.Node):
    x = node.args[0]
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    src, dst = _shape(x), _shape(node)
    d = px.dim + len(dst) - len(src)
    if src[px.dim] != dst[d]:
        return None
    out = px.at(d)
    _localise_sizes(w, node, dst, out)
    return out


def _transpose(w: _Walk, node: fx.Node):
    x = node.args[0]
    nd = len(_shape(x))
    name = _packet(node)
    if name == "transpose":
        a, b = node.args[1] % nd, node.args[2] % nd
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    elif name == "permute":
        perm = [d % nd for d in node.args[1]]
    else:  # t, numpy_T
        perm = list(reversed(range(nd)))
    pending = w.param(x)
    if pending is not None:  # a transposed parameter: its consumer decides
        return _Pending(pending.param, tuple(pending.perm[p] for p in perm))
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    return px.at(perm.index(px.dim))


def _unsqueeze(w: _Walk, node: fx.Node):
    px = w.resolve(node.args[0])
    if not isinstance(px, Shard):
        return None
    d = node.args[1] % (len(_shape(node.args[0])) + 1)
    return px.at(px.dim + (1 if d <= px.dim else 0))


def _squeeze(w: _Walk, node: fx.Node):
    x = node.args[0]
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    src = _shape(x)
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [d % len(src) for d in dims if src[d % len(src)] == 1]
    else:
        dims = [d for d, s in enumerate(src) if s == 1]
    if px.dim in dims:
        return None
    return px.at(px.dim - sum(1 for d in dims if d < px.dim))


def _cut(w: _Walk, node: fx.Node, px: Shard, start: int, end: int):
    """A slice ``[start, end)`` of the sharded dim: the blocks it covers, in local
    coordinates, or ``None`` if it cuts through a split block."""
    pos, local_pos = 0, 0
    lo = None
    taken = []
    for size, split in px.blocks:
        loc = size // w.tp if split else size
        if start <= pos and pos + size <= end:
            if lo is None:
                lo = local_pos
            taken.append((size, split))
        elif pos < end and start < pos + size:
            if split:
                return None
            # part of a whole block: keep that part, every rank has it
            a, b = max(start, pos), min(end, pos + size)
            if lo is None:
                lo = local_pos + (a - pos)
            taken.append((b - a, False))
        pos += size
        local_pos += loc
    if lo is None:
        return None
    length = sum(s // w.tp if split else s for s, split in taken)
    return taken, lo, lo + length


def _slice(w: _Walk, node: fx.Node):
    x = node.args[0]
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    src = _shape(x)
    name = _packet(node)
    if name == "narrow":
        dim, start = node.args[1] % len(src), node.args[2]
        end = start + node.args[3]
        step = 1
    else:
        dim = _arg(node, 1, "dim", 0) % len(src)
        start = _arg(node, 2, "start", None) or 0
        end = _arg(node, 3, "end", None)
        step = _arg(node, 4, "step", 1)
        end = src[dim] if end is None else min(end, src[dim])
        start = start + src[dim] if start < 0 else start
        end = end + src[dim] if end < 0 else end
    if dim != px.dim:
        return px
    if step != 1:
        return None
    cut = _cut(w, node, px, start, end)
    if cut is None:
        return None
    blocks, lo, hi = cut
    plan = w.plans.setdefault(node.name, NodePlan(None))
    plan.args = (x, dim, lo, hi - lo) if name == "narrow" else (x, dim, lo, hi)
    return _make_shard(dim, blocks)


def _split(w: _Walk, node: fx.Node):
    x = node.args[0]
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    src = _shape(x)
    outs = _val(node)
    dim = _arg(node, 2, "dim", 0) % len(src)
    sizes = [int(t.shape[dim]) for t in outs]
    if dim != px.dim:
        return tuple(px for _ in outs)
    placements, local_sizes, start = [], [], 0
    for size in sizes:
        cut = _cut(w, node, px, start, start + size)
        if cut is None:
            return None
        blocks, lo, hi = cut
        placements.append(_make_shard(dim, blocks))
        local_sizes.append(hi - lo)
        start += size
    plan = w.plans.setdefault(node.name, NodePlan(None))
    plan.args = ("split_with_sizes", x, local_sizes, dim)
    return tuple(placements)


def _select(w: _Walk, node: fx.Node):
    x = node.args[0]
    px = w.resolve(x)
    if not isinstance(px, Shard):
        return None
    src = _shape(x)
    dim, index = node.args[1] % len(src), node.args[2] % src[node.args[1] % len(src)]
    if dim != px.dim:
        return px.at(px.dim - (1 if dim < px.dim else 0))
    cut = _cut(w, node, px, index, index + 1)
    if cut is None or cut[0][0][1]:
        return None
    w.plans.setdefault(node.name, NodePlan(None)).args = (x, dim, cut[1])
    return REPLICATE


def _getitem(w: _Walk, node: fx.Node):
    src, i = node.args
    ps = w.p(src)
    if isinstance(ps, tuple):
        return ps[i]
    return None


def _cat(w: _Walk, node: fx.Node):
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    nd = len(_shape(node))
    dim = _arg(node, 1, "dim", 0) % nd
    name = _packet(node)
    places = [w.resolve(t) for t in tensors]
    shards = [p for p in places if isinstance(p, Shard)]
    if name == "stack":
        first = shards[0]
        if any(p != first for p in shards):
            return None
        for t, p in zip(tensors, places, strict=True):
            if not isinstance(p, Shard):
                w.convert(node, t, first, "slice")
        return first.at(first.dim + (1 if dim <= first.dim else 0))
    if all(isinstance(p, Shard) and p.dim != dim for p in places) or any(
            isinstance(p, Shard) and p.dim != dim for p in places):
        first = next(p for p in shards if p.dim != dim)
        for t, p in zip(tensors, places, strict=True):
            if p != first:
                if isinstance(p, Shard):
                    return None
                w.convert(node, t, first, "slice")
        return first
    # concatenation along the sharded dim: the blocks follow each other
    blocks = []
    for t, p in zip(tensors, places, strict=True):
        if isinstance(p, Shard):
            blocks += list(p.blocks)
        else:
            blocks.append((_shape(t)[dim], False))
    return _make_shard(dim, blocks)


def _scatter(w: _Walk, node: fx.Node):
    """``scatter(self, dim, index, src)`` and ``index_copy(self, dim, index, src)``: write
    ``src`` into ``self`` at ``index`` along ``dim`` (a decode step's KV-cache update).
    Sharded along any other dim (the cache's heads), ``self``, ``src`` and a same-rank
    ``index`` take one shard: a replicated operand is sliced locally, an undecided state
    input (the cache) takes the source's shard. A 1-D ``index_copy`` index stays whole."""
    base, dim, index = node.args[0], node.args[1], node.args[2]
    src = node.args[3] if len(node.args) > 3 else None
    nd = len(_shape(node))
    dim %= nd
    operands = [a for a in (base, index, src) if isinstance(a, fx.Node)
                and len(_shape(a)) == nd]
    target = next((p for p in (w.p(a) for a in operands)
                   if isinstance(p, Shard) and p.dim != dim), None)
    if target is None or any(_shape(a)[target.dim] != _shape(node)[target.dim]
                             for a in operands):
        return None
    if isinstance(index, fx.Node) and index not in operands and \
            not isinstance(w.resolve(index), Replicate):
        return None
    for a in operands:
        pending = w.param(a)
        if pending is not None:
            w.place[a.name] = w.decide(pending, target)
        if not _slice_to(w, node, a, target):
            return None
    return target


def _embedding(w: _Walk, node: fx.Node):
    weight, ids = node.args[0], node.args[1]
    pending = w.param(weight)
    pw = w.decide(pending, _vocab_shard(w, weight)) if pending is not None else w.resolve(weight)
    w.place[weight.name] = pw
    pi = w.resolve(ids)
    if isinstance(pw, Shard) and pw.plain and pw.dim == 0:
        if not isinstance(pi, Replicate):
            w.convert(node, ids, REPLICATE, "gather")
        w.plans.setdefault(node.name, NodePlan(None)).vocab = True
        return PARTIAL
    if isinstance(pw, Shard) and pw.dim == 1 and isinstance(pi, Replicate):
        return pw.at(len(_shape(node)) - 1)
    if isinstance(pw, Replicate) and isinstance(pi, Shard):
        return pi
    return None


def _vocab_shard(w: _Walk, weight) -> Placement:
    rows = _shape(weight)[0]
    return shard(0, rows) if rows % w.tp == 0 else REPLICATE


def _matmul(w: _Walk, node: fx.Node):
    """linear / addmm / mm / matmul / bmm / baddbmm: the weight may be a parameter whose
    placement is decided here (column, row or replicated)."""
    name = _packet(node)
    if name == "linear":
        x, wt, bias = node.args[0], node.args[1], _arg(node, 2, "bias")
        w_layout = "nk"
    elif name in ("addmm", "baddbmm"):
        bias, x, wt = node.args[0], node.args[1], node.args[2]
        w_layout = "kn"
    else:
        x, wt, bias = node.args[0], node.args[1], None
        w_layout = "kn"
    out_shape = _shape(node)
    x_shape, w_shape = _shape(x), _shape(wt)
    if len(x_shape) < 1 or len(w_shape) < 1:
        return None
    k_w = len(w_shape) - 1 if w_layout == "nk" else max(len(w_shape) - 2, 0)
    n_w = len(w_shape) - 2 if w_layout == "nk" else len(w_shape) - 1
    pending = w.param(wt)
    px = w.resolve(x)
    if pending is not None:
        k_x = len(x_shape) - 1
        if isinstance(px, Shard) and px.dim == k_x and len(w_shape) == 2:
            pw = w.decide(pending, Shard(k_w, px.blocks))  # row parallel
        elif len(w_shape) == 2:
            blocks = _consumer_blocks(w, node, w.tp)
            pw = w.decide(pending, _make_shard(n_w, blocks) if blocks else REPLICATE)
        else:
            pw = w.decide(pending, REPLICATE)
        w.place[wt.name] = pw
    pw = w.resolve(wt)
    if isinstance(pw, Shard) and pw.dim == n_w and len(w_shape) == 2 and \
            not isinstance(px, Replicate):  # column parallel takes the whole activation
        reason = "sequence" if not w.prov.get(x.name) else "gather"
        w.convert(node, x, REPLICATE, reason)
        px = REPLICATE
    out = _contract(x_shape, px, w_shape, pw, out_shape, w_layout)
    if out is None:
        return None
    if isinstance(pw, Shard) and pw.dim == n_w and len(w_shape) == 2:
        w.prov[node.name] = frozenset({_source_param(wt)})
    if isinstance(bias, fx.Node):
        pb = w.param(bias)
        if isinstance(out, Shard) and out.dim == len(out_shape) - 1:
            want = Shard(len(_shape(bias)) - 1, out.blocks) if _shape(bias)[-1:] == (
                out_shape[-1],) else REPLICATE
        else:
            want = REPLICATE
        if pb is not None:
            got = w.decide(pb, want)
            w.place[bias.name] = got
        got = w.resolve(bias)
        if isinstance(out, Partial):
            if not isinstance(got, Replicate):
                return None
            w.plans.setdefault(node.name, NodePlan(None)).bias_after_reduce = True
        elif name == "baddbmm":
            b_shape = _shape(bias)
            d = out.dim - (len(out_shape) - len(b_shape)) if isinstance(out, Shard) else -1
            if isinstance(out, Shard) and d >= 0 and b_shape[d] > 1:
                if got != out.at(d):
                    if isinstance(got, Shard):
                        return None
                    w.convert(node, bias, out.at(d), "slice")
            elif not isinstance(got, Replicate):
                return None
        elif got != want:
            if isinstance(got, Shard) or isinstance(want, Replicate):
                return None
            w.convert(node, bias, want, "slice")
    return out


def _source_param(node) -> str:
    while node.op != "get_attr" and node.args:
        node = node.args[0]
    return node.target


def _contract(x_shape, px, w_shape, pw, out_shape, w_layout):
    """Output placement of ``x @ w`` (``w`` given as ``(.., k, n)`` or ``(n, k)``)."""
    nd = len(out_shape)
    if len(w_shape) == 1 or len(x_shape) == 1:
        return REPLICATE if isinstance(px, Replicate) and isinstance(pw, Replicate) else None
    k_x = len(x_shape) - 1
    if w_layout == "nk":
        k_w, n_w = len(w_shape) - 1, len(w_shape) - 2
    else:
        k_w, n_w = len(w_shape) - 2, len(w_shape) - 1
    xs, ws = isinstance(px, Shard), isinstance(pw, Shard)
    if not xs and not ws:
        return REPLICATE
    if xs and ws and px.dim == k_x and pw.dim == k_w:
        return PARTIAL if px.blocks == pw.blocks else None
    if ws and not xs:
        if pw.dim == n_w:
            return pw.at(nd - 1)
        if pw.dim < len(w_shape) - 2 and w_layout == "kn":  # a batch dim of w
            return None
        return None
    if xs and not ws:
        if px.dim == k_x:
            return None
        if len(w_shape) == 2:  # x's leading / row dims pass through
            return px.at(px.dim + nd - len(x_shape))
        if px.dim == len(x_shape) - 2:  # rows of a batched matmul
            return px.at(nd - 2)
        if w_shape[px.dim - (len(x_shape) - len(w_shape))] == 1 if \
                px.dim - (len(x_shape) - len(w_shape)) >= 0 else True:
            return px.at(px.dim + nd - len(x_shape))  # a batch dim w broadcasts over
        return None
    # both sharded on batch dims
    if px.dim < len(x_shape) - 2 and pw.dim < len(w_shape) - 2:
        if px.dim + nd - len(x_shape) == pw.dim + nd - len(w_shape) and px.blocks == pw.blocks:
            return px.at(px.dim + nd - len(x_shape))
    return None


def _sdpa(w: _Walk, node: fx.Node):
    """Attention with heads (or batch) sharded: q, k, v on the same dim; a replicated
    k/v or mask is sliced locally to the same heads."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = _arg(node, 3, "attn_mask")
    pq = w.resolve(q)
    nd = len(_shape(q))
    if not isinstance(pq, Shard) or not pq.plain or pq.dim >= nd - 2:
        return None
    for t in (k, v):
        pt = w.resolve(t)
        w.kv.append(local_fraction(_shape(t), pt, w.tp))
        if pt != pq and not (isinstance(pt, Replicate) and _shape(t)[pq.dim] == 1):
            if isinstance(pt, Shard) or _shape(t)[pq.dim] != _shape(q)[pq.dim]:
                if not (isinstance(pt, Shard) and pt.plain and pt.dim == pq.dim
                        and _arg(node, 7, "enable_gqa", False)):
                    return None
            else:
                w.convert(node, t, pq, "slice")
    if isinstance(mask, fx.Node):
        pm = w.resolve(mask)
        ms = _shape(mask)
        d = pq.dim - (nd - len(ms))
        if d >= 0 and ms[d] > 1:
            if pm != pq.at(d):
                if isinstance(pm, Shard):
                    return None
                w.convert(node, mask, pq.at(d), "slice")
        elif not isinstance(pm, Replicate):
            return None
    return pq


def _softmax(w, node):
    return _reduction(1, None)(w, node)


_RULES: dict[str, Callable] = {
    "linear": _matmul, "addmm": _matmul, "mm": _matmul, "matmul": _matmul, "bmm": _matmul,
    "baddbmm": _matmul,
    "embedding": _embedding,
    "scaled_dot_product_attention": _sdpa,
    "view": _view, "reshape": _view, "_unsafe_view": _view, "flatten": _view, "unflatten": _view,
    "expand": _expand,
    "transpose": _transpose, "permute": _transpose, "t": _transpose, "numpy_T": _transpose,
    "unsqueeze": _unsqueeze, "squeeze": _squeeze,
    "slice": _slice, "narrow": _slice,
    "split": _split, "split_with_sizes": _split, "chunk": _split,
    "select": _select, "getitem": _getitem,
    "cat": _cat, "stack": _cat,
    "scatter": _scatter, "index_copy": _scatter,
    "layer_norm": _norm, "rms_norm": _norm, "native_layer_norm": _norm,
    "mean": _reduction(1, 2), "sum": _reduction(1, 2), "amax": _reduction(1, 2),
    "amin": _reduction(1, 2), "softmax": _softmax, "_softmax": _softmax,
    "log_softmax": _softmax, "cumsum": _softmax, "topk": _reduction(2, None, [-1]),
    "sort": _reduction(1, None, [-1]), "argmax": _reduction(1, 2),
    "var": _reduction(1, 3),
    "to": _unary, "_to_copy": _unary, "clone": _unary, "contiguous": _unary, "alias": _unary,
    "detach": _unary, "dropout": _unary, "type_as": _unary, "lift_fresh_copy": _unary,
    "_assert_tensor_metadata": _unary,
}


# --------------------------------------------------------------------------- column blocks

_KEEP_LAST = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "dropout", "type_as"}


def _consumer_blocks(w: _Walk, node: fx.Node, tp: int) -> tuple[tuple[int, bool], ...]:
    """Column blocks of a matmul output: where its consumers cut the last dim (slice,
    split, chunk, narrow, select, also after a view into heads), each block split when
    the finest unit its consumers view it in (a head) divides it ``tp`` ways."""
    n = _shape(node)[-1]
    cuts: set[int] = set()
    units: list[int] = [1]
    _follow(node, len(_shape(node)) - 1, 1, cuts, units, depth=0)
    bounds = sorted({0, n} | {c for c in cuts if 0 < c < n})
    unit = math.lcm(*units)
    blocks = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        size = b - a
        blocks.append((size, size % (tp * unit) == 0))
    if not any(split for _, split in blocks):
        return ()
    return tuple(blocks)


def _follow_units(node, dim, scale, units, depth) -> None:
    """Units only (a piece's own cuts are relative to the piece, not to the output)."""
    _follow(node, dim, scale, set(), units, depth)


def _follow(node, dim, scale, cuts, units, depth) -> None:
    if depth > 12:
        return
    for user in node.users:
        name = _packet(user) if user.op == "call_function" else ""
        if name in _KEEP_LAST or (user.op == "call_function" and isinstance(
                user.target, torch._ops.OpOverload) and torch.Tag.pointwise in user.target.tags
                and len(_shape(user)) == len(_shape(node)) and user.args[0] is node):
            _follow(user, dim, scale, cuts, units, depth + 1)
        elif name in ("view", "reshape", "_unsafe_view", "unflatten"):
            groups = _view_groups(_shape(node), _shape(user)) or []
            for a, b in groups:
                if dim in a and a[-1] == dim:
                    dst = _shape(user)
                    real = [t for t in b if dst[t] != 1]
                    if len(a) == 1 and len(real) == 1 and dst[real[0]] == _shape(node)[dim] \
                            and len(dst) <= 3:
                        # only size-1 dims inserted while restoring [b, t, C] from a
                        # [b * t, C] matmul at one token ([2, 3C] -> [2, 1, 3C]): the dim
                        # itself. (Into >= 4 dims a size-1 dim is one head: [b, t, 1, d].)
                        _follow(user, real[0], scale, cuts, units, depth + 1)
                        continue
                    first = b[0]  # the heads dim, even when there is one head
                    inner = math.prod(dst[t] for t in b if t > first)
                    if inner > 1:
                        units.append(inner * scale)
                    _follow(user, first, scale * inner, cuts, units, depth + 1)
        elif name == "scaled_dot_product_attention" and dim == len(_shape(node)) - 1:
            units.append(_shape(node)[dim] * scale)  # a head's features stay together
        elif name == "unsqueeze":
            d = user.args[1] % (len(_shape(node)) + 1)
            _follow(user, dim + (1 if d <= dim else 0), scale, cuts, units, depth + 1)
        elif name in ("transpose", "permute"):
            nd = len(_shape(node))
            if name == "transpose":
                a, b = user.args[1] % nd, user.args[2] % nd
                perm = list(range(nd))
                perm[a], perm[b] = perm[b], perm[a]
            else:
                perm = [d % nd for d in user.args[1]]
            _follow(user, perm.index(dim), scale, cuts, units, depth + 1)
        elif name in ("slice", "narrow"):
            size = _shape(node)[dim]
            if _arg(user, 1, "dim", 0) % len(_shape(node)) != dim:
                continue
            if name == "narrow":
                start, end = user.args[2], user.args[2] + user.args[3]
            else:
                start = _arg(user, 2, "start", None) or 0
                end = _arg(user, 3, "end", None)
                end = size if end is None else min(end, size)
                start = start + size if start < 0 else start
                end = end + size if end < 0 else end
            cuts.update({start * scale, end * scale})
            _follow_units(user, dim, scale, units, depth + 1)  # a piece viewed into heads
        elif name in ("split", "split_with_sizes", "chunk"):
            if _arg(user, 2, "dim", 0) % len(_shape(node)) != dim:
                continue
            pos = 0
            for t in _val(user):
                pos += int(t.shape[dim])
                cuts.add(pos * scale)
            for piece in user.users:  # getitem: a piece keeps the dim, and its units count
                _follow_units(piece, dim, scale, units, depth + 1)
        elif name == "select":
            if user.args[1] % len(_shape(node)) == dim:
                i = user.args[2] % _shape(node)[dim]
                cuts.update({i * scale, (i + 1) * scale})


# --------------------------------------------------------------------------- entry points


def propagate(gm: fx.GraphModule, nodes: Sequence[fx.Node], tp: int, *,
              strategy: dict[str, Placement] | None = None,
              allowed: Iterable[str] | None = None,
              sequence_parallel: bool = False,
              inputs: dict[str, Placement] | None = None,
              boundary: dict[str, Placement] | None = None,
              hidden: Iterable[str] = (), prefix: str = "",
              batch: int | None = None, seq: int | None = None,
              state: Iterable[str] = (), state_out: Iterable[str] = ()) -> Analysis:
    """Placements of ``nodes`` (graph order) on a tensor-parallel group of ``tp``.

    Args:
        gm: the GraphModule that owns the nodes (parameters are looked up in it).
        nodes: the piece of graph to analyse, in order; values from outside it are inputs.
        strategy: parameter target -> placement, fixed (what codegen applies). A parameter
            missing from it is decided by its consumer, as the greedy strategy does.
        allowed: parameters the greedy strategy may shard (default: all).
        sequence_parallel: reduce-scatter partial sums of ``[B, T, C]`` values over T.
        inputs: placements of values coming from outside (default replicated).
        boundary: node name -> placement the value must have when it leaves the piece.
        prefix: stripped from module paths in the collectives' ``after``.
        state, state_out: state inputs among ``nodes`` (a decode step's KV caches) and
            their updated copies (``block_state``): a state input is placed by its first
            consumer, like a parameter (``strategy`` may fix it by name); an updated copy
            keeps its placement where it leaves (each rank keeps its piece).
    """
    allowed_set = set(allowed) if allowed is not None else {
        n.target for n in nodes if n.op == "get_attr"}
    walk = _Walk(gm, list(nodes), tp, sequence_parallel=sequence_parallel,
                 strategy=strategy, allowed=allowed_set, inputs=dict(inputs or {}),
                 boundary=dict(boundary or {}), prefix=prefix, state=state)
    walk.state_out = set(state_out)
    walk.batch, walk.seq = batch, seq
    walk.run()
    states = {t: walk.params.pop(t) for t in list(walk.params) if t in walk.state}
    state_bytes = {}
    for node in nodes:
        if node.name in states:
            val = _val(node)
            state_bytes[node.name] = int(val.numel() * val.element_size() * local_fraction(
                tuple(val.shape), states[node.name], tp))
    param_bytes = {}
    for node in nodes:
        if node.op == "get_attr" and node.target in walk.params:
            val = _val(node)
            param_bytes[node.target] = int(val.numel() * val.element_size() * local_fraction(
                tuple(val.shape), walk.params[node.target], tp))
    work = _local_work(walk, nodes)
    kv = min(walk.kv) if walk.kv else 1.0
    return Analysis(tp, sequence_parallel, dict(walk.params), walk.plans, walk.collectives,
                    walk.fallbacks, walk.guilty - set(states), param_bytes, work, kv,
                    states, state_bytes)


def _is_weight(node) -> bool:
    """A parameter, or a transpose of one (what a matmul reads as its weight)."""
    while node.op == "call_function" and _packet(node) in ("t", "numpy_T", "transpose",
                                                            "permute"):
        node = node.args[0]
    return node.op == "get_attr"


def _local_work(walk: _Walk, nodes) -> dict[str, tuple]:
    """Per node: (op class, global flops, local flops, global activation bytes, local
    activation bytes, global weight bytes, local weight bytes) of its own work."""
    from planner.op_stats import node_work

    out = {}
    tp = walk.tp
    for node in nodes:
        if node.op != "call_function":
            continue
        nw = node_work(node)
        if nw.flops == 0 and nw.bytes_read + nw.bytes_written == 0:
            continue
        plan = walk.plans.get(node.name)
        place = plan.placement if plan is not None else REPLICATE
        outs = _val(node)
        if isinstance(outs, torch.Tensor):
            out_frac = local_fraction(tuple(outs.shape), place, tp)
        elif isinstance(outs, (list, tuple)) and isinstance(place, tuple):
            fr = [local_fraction(tuple(t.shape), p, tp) for t, p in zip(outs, place, strict=False)
                  if isinstance(t, torch.Tensor)]
            out_frac = sum(fr) / len(fr) if fr else 1.0
        else:
            out_frac = 1.0
        act = act_local = weight = weight_local = 0.0
        for a in _tensor_args(node):
            pa = plan.inputs.get(a.name) if plan is not None and a.name in plan.inputs else \
                walk.place.get(a.name, REPLICATE)
            v = _val(a)
            if isinstance(v, torch.Tensor):
                b = v.numel() * v.element_size()
                f = local_fraction(tuple(v.shape), pa if not isinstance(
                    pa, (_Pending, tuple)) else REPLICATE, tp)
                if _is_weight(a):
                    weight, weight_local = weight + b, weight_local + b * f
                else:
                    act, act_local = act + b, act_local + b * f
        in_frac = act_local / act if act else 1.0
        flop_frac = out_frac
        if isinstance(place, Partial):  # contracted dim split: 1/tp of the products
            flop_frac = 1.0 / tp
            out_frac = 1.0
        read = max(nw.bytes_read - weight, 0.0)
        out[node.name] = (nw.op_class, float(nw.flops), nw.flops * flop_frac,
                          read + nw.bytes_written, read * in_frac + nw.bytes_written * out_frac,
                          weight, weight_local)
    return out


def _layer_nodes(traced, index: int) -> list[fx.Node]:
    """The layer's nodes in graph order, with the parameters it reads that another layer
    fetches (a tied table) put first."""
    names = set(traced.layers[index].nodes)
    nodes = [n for n in traced.graph_module.graph.nodes if n.name in names]
    borrowed = {a.name: a for n in nodes for a in n.all_input_nodes
                if a.op == "get_attr" and a.name not in names}
    return list(borrowed.values()) + nodes


def block_state(traced) -> tuple[frozenset[str], frozenset[str]]:
    """``(inputs, outputs)``: a decode step's state (``planner.decode``), by node name: the
    model inputs that belong to one block (its KV cache) and the block's updated copies of
    them that the model returns. Both empty for a plain forward pass."""
    gm = traced.graph_module
    memo = _CACHE.setdefault(gm, {})
    if "state" not in memo:
        from planner.tracing import _block_state_outputs

        last = len(traced.layers) - 1
        layer_of = traced.layer_of_node
        inputs = frozenset(n.name for n in gm.graph.nodes if n.op == "placeholder"
                           and 0 < layer_of.get(n.name, 0) < last)
        outputs = frozenset(n for n in _block_state_outputs(gm, layer_of, len(traced.layers))
                            if n not in inputs and layer_of.get(n, 0) > 0)
        memo["state"] = (inputs, outputs)
    return memo["state"]


def layer_boundaries(traced, index: int, sequence_parallel: bool, tp: int):
    """Input and output placements of layer ``index``'s values at its edges: replicated,
    or sequence-sharded hidden states under sequence parallelism (a block's updated KV
    cache, which stays with the block, has none)."""
    hidden = set()
    for cut in traced.cuts:
        hidden |= {t.name for t in cut.tensors if t.role == "hidden"}
    layer_of = traced.layer_of_node
    _, state_out = block_state(traced)
    inputs, boundary = {}, {}
    nodes = _layer_nodes(traced, index)
    for node in nodes:
        for a in node.all_input_nodes:
            if layer_of.get(a.name) != index and _is_tensor(a) and a.op != "get_attr":
                inputs[a.name] = _boundary_placement(a, hidden, sequence_parallel, tp)
        if any(layer_of.get(u.name) != index for u in node.users) and _is_tensor(node) and \
                node.op != "get_attr" and node.name not in state_out:
            boundary[node.name] = _boundary_placement(node, hidden, sequence_parallel, tp)
    return nodes, inputs, boundary, hidden


def _boundary_placement(node, hidden, sequence_parallel, tp) -> Placement:
    shape = _shape(node)
    if sequence_parallel and node.name in hidden and len(shape) == 3 and shape[1] % tp == 0 \
            and shape[1] > 1:
        return shard(1, shape[1])
    return REPLICATE


def analyse_layer(traced, index: int, tp: int, *, sequence_parallel: bool = False,
                  strategy: dict[str, Placement] | None = None,
                  allowed: Iterable[str] | None = None) -> Analysis:
    """``propagate`` over one traced layer with its boundary placements. ``strategy``
    fixes some parameters (the rest are decided by their consumers); ``allowed`` limits
    which of those may be sharded. A pure function of its arguments: cached per traced
    graph, so every cost builder of one model shares the analyses."""
    key = (index, tp, sequence_parallel,
           None if allowed is None else frozenset(allowed),
           None if not strategy else tuple(sorted((k, str(v)) for k, v in strategy.items())))
    cache = _CACHE.setdefault(traced.graph_module, {})
    if key not in cache:
        cache[key] = _analyse_layer(traced, index, tp, sequence_parallel, strategy, allowed)
    return cache[key]


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _analyse_layer(traced, index, tp, sequence_parallel, strategy, allowed) -> Analysis:
    nodes, inputs, boundary, hidden = layer_boundaries(traced, index, sequence_parallel, tp)
    layer = traced.layers[index]
    prefix = layer.name + "." if layer.kind == "block" else ""
    state, state_out = block_state(traced)
    return propagate(traced.graph_module, nodes, tp, strategy=strategy, allowed=allowed,
                     sequence_parallel=sequence_parallel, inputs=inputs, boundary=boundary,
                     hidden=hidden, prefix=prefix, batch=traced.batch_size,
                     seq=traced.seq_len, state={n.name for n in nodes} & state,
                     state_out=state_out)


def choose(traced, index: int, tp: int, price: Callable[[Analysis], float], *,
           sequence_parallel: bool = False, fixed: dict[str, Placement] | None = None,
           ) -> tuple[Analysis, str, dict[str, Analysis]]:
    """The cheapest of the candidate strategies for layer ``index`` at ``tp``.

    Candidates: ``greedy`` (shard every parameter the rules can), ``no-fallback`` (the
    greedy strategy with every parameter whose shard reaches a fallback gather replicated,
    repeated until none does) and ``replicate``; then the best of them with one of its
    sharded parameters replicated, for each such parameter, kept when cheaper. At
    ``tp > 1`` the replicated strategy is chosen only when no candidate shards anything (a
    replicated group is never better than ``tp`` 1), so it is priced but not offered
    against a sharded candidate.

    ``fixed`` holds placements an earlier layer chose for parameters this one shares (a
    tied embedding and head): every candidate keeps them.

    Returns:
        ``(analysis, name, candidates)``.
    """
    kw = {"sequence_parallel": sequence_parallel, "strategy": dict(fixed or {}) or None}
    greedy = analyse_layer(traced, index, tp, **kw)
    candidates = {"greedy": greedy}
    allowed = set(greedy.params)
    current = greedy
    for _ in range(_MAX_FLIPS):
        if not current.guilty:
            break
        allowed -= same_params(traced.graph_module, current.guilty)  # every name of each
        current = analyse_layer(traced, index, tp, allowed=allowed, **kw)
    if current is not greedy and not current.guilty:
        candidates["no-fallback"] = current
    candidates["replicate"] = analyse_layer(traced, index, tp, allowed=(), **kw)
    sharded = {k: a for k, a in candidates.items() if a.sharded_params}
    pool = sharded or candidates
    cost = {k: price(a) for k, a in pool.items()}
    name = min(pool, key=lambda k: (cost[k], sum(pool[k].param_bytes.values())))
    # one round of single flips: replicate one sharded parameter of the best candidate
    # (a position table split by rows costs an all-reduce that saves almost nothing)
    best = pool[name]
    # a parameter another layer also reads (a tied table) is not flipped here: replicating
    # it would replicate it in that layer too, which this layer's price does not see
    shared = _shared_params(traced, index)
    for target in best.sharded_params:
        if target in shared:
            continue
        keep = set(best.sharded_params) - same_params(traced.graph_module, [target])
        flipped = analyse_layer(traced, index, tp, allowed=keep, **kw)
        if not flipped.sharded_params or flipped.guilty:
            continue
        c = price(flipped)
        if c < cost[name]:
            name = f"{name}-{target.rsplit('.', 2)[-2] if '.' in target else target}"
            best, cost[name] = flipped, c
            candidates[name] = flipped
    return best, name, candidates


def _shared_params(traced, index: int) -> set[str]:
    """Parameters layer ``index`` reads that another layer also reads, by every name."""
    gm = traced.graph_module
    memo = _CACHE.setdefault(gm, {}).setdefault("shared", {})
    if index not in memo:
        layer_of = traced.layer_of_node
        here = {n.target for n in _layer_nodes(traced, index) if n.op == "get_attr"}
        elsewhere = {n.target for n in gm.graph.nodes if n.op == "get_attr"
                     if any(layer_of.get(u.name) != index for u in n.users)}
        memo[index] = same_params(gm, here) & same_params(gm, elsewhere)  # by tensor
    return memo[index]


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class TemplateSharding:
    """The strategy of the layers of one template in one stage, as the plan records it.

    Attributes:
        layers: the stage's layer indices that share it.
        params: parameter path (relative to the layer's module path for blocks, absolute
            for the pre and post layers) -> placement; replicated parameters are omitted.
        collectives: what one layer of the template runs, per microbatch of the plan.
        candidate: which strategy was chosen (``greedy``, ``no-fallback``, ``replicate``).
    """

    layers: tuple[int, ...]
    params: dict[str, Placement]
    collectives: tuple[Collective, ...]
    candidate: str = "greedy"

    def to_json(self) -> dict:
        return {"layers": list(self.layers), "strategy": self.candidate,
                "params": {k: placement_to_json(v) for k, v in sorted(self.params.items())},
                "collectives": [c.to_json() for c in self.collectives]}

    @classmethod
    def from_json(cls, d: dict) -> TemplateSharding:
        return cls(tuple(int(i) for i in d["layers"]),
                   {k: placement_from_json(v) for k, v in d["params"].items()},
                   tuple(Collective(c["kind"], int(c["bytes"]), "", c.get("after", ""), "",
                                    algorithm=c.get("algorithm", ""))
                         for c in d["collectives"]), d.get("strategy", "greedy"))


@dataclass(frozen=True)
class StageSharding:
    """One stage's tensor parallelism: its templates and the collectives at its end.

    ``boundary`` holds the all-gathers that make sequence-sharded hidden states whole
    before they are sent to the next stage (sequence parallelism only).
    """

    tp: int
    templates: tuple[TemplateSharding, ...]
    boundary: tuple[Collective, ...] = ()
    sequence_parallel: bool = False

    def strategy(self, layer_names: Sequence[str], layer_kinds: Sequence[str]) -> dict:
        """Parameter target -> placement for the stage's layers (``layer_names[j]``)."""
        out: dict[str, Placement] = {}
        for t in self.templates:
            for j in t.layers:
                prefix = layer_names[j] + "." if layer_kinds[j] == "block" else ""
                for rel, p in t.params.items():
                    out.setdefault(prefix + rel, p)
        return out

    def collectives(self) -> list[tuple[str, int]]:
        """Every collective of the stage per microbatch, as ``(kind, bytes)``, sorted."""
        out = [(c.kind, c.bytes) for t in self.templates for _ in t.layers
               for c in t.collectives]
        out += [(c.kind, c.bytes) for c in self.boundary]
        return sorted(out)

    def to_json(self) -> dict:
        return {"templates": [t.to_json() for t in self.templates],
                "boundary": [c.to_json() for c in self.boundary]}

    @classmethod
    def from_json(cls, d: dict, tp: int, sequence_parallel: bool = False) -> StageSharding:
        return cls(tp, tuple(TemplateSharding.from_json(t) for t in d["templates"]),
                   tuple(Collective(c["kind"], int(c["bytes"]), "", c.get("after", ""), "")
                         for c in d.get("boundary", ())), sequence_parallel)


def analyse_stage(gm: fx.GraphModule, layer_of: dict[str, int], hidden: Iterable[str], tp: int,
                  strategy: dict[str, Placement], *, sequence_parallel: bool = False,
                  state: Iterable[str] = (), state_out: Iterable[str] = ()) -> Analysis:
    """``propagate`` over one stage's graph with a fixed strategy: what codegen applies.

    Values crossing between the stage's layers take the layers' boundary placements;
    hidden states the stage receives are sliced to the sequence shard under sequence
    parallelism; every stage output is made whole, except a block's updated KV cache
    (``state_out``; ``block_state``), which each rank keeps as its piece. A state input's
    placement comes from ``strategy`` (by input name) or, absent there, from its consumer.
    """
    names = {n.name for n in gm.graph.nodes}
    state, state_out = set(state) & names, set(state_out) & names
    hidden = set(hidden)
    nodes = list(gm.graph.nodes)
    boundary: dict[str, Placement] = {}
    for node in nodes:
        if not _is_tensor(node) or node.op == "get_attr":
            continue
        if node.op == "placeholder":
            place = _boundary_placement(node, hidden, sequence_parallel, tp)
            if isinstance(place, Shard):
                boundary[node.name] = place
            continue
        mine = layer_of.get(node.name)
        if any(u.op != "output" and layer_of.get(u.name) != mine for u in node.users):
            boundary[node.name] = _boundary_placement(node, hidden, sequence_parallel, tp)
        if node.name in state_out:
            boundary.pop(node.name, None)
    # the strategy is complete: a parameter it does not shard is replicated
    return propagate(gm, nodes, tp, strategy=strategy, allowed=(),
                     sequence_parallel=sequence_parallel, boundary=boundary, hidden=hidden,
                     state=state, state_out=state_out)


def hidden_values(traced) -> set[str]:
    """Names of the hidden states among the values crossing layer boundaries."""
    return {t.name for cut in traced.cuts for t in cut.tensors if t.role == "hidden"}


def same_params(gm: fx.GraphModule, names: Iterable[str]) -> set[str]:
    """Every name under which ``gm`` holds the parameters ``names`` (a tied table is
    ``wte.weight`` to the module tree and ``lm_head.weight`` to the exported graph)."""
    aliases = _aliases(gm)
    out: set[str] = set()
    for n in names:
        out.update(aliases.get(n, (n,)))
    return out


def _aliases(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Parameter name -> every name of the same tensor, in ``named_parameters`` order (the
    first is the one the walk decides it under, ``_Walk.key``). Read once per graph module:
    every walk and the cost builder's search ask for it thousands of times."""
    cache = _CACHE.setdefault(gm, {})
    if "aliases" not in cache:
        by_id: dict[int, list[str]] = {}
        for n, p in gm.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        cache["aliases"] = {n: tuple(names) for names in by_id.values() for n in names}
    return cache["aliases"]


def to_sharded(analysis: Analysis, layer, name: str = "", gm: fx.GraphModule | None = None,
               ) -> ShardedLayer:
    """The plain data the cost model prices (``cost_models.sharded.ShardedLayer``):
    collectives, this rank's bytes of the layer's own parameters, and per op class the
    share of the layer's work one rank runs."""
    if gm is not None:  # a pure function of its arguments: priced once per candidate
        memo = _CACHE.setdefault(gm, {}).setdefault("to_sharded", {})
        hit = memo.get((id(analysis), layer.name, name))
        if hit is not None and hit[0] is analysis:
            return hit[1]
        out = _to_sharded(analysis, layer, name, gm)
        memo[(id(analysis), layer.name, name)] = (analysis, out)
        return out
    return _to_sharded(analysis, layer, name, None)


def _to_sharded(analysis: Analysis, layer, name: str, gm: fx.GraphModule | None,
                ) -> ShardedLayer:
    aliases = _aliases(gm) if gm is not None else {}
    own = same_params(gm, layer.params) if gm is not None else set(layer.params)
    seen: set[str] = set()
    targets = []  # one name per tensor: a tied table may be fetched under two names
    for t in analysis.param_bytes:
        key = min(aliases.get(t, (t,)))
        if t in own and key not in seen:
            seen.add(key)
            targets.append(t)
    local_own = sum(analysis.param_bytes[t] for t in targets)
    missing = layer.param_bytes - sum(_full_bytes(analysis, t) for t in targets)
    sums: dict[str, list[float]] = {}
    act_total = act_local = weight = weight_local = 0.0
    for op_class, gf, lf, gb, lb, gw, lw in analysis.work.values():
        acc = sums.setdefault(op_class, [0.0, 0.0, 0.0, 0.0])
        acc[0] += gf
        acc[1] += lf
        acc[2] += gb
        acc[3] += lb
        act_total += gb
        act_local += lb
        if op_class == "matmul":
            weight, weight_local = weight + gw, weight_local + lw
    work = {c: (a[1] / a[0] if a[0] else 1.0, a[3] / a[2] if a[2] else 1.0)
            for c, a in sums.items()}
    return ShardedLayer(
        tp=analysis.tp,
        collectives=tuple((c.kind, c.bytes, c.batched) for c in analysis.collectives),
        param_bytes=int(local_own + max(missing, 0)),
        work=work,
        activation_fraction=act_local / act_total if act_total else 1.0,
        weight_fraction=weight_local / weight if weight else 1.0,
        kv_fraction=analysis.kv_fraction,
        strategy=name,
    )


def _full_bytes(analysis: Analysis, target: str) -> int:
    p = analysis.params[target]
    local = analysis.param_bytes[target]
    if isinstance(p, Shard):
        return int(round(local * p.size / p.local(analysis.tp)))
    return local


def greedy_stage_sharding(traced, first: int, last: int, tp: int, *,
                          sequence_parallel: bool = False, ratio: float = 1.0,
                          is_last: bool = True) -> StageSharding | None:
    """A stage's record with each layer's greedy strategy (no pricing): for plans pinned
    by hand (tests, examples) rather than solved. ``ratio`` scales the analysed bytes to
    the plan's microbatch (microbatch tokens / traced tokens)."""
    if tp <= 1:
        return None
    templates = []
    for j in range(first, last + 1):
        a = analyse_layer(traced, j, tp, sequence_parallel=sequence_parallel)
        layer = traced.layers[j]
        prefix = layer.name + "." if layer.kind == "block" else ""
        params = {t[len(prefix):]: p for t, p in a.params.items()
                  if isinstance(p, Shard) and t.startswith(prefix)}
        collectives = tuple(c.scaled(ratio) for c in a.collectives)
        templates.append(TemplateSharding((j,), params, collectives, "greedy"))
    boundary: tuple[Collective, ...] = ()
    if sequence_parallel and not is_last:
        hidden = hidden_values(traced)
        boundary = tuple(Collective("all_gather", int(round(t.bytes * ratio)), t.name,
                                    "stage output", "boundary")
                         for t in traced.cuts[last].tensors if t.name in hidden)
    return StageSharding(tp, tuple(templates), boundary, sequence_parallel)

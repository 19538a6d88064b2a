"""Tracing: any model -> a TracedModel (fx graph, IR, layers, cut points).

``torch.export.export(strict=False)`` is tried first (the only front end that captures
transformers 5.x models); ``fx.symbolic_trace`` with configurable leaf modules is the
fallback. Both produce an fx GraphModule whose nodes carry ``meta["val"]`` (fake tensors:
shapes and dtypes) and ``nn_module_stack``; everything after that is tracer-agnostic.

Models on the ``meta`` device trace without allocating weights. A deep stack of identical
blocks on ``meta`` is *folded*: a few blocks are traced, the traced blocks are checked to be
identical op for op, and the rest are copies of the last traced one (so Llama-3-70B traces
in seconds). A folded graph module holds only the traced blocks; layers and cuts cover all.

>>> import torch, planner
>>> from planner.models import GPT, GPTConfig
>>> m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)).eval()
>>> traced = planner.trace(m, args=(torch.zeros(1, 8, dtype=torch.long),))
>>> [layer.name for layer in traced.layers]
['pre', 'h.0', 'h.1', 'post']
"""

from __future__ import annotations

import hashlib
import logging
import sys
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn

from planner.arch import ModelArch
from planner.graph_ir import build_graph, module_path, node_shape
from planner.layers import (
    OP_CLASSES,
    BlockRun,
    CrossingTensor,
    CutPoint,
    Layer,
    OpStats,
    find_block_container,
)
from planner.op_stats import node_work, tensor_bytes, tensors_in

__all__ = ["trace", "TracedModel", "TraceError"]

# Blocks traced when folding: block 0 may differ (first-layer special cases), so the check
# compares the traced blocks after it.
_FOLD_TRACED_BLOCKS = 3
_FOLD_MIN_BLOCKS = 6


class TraceError(RuntimeError):
    """Neither tracer could capture the model; the message names where and what to do."""


@dataclass
class TracedModel:
    """A model captured as an fx graph and cut into layers.

    Attributes:
        name: display name.
        graph_module: the fx GraphModule; calling it equals calling the model (unless folded).
        graph: the networkx IR (see ``planner.graph_ir``).
        layers: ``[pre, block 0, ..., block n-1, post]`` (empty pre/post dropped).
        cuts: ``cuts[j]`` is the boundary after ``layers[j]``.
        arch: transformer hyper-parameters when known.
        fingerprint: hash of the layer structure and shapes (independent of device and folding).
        tracer: ``"export"`` or ``"symbolic_trace"``.
        folded: True if identical blocks were traced once and copied.
        layer_of_node: fx node name -> index of the (traced) layer that holds it.
        block_container: module path of the repeated-block list (``"model.layers"``).
        num_params / param_bytes: of the whole model (tied parameters counted once).
        input_shapes: shapes of the example tensor inputs.
        dtype: parameter dtype.
        batch_size, seq_len: the traced shape: (B, T) of token ids (or of the first input
            of a transformer), else (B, 1); layer statistics describe this shape.
    """

    name: str
    graph_module: fx.GraphModule
    graph: nx.DiGraph
    layers: list[Layer]
    cuts: list[CutPoint]
    arch: ModelArch | None
    fingerprint: str
    tracer: str
    folded: bool
    layer_of_node: dict[str, int]
    block_container: str | None
    num_params: int
    param_bytes: int
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtype: str = "float32"
    batch_size: int = 1
    seq_len: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The layer table as plain data (what ``plan MODEL --json`` prints before solving)."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "tracer": self.tracer,
            "folded": self.folded,
            "num_params": self.num_params,
            "param_bytes": self.param_bytes,
            "flops": self.flops,
            "dtype": self.dtype,
            "input_shapes": [list(s) for s in self.input_shapes],
            "arch": self.arch.to_dict() if self.arch else None,
            "layers": [
                {
                    "index": layer.index,
                    "name": layer.name,
                    "kind": layer.kind,
                    "ops": sum(s.count for c, s in layer.op_stats.items() if c != "view"),
                    "param_bytes": layer.param_bytes,
                    "flops": layer.flops,
                    "activation_bytes": layer.activation_bytes,
                    "peak_activation_bytes": layer.peak_activation_bytes,
                    "output_bytes": layer.output_bytes,
                    "op_stats": {c: vars(s) for c, s in layer.op_stats.items()},
                }
                for layer in self.layers
            ],
            "cuts": [
                {
                    "after_layer": cut.after_layer,
                    "bytes": cut.bytes,
                    "tensors": [
                        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                         "bytes": t.bytes, "role": t.role}
                        for t in cut.tensors
                    ],
                }
                for cut in self.cuts
            ],
        }


def trace(
    model: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    name: str | None = None,
    arch: ModelArch | None = None,
    fold_blocks: bool | None = None,
    leaf_modules: tuple[type, ...] = (),
    tracer: str = "auto",
) -> TracedModel:
    """Trace ``model`` on example inputs into layers and cut points.

    Args:
        model: the module (on ``cpu``, ``cuda`` or ``meta``). Put it in eval mode first.
        args, kwargs: example inputs (e.g. ``kwargs={"input_ids": ids, "use_cache": False}``).
        name: display name (defaults to the class name).
        arch: hyper-parameters; read from ``model.config`` when it is a transformers config
            or has ``to_arch()`` (``planner.models.GPT``).
        fold_blocks: trace a few identical blocks and copy the rest. Default: when the model
            is on ``meta`` and has at least 6 blocks.
        leaf_modules: module classes the ``symbolic_trace`` fallback must not trace into.
        tracer: ``"auto"`` (export, then symbolic_trace), ``"export"`` or ``"symbolic_trace"``.

    Raises:
        TraceError: neither tracer captured the model; the message names the failing module.
    """
    kwargs = dict(kwargs or {})
    name = name or type(model).__name__
    if arch is None:
        arch = ModelArch.of_module(model)
    blocks = find_block_container(model)
    num_blocks = blocks.count if blocks is not None else 0
    on_meta = any(p.is_meta for p in model.parameters())
    if fold_blocks is None:
        fold_blocks = on_meta and num_blocks >= _FOLD_MIN_BLOCKS and _uniform_blocks(model, blocks)
    if fold_blocks and not (num_blocks > _FOLD_TRACED_BLOCKS and _uniform_blocks(model, blocks)
                            and _truncatable(model, blocks)):
        fold_blocks = False

    traced_blocks = _FOLD_TRACED_BLOCKS if fold_blocks else num_blocks
    run = blocks.first_blocks(traced_blocks) if blocks is not None else None
    with _truncated_blocks(model, blocks, traced_blocks if fold_blocks else None):
        gm, tracer_used = _capture(model, args, kwargs, leaf_modules, tracer)
    if fold_blocks and not _traced_blocks_identical(gm, run):
        fold_blocks, traced_blocks, run = False, num_blocks, blocks
        gm, tracer_used = _capture(model, args, kwargs, leaf_modules, tracer)

    layer_of = _assign_layers(gm, run)
    graph = build_graph(gm, layer_of)
    traced_layers = _build_layers(gm, graph, layer_of, run)
    traced_cuts = _build_cuts(gm, graph, layer_of, len(traced_layers))
    if fold_blocks:
        layers, cuts = _unfold(model, traced_layers, traced_cuts, blocks, traced_blocks)
    else:
        layers, cuts = traced_layers, traced_cuts
    layers, cuts, layer_of = _drop_empty_edges(layers, cuts, layer_of)

    unique = {id(p): p for p in model.parameters()}.values()
    inputs = tensors_in((args, kwargs))
    input_shapes = [tuple(t.shape) for t in inputs]
    batch_size, seq_len = _batch_and_sequence(inputs, arch)
    dtype = next((str(p.dtype).removeprefix("torch.") for p in unique), "float32")
    return TracedModel(
        name=name,
        graph_module=gm,
        graph=graph,
        layers=layers,
        cuts=cuts,
        arch=arch,
        fingerprint=_fingerprint(gm, layers, layer_of, input_shapes),
        tracer=tracer_used,
        folded=bool(fold_blocks),
        layer_of_node=layer_of,
        block_container=blocks.container if blocks is not None else None,
        num_params=sum(p.numel() for p in unique),
        param_bytes=sum(p.numel() * p.element_size() for p in unique),
        input_shapes=input_shapes,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
    )


def _batch_and_sequence(inputs: list[torch.Tensor], arch: ModelArch | None) -> tuple[int, int]:
    if not inputs or inputs[0].dim() == 0:
        return 1, 1
    first = inputs[0]
    tokens = not first.is_floating_point() and first.dim() == 2
    if first.dim() >= 2 and (tokens or (arch is not None and arch.is_transformer)):
        return int(first.shape[0]), int(first.shape[1])
    return int(first.shape[0]), 1


# --------------------------------------------------------------------------- capture


def _capture(model, args, kwargs, leaf_modules, tracer) -> tuple[fx.GraphModule, str]:
    errors: list[tuple[str, BaseException]] = []
    if tracer in ("auto", "export"):
        try:
            with _quiet_export_logs(), _meta_traced_as_cpu(model):
                ep = torch.export.export(model, tuple(args), kwargs, strict=False)
            return ep.module(), "export"
        except Exception as e:  # torch.export raises many types; all mean "did not capture"
            errors.append(("torch.export", e))
    if tracer in ("auto", "symbolic_trace"):
        try:
            return _symbolic_trace(model, args, kwargs, leaf_modules), "symbolic_trace"
        except Exception as e:
            errors.append(("fx.symbolic_trace", e))
    if not errors:
        raise ValueError(f"tracer must be 'auto', 'export' or 'symbolic_trace', not {tracer!r}")
    raise TraceError(_explain_failure(model, errors)) from errors[-1][1]


class _meta_traced_as_cpu:
    """Export a model built on ``meta`` as if it were on ``cpu``.

    Export traces with fake tensors that report the device of the real ones, so a model on
    ``meta`` runs its non-cpu code paths: transformers' MoE routing counts tokens per expert
    with ``histc`` on float on cpu and on int32 elsewhere, so a meta trace of Mixtral differed
    from the cpu trace that ``plan run`` compares it with (another fingerprint, and a few
    FLOPs). While active, a fake tensor made from a real ``meta`` tensor reports ``cpu``: the
    trace is the cpu trace, and still no weight is allocated. The graph module keeps the
    meta parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        self.active = any(t.is_meta for t in _tensors_of(model))

    def __enter__(self):
        if not self.active:
            return self
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

        self.cls, self.original = FakeTensorMode, FakeTensorMode.from_tensor
        cpu, original = torch.device("cpu"), self.original

        def from_tensor(mode, tensor, *args, **kwargs):
            fake = original(mode, tensor, *args, **kwargs)
            if tensor.is_meta and not isinstance(tensor, FakeTensor) and \
                    isinstance(fake, FakeTensor) and fake.fake_device.type == "meta":
                fake.fake_device = cpu
            return fake

        FakeTensorMode.from_tensor = from_tensor
        return self

    def __exit__(self, *exc):
        if self.active:
            self.cls.from_tensor = self.original
        return False


def _tensors_of(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


class _quiet_export_logs:
    """Silence export's own warnings (graph dumps on a failed guard); the error says it all."""

    def __enter__(self):
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)
        return False


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf_modules: tuple[type, ...]) -> None:
        super().__init__()
        self._leaves = leaf_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def _symbolic_trace(model, args, kwargs, leaf_modules) -> fx.GraphModule:
    graph = _LeafTracer(tuple(leaf_modules)).trace(model)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = list(args)
    for node in placeholders[len(inputs):]:
        if node.target in kwargs:
            inputs.append(kwargs[node.target])
        elif node.args:
            inputs.append(node.args[0])  # the parameter's default value
        else:
            raise TypeError(f"no example input for argument {node.target!r}")
    tensors = tensors_in(inputs) + list(model.parameters())
    if any(t.is_meta for t in tensors):
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        FakeTensorProp(gm, mode).propagate(*fake)
    else:
        # Real weights: run the example once (a leaf module may branch on data, which fake
        # tensors cannot do) and keep shape-only meta copies of every value.
        _MetaRecorder(gm).run(*inputs)
    return gm


class _MetaRecorder(fx.Interpreter):
    """Runs the graph and stores a ``meta``-device copy of each value in ``node.meta["val"]``."""

    def run_node(self, n: fx.Node):
        if n.op == "call_module":  # an opaque leaf: count what it does by running it
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            n.meta["flops"] = counter.get_total_flops()
        else:
            result = super().run_node(n)
        n.meta["val"] = torch.utils._pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty_like(t, device="meta"), result
        )
        return result


def _explain_failure(model: nn.Module, errors: list[tuple[str, BaseException]]) -> str:
    names = {id(m): (path or "<root>", type(m).__name__) for path, m in model.named_modules()}
    parts = []
    for tracer_name, exc in errors:
        where = _failing_module(exc, names)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(message) > 300:
            message = message[:297] + "..."
        loc = f" in module {where}" if where else ""
        parts.append(f"{tracer_name} failed{loc}: {type(exc).__name__}: {message}")
    return (
        f"cannot trace {type(model).__name__}: " + "; ".join(parts) + ". What to do: make the "
        "failing module traceable (replace data-dependent Python control flow with tensor ops or "
        "torch.cond), pass example inputs that avoid the failing branch, or keep the module "
        "opaque to the fallback tracer with planner.trace(..., leaf_modules=(ThatModule,))."
    )


def _failing_module(exc: BaseException, names: dict[int, tuple[str, str]]) -> str | None:
    """The innermost model submodule on the failing stack, and the user line that failed."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    module, line = None, None
    for e in reversed(chain):
        for frame, lineno in traceback.walk_tb(e.__traceback__):
            filename = frame.f_code.co_filename
            owner = frame.f_locals.get("self")
            if filename.endswith("torch/nn/modules/module.py") and id(owner) in names:
                module = "{} ({})".format(*names[id(owner)])
            elif "/torch/" not in filename and "/planner/" not in filename:
                line = f"{filename.rsplit('/', 1)[-1]}:{lineno}"
    if module and line:
        return f"{module} at {line}"
    return module


# --------------------------------------------------------------------------- folding


def _block_modules(model: nn.Module, blocks: BlockRun) -> list[nn.Module]:
    container = model.get_submodule(blocks.container)
    return [getattr(container, name) for name in blocks.names]


def _uniform_blocks(model: nn.Module, blocks: BlockRun | None) -> bool:
    if blocks is None:
        return False
    modules = _block_modules(model, blocks)
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types and len(set(layer_types)) > 1:
        return False  # e.g. alternating sliding-window / full attention
    first = [(n, tuple(p.shape), p.dtype) for n, p in modules[0].named_parameters()]
    return all(
        type(b) is type(modules[0]) and [(n, tuple(p.shape), p.dtype) for n, p in b.named_parameters()] == first
        for b in modules[1:]
    )


def _truncatable(model: nn.Module, blocks: BlockRun) -> bool:
    """Whether blocks can be dropped without renaming the container's other children: a
    Sequential keeps its children's names; a ModuleList only when it holds nothing else.
    The root itself cannot be replaced."""
    return bool(blocks.container) and (
        isinstance(model.get_submodule(blocks.container), nn.Sequential) or blocks.whole)


class _truncated_blocks:
    """Context manager: temporarily keep only the first ``keep`` blocks of the run (the
    container's other children stay, under their names)."""

    def __init__(self, model: nn.Module, blocks: BlockRun | None, keep: int | None) -> None:
        self.model, self.blocks, self.keep, self.saved = model, blocks, keep, None

    def __enter__(self):
        if self.keep is None or self.blocks is None:
            return self
        parent_path, _, attr = self.blocks.container.rpartition(".")
        self.parent = self.model.get_submodule(parent_path) if parent_path else self.model
        self.saved = getattr(self.parent, attr)
        dropped = set(self.blocks.names[self.keep:])
        kept = [(n, m) for n, m in self.saved.named_children() if n not in dropped]
        if isinstance(self.saved, nn.Sequential):
            shorter = nn.Sequential(OrderedDict(kept))
        else:
            shorter = type(self.saved)([m for _, m in kept])
        setattr(self.parent, attr, shorter)
        self.attr = attr
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            setattr(self.parent, self.attr, self.saved)
        return False


def _block_signature(gm: fx.GraphModule, run: BlockRun, index: int) -> list:
    sig = []
    for node in gm.graph.nodes:
        if run.index(_module_paths(node)) == index and node.op != "get_attr":
            sig.append((node.op, node_work(node).op, node_shape(node)))
    return sig


def _traced_blocks_identical(gm: fx.GraphModule, run: BlockRun) -> bool:
    reference = _block_signature(gm, run, 1)
    return bool(reference) and all(
        _block_signature(gm, run, i) == reference for i in range(2, run.count)
    )


def _unfold(model, layers, cuts, blocks: BlockRun, traced_blocks: int):
    """Expand layers/cuts of a folded trace to all of ``blocks``."""
    modules = _block_modules(model, blocks)
    num_blocks = blocks.count
    pre, traced_block_layers, post = layers[0], layers[1:-1], layers[-1]
    out = [pre]
    for i in range(num_blocks):
        rep = traced_block_layers[min(i, traced_blocks - 1)]
        owned = {id(p): p for p in modules[i].parameters()}.values()
        out.append(
            replace(
                rep,
                index=i + 1,
                name=blocks.path(i),
                param_bytes=sum(p.numel() * p.element_size() for p in owned),
                params=tuple(f"{blocks.path(i)}.{n}" for n, _ in modules[i].named_parameters()),
            )
        )
    out.append(replace(post, index=num_blocks + 1))
    new_cuts = []
    for after in range(num_blocks + 1):
        if after == 0:
            src = cuts[0]
        elif after == num_blocks:
            src = cuts[traced_blocks]
        else:
            src = cuts[min(after, traced_blocks - 1)]
        new_cuts.append(replace(src, after_layer=after))
    return out, new_cuts


# --------------------------------------------------------------------------- layers


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v[0], str) else str(v[0]) for v in stack.values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths


def _assign_layers(gm: fx.GraphModule, run: BlockRun | None) -> dict[str, int]:
    """Node name -> layer index: 0 = pre, 1..n = blocks, n + 1 = post.

    Block nodes are placed by their module path. Other nodes follow their inputs: a node
    fed only by pre-layer values is pre; one fed by the last block (or later) is post; one
    fed by an earlier block travels with that block. Parameters go to their first user.
    Inputs are pre, except an input that only one block uses (a decode step's KV cache of
    that block, ``planner.decode``): it belongs to that block.
    """
    num_blocks = run.count if run is not None else 0
    post = num_blocks + 1
    layer_of: dict[str, int] = {}
    deferred: list[fx.Node] = []
    inputs: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            deferred.append(node)
            continue
        if node.op == "placeholder":
            layer_of[node.name] = 0
            inputs.append(node)
            continue
        if node.op == "output":
            layer_of[node.name] = post
            continue
        block = run.index(_module_paths(node)) if run is not None else None
        if block is not None:
            layer_of[node.name] = block + 1
            continue
        deps = [layer_of[a.name] for a in node.all_input_nodes if a.name in layer_of]
        layer = max(deps, default=0)
        layer_of[node.name] = post if layer >= num_blocks and num_blocks > 0 else layer
    for node in deferred:
        users = [layer_of[u.name] for u in node.users if u.name in layer_of]
        layer_of[node.name] = min(users, default=0)
    for node in inputs:  # (export's input guard, ``_guards_fn``, computes no tensor)
        users = {layer_of[u.name] for u in node.users if tensors_in(u.meta.get("val"))}
        if len(users) == 1 and 1 <= min(users) <= num_blocks:
            layer_of[node.name] = users.pop()
    return layer_of


def _block_state_outputs(gm: fx.GraphModule, layer_of, n_layers: int) -> set[str]:
    """Returned values that are a block's updated copy of its own input (a decode step's
    KV cache written with ``scatter``/``index_copy``/``index_put``: the op's first argument
    is an input of the same block) that no later layer reads. They are the block's state:
    the stage holding the block keeps them, so they cross no cut. An input returned
    untouched (the cache of a block dropped by folding) is state too."""
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    state: set[str] = set()
    for node in out.all_input_nodes if out is not None else ():
        if node.op == "placeholder" and not any(
                u.op != "output" and tensors_in(u.meta.get("val")) for u in node.users):
            state.add(node.name)
            continue
        j = layer_of[node.name]
        base = node.args[0] if node.op == "call_function" and node.args else None
        if (0 < j < n_layers - 1 and isinstance(base, fx.Node) and base.op == "placeholder"
                and layer_of[base.name] == j
                and all(u.op == "output" or layer_of[u.name] == j for u in node.users)):
            state.add(node.name)
    return state


def _node_params(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, torch.Tensor]]:
    if node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            return []
        return [(str(node.target), value)]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return [(f"{node.target}.{n}", p) for n, p in mod.named_parameters()]
    return []


def _node_buffers(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    if node.op == "get_attr":
        try:
            return [gm.get_buffer(node.target)]
        except AttributeError:
            return []
    if node.op == "call_module":
        return list(gm.get_submodule(node.target).buffers())
    return []


def _build_layers(gm, graph: nx.DiGraph, layer_of, run: BlockRun | None) -> list[Layer]:
    n_layers = (run.count if run is not None else 0) + 2
    nodes_of: list[list[fx.Node]] = [[] for _ in range(n_layers)]
    for node in gm.graph.nodes:
        nodes_of[layer_of[node.name]].append(node)

    owner: dict[int, int] = {}
    for node in gm.graph.nodes:
        for _, p in _node_params(gm, node):
            owner.setdefault(id(p), layer_of[node.name])
            owner[id(p)] = min(owner[id(p)], layer_of[node.name])
    last_use = {}
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            last_use[src.name] = node
    state = _block_state_outputs(gm, layer_of, n_layers)

    layers = []
    for index, nodes in enumerate(nodes_of):
        stats: dict[str, OpStats] = {}
        owned: dict[int, tuple[str, torch.Tensor]] = {}
        tied: dict[int, str] = {}
        buffers: dict[int, torch.Tensor] = {}
        for node in nodes:
            attrs = graph.nodes[node.name]
            if node.op not in ("placeholder", "output", "get_attr"):
                stats[attrs["op_class"]] = stats.get(attrs["op_class"], OpStats()) + OpStats(
                    attrs["count"], attrs["flops"], attrs["bytes_read"], attrs["bytes_written"]
                )
            for pname, p in _node_params(gm, node):
                (owned if owner[id(p)] == index else tied).setdefault(id(p), (pname, p))
            for src in node.all_input_nodes:  # a parameter fetched by another layer's get_attr
                for pname, p in _node_params(gm, src) if src.op == "get_attr" else ():
                    if owner[id(p)] != index:
                        tied.setdefault(id(p), (pname, p))
            for b in _node_buffers(gm, node):
                buffers[id(b)] = b
        kind = "pre" if index == 0 else "post" if index == n_layers - 1 else "block"
        name = "pre" if kind == "pre" else "post" if kind == "post" else run.path(index - 1)
        members = {n.name for n in nodes}
        layers.append(
            Layer(
                index=index,
                name=name,
                kind=kind,
                nodes=tuple(n.name for n in nodes),
                param_bytes=sum(tensor_bytes(p) for _, p in owned.values()),
                flops=sum(s.flops for s in stats.values()),
                activation_bytes=sum(graph.nodes[n.name]["bytes_written"] for n in nodes),
                peak_activation_bytes=_peak_live_bytes(nodes, graph, members, last_use),
                output_bytes=sum(
                    _crossing_bytes(graph, n)
                    for n in nodes
                    if n.op != "get_attr" and n.name not in state
                    and any(layer_of[u.name] > index for u in n.users)
                ),
                op_stats={c: stats[c] for c in OP_CLASSES if c in stats},
                params=tuple(pn for pn, _ in owned.values()),
                tied_params=tuple(pn for pn, _ in tied.values()),
                buffer_bytes=sum(tensor_bytes(b) for b in buffers.values()),
            )
        )
    return layers


def _peak_live_bytes(nodes, graph, members, last_use) -> int:
    """Largest total of layer-produced tensors alive at once.

    A view (``view``, ``transpose``, ``alias``...) allocates nothing but keeps its base
    alive: a base is freed only after the last use of the base or of any view of it.
    """
    position = {n.name: i for i, n in enumerate(nodes)}
    base_of: dict[str, str] = {}
    for node in nodes:
        if graph.nodes[node.name]["op_class"] == "view" and node.all_input_nodes:
            src = node.all_input_nodes[0].name
            base_of[node.name] = base_of.get(src, src)
    release_after: dict[str, int] = {}
    for name, user in last_use.items():
        base = base_of.get(name, name)
        if base in members:
            at = position.get(user.name, len(nodes))  # used by a later layer: live to the end
            release_after[base] = max(release_after.get(base, -1), at)
    live: dict[str, int] = {}
    peak = 0
    for i, node in enumerate(nodes):
        written = graph.nodes[node.name]["bytes_written"]
        if written:
            live[node.name] = written
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if release_after.get(n, i) <= i]:
            del live[name]
    return peak


def _crossing_bytes(graph: nx.DiGraph, node: fx.Node) -> int:
    """Bytes to send for ``node``'s value; a view (an expand) costs no more than its base."""
    value_bytes = tensor_bytes(node.meta.get("val"))
    if graph.nodes[node.name]["op_class"] == "view" and node.all_input_nodes:
        base = sum(tensor_bytes(a.meta.get("val")) for a in node.all_input_nodes)
        return min(value_bytes, base) if base else value_bytes
    return value_bytes


def _role(node: fx.Node, producer_layer: int, after: int) -> str:
    if node.op == "placeholder":
        return "input"
    path = module_path(node).lower()
    if "rotary" in path or "rope" in path:
        return "rotary"
    tensors = tensors_in(node.meta.get("val"))
    if any(t.dtype == torch.bool for t in tensors) or "mask" in node.name:
        return "mask"
    if tensors and not tensors[0].is_floating_point():
        return "position"
    if producer_layer == after:
        return "hidden"
    return "other"


def _build_cuts(gm, graph: nx.DiGraph, layer_of, n_layers: int) -> list[CutPoint]:
    crossing: list[list[CrossingTensor]] = [[] for _ in range(n_layers - 1)]
    state = _block_state_outputs(gm, layer_of, n_layers)
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "output") or not tensors_in(node.meta.get("val")):
            continue
        src = layer_of[node.name]
        last = max((layer_of[u.name] for u in node.users), default=src)
        if node.name in state:
            last = src  # a block's updated KV cache stays with the block
        elif node.users and all(u.op == "output" for u in node.users):
            last = n_layers - 1  # returned from the model: the post layer must hold it
        shape = node_shape(node)
        for after in range(src, min(last, n_layers - 1)):
            crossing[after].append(
                CrossingTensor(
                    name=node.name,
                    shape=shape[0] if shape else (),
                    dtype=shape[1] if shape else "tuple",
                    bytes=_crossing_bytes(graph, node),
                    producer_layer=src,
                    role=_role(node, src, after),
                )
            )
    return [CutPoint(j, tuple(ts), sum(t.bytes for t in ts)) for j, ts in enumerate(crossing)]


def _drop_empty_edges(layers, cuts, layer_of):
    """Drop a pre or post layer that holds no work and no parameters; renumber."""
    def empty(layer: Layer) -> bool:
        return layer.flops == 0 and layer.param_bytes == 0 and layer.activation_bytes == 0

    drop_pre = len(layers) > 1 and empty(layers[0]) and layers[0].kind == "pre"
    drop_post = len(layers) > 1 and empty(layers[-1]) and layers[-1].kind == "post"
    if not (drop_pre or drop_post):
        return layers, cuts, layer_of
    keep = layers[1 if drop_pre else 0 : len(layers) - (1 if drop_post else 0)]
    shift = 1 if drop_pre else 0
    new_layers = [replace(layer, index=i) for i, layer in enumerate(keep)]
    new_cuts = [replace(c, after_layer=c.after_layer - shift) for c in cuts[shift : shift + len(keep) - 1]]
    last = len(new_layers) - 1
    new_layer_of = {n: min(max(i - shift, 0), last) for n, i in layer_of.items()}
    return new_layers, new_cuts, new_layer_of


def _fingerprint(gm, layers: list[Layer], layer_of, input_shapes) -> str:
    """Hash of every layer's op sequence with shapes and of the inputs: equal for the same
    model traced on any device, folded or not."""
    per_traced_layer: dict[int, list] = {}
    for node in gm.graph.nodes:
        work = node_work(node)
        # Views and layout ops are left out: export keeps a `contiguous` on meta that it
        # elides on cpu; a layout op that copies (class copy) follows from the shapes
        # and strides of the ops around it.
        if node.op in ("get_attr", "placeholder", "output") or work.op_class in ("view", "copy"):
            continue
        per_traced_layer.setdefault(layer_of[node.name], []).append((work.op, node_shape(node)))
    h = hashlib.sha256()
    h.update(repr(input_shapes).encode())
    for layer in layers:
        traced_index = layer_of.get(layer.nodes[0]) if layer.nodes else None
        h.update(f"{layer.kind}|{layer.param_bytes}|".encode())
        h.update(repr(per_traced_layer.get(traced_index, [])).encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `plan` command or planner.trace()")

"""Stage split: one fx GraphModule per pipeline stage, cut at a plan's layer boundaries.

Stage ``s`` holds the nodes of layers ``[first, last]``. Its inputs are exactly the tensors
that cross the cut before ``first`` (``traced.cuts[first - 1].tensors``: hidden state,
rotary cos/sin, masks, position ids), or the model's tensor inputs for stage 0; its outputs
are the tensors crossing the cut after ``last``, or the model's flattened outputs for the
last stage. A parameter or buffer goes only to the stages that read it (a tied weight is
held by each stage that uses it).

>>> import torch, planner
>>> from planner.models import load_model
>>> lm = load_model("gpt-tiny", batch_size=2, seq_len=8)
>>> traced = planner.trace(lm.model, lm.args)
>>> stages = split_stages(traced, [(0, 2), (3, 5)])
>>> [s.inputs for s in stages], [s.outputs for s in stages]
([('idx',), ('add_4',)], [('add_4',), ('linear_16',)])
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = [
    "StageGraph",
    "StageSplitError",
    "split_stages",
    "check_stage_ranges",
    "model_tensor_inputs",
    "run_stages",
]

# Export's input-shape guard: it pins the traced batch size, which microbatching changes.
_DROPPED_MODULES = ("_guards_fn",)


class StageSplitError(ValueError):
    """Stage ranges that do not partition the layers, or a graph that cannot be cut there."""


@dataclass
class StageGraph:
    """One pipeline stage as an fx graph.

    Attributes:
        index: stage number.
        layers: ``(first, last)`` inclusive layer indices.
        module: the stage's GraphModule; ``module(*inputs)`` returns a tuple of ``outputs``.
        inputs: names of the values the stage receives, in call order (fx node names of the
            original graph: cut tensors, or the model's tensor inputs for stage 0).
        outputs: names of the values the stage returns, in order.
        output_spec: for the last stage, the pytree spec that rebuilds the model's output
            type (``CausalLMOutputWithPast``...) from the flat outputs; ``None`` otherwise.
        state_inputs, state_outputs: a decode step's KV cache of this stage's blocks
            (``planner.sharding.block_state``): model inputs the stage takes directly and
            model outputs it returns (after its cut tensors), kept by the stage, never sent.
        model_inputs, model_outputs: the whole model's tensor inputs and flat outputs.
    """

    index: int
    layers: tuple[int, int]
    module: fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    output_spec: Any = None
    state_inputs: tuple[str, ...] = ()
    state_outputs: tuple[str, ...] = ()
    model_inputs: tuple[str, ...] = ()
    model_outputs: tuple[str, ...] = ()


def check_stage_ranges(num_layers: int, stage_layers: Sequence[Sequence[int]]) -> None:
    """Check that ``stage_layers`` (``[(first, last), ...]``) partition ``range(num_layers)``.

    Raises:
        StageSplitError: naming the offending stage and what it should be.
    """
    expected = 0
    for i, (first, last) in enumerate(stage_layers):
        if first != expected or last < first:
            raise StageSplitError(
                f"stage {i} covers layers [{first}, {last}]; stages must cover the {num_layers} "
                f"layers contiguously, so stage {i} must start at layer {expected} and end at or "
                f"after it (splits given: {[list(r) for r in stage_layers]})")
        expected = last + 1
    if expected != num_layers:
        raise StageSplitError(
            f"the stages end at layer {expected - 1} but the model has {num_layers} layers "
            f"(0..{num_layers - 1}); extend the last stage to layer {num_layers - 1}")


def split_stages(traced, stage_layers: Sequence[Sequence[int]]) -> list[StageGraph]:
    """Cut ``traced.graph_module`` into one GraphModule per stage.

    Args:
        traced: a ``planner.TracedModel`` (not folded: every block must be in the graph).
        stage_layers: ``[(first, last), ...]`` inclusive layer ranges, contiguous, in order.

    Returns:
        One ``StageGraph`` per range. Calling them in a chain, feeding each stage the named
        outputs of the stages before it, equals calling the model.

    Raises:
        StageSplitError: bad ranges, a folded trace, or a value that crosses a cut without
            being a tensor listed in the cut point.
    """
    if traced.folded:
        raise StageSplitError(
            f"{traced.name} was traced folded (blocks copied, not traced); trace it on real "
            "weights or with fold_blocks=False to generate code")
    ranges = [(int(a), int(b)) for a, b in stage_layers]
    check_stage_ranges(len(traced.layers), ranges)
    gm = traced.graph_module
    layer_of = traced.layer_of_node
    stage_of_layer = {j: s for s, (a, b) in enumerate(ranges) for j in range(a, b + 1)}

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    model_inputs = tuple(n.name for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor))
    # Non-tensor inputs (``use_cache=False``) were specialised by export; inline their value.
    constants = {n.name: n.meta.get("val") for n in placeholders if n.name not in model_inputs}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat_outputs = pytree.tree_leaves(output_node.args[0])
    out_names = tuple(n.name for n in flat_outputs if isinstance(n, fx.Node))
    codegen = gm.graph._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)

    causal = causal_attention(gm)
    from planner.sharding import block_state

    state_in, state_out = block_state(traced)
    stages = []
    for s, (first, last) in enumerate(ranges):
        # a decode step's KV cache: each stage takes and returns its own blocks' (it never
        # crosses a cut); everything else as for a forward pass
        own_in = tuple(n for n in model_inputs
                       if n in state_in and stage_of_layer[layer_of[n]] == s)
        own_out = tuple(n for n in out_names
                        if n in state_out and stage_of_layer[layer_of[n]] == s)
        if s == 0:
            inputs = tuple(n for n in model_inputs if n not in state_in) + own_in
        else:
            inputs = tuple(t.name for t in traced.cuts[first - 1].tensors) + own_in
        if s == len(ranges) - 1:
            outputs = tuple(n for n in out_names if n not in state_out) + own_out
        else:
            outputs = tuple(t.name for t in traced.cuts[last].tensors) + own_out
        module = _build_stage(gm, s, inputs, outputs, constants,
                              lambda n: stage_of_layer[layer_of[n.name]])
        _use_causal_flag(module, causal)
        whole = s == len(ranges) - 1 and outputs == out_names  # the model's output type
        stages.append(StageGraph(s, (first, last), module, inputs, outputs,
                                 out_spec if whole else None, own_in, own_out,
                                 model_inputs, out_names))
    return stages


def _build_stage(gm: fx.GraphModule, s: int, inputs, outputs, constants, stage_of) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    attrs: dict[str, Any] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in inputs:
        ph = graph.placeholder(name)
        ph.meta = dict(by_name[name].meta)
        env[name] = ph

    def lookup(n: fx.Node):
        if n.name in env:
            return env[n.name]
        if n.op == "get_attr":
            attrs[n.target] = operator.attrgetter(n.target)(gm)
            env[n.name] = graph.get_attr(n.target)
            env[n.name].meta = dict(n.meta)
            return env[n.name]
        if n.name in constants:
            return constants[n.name]
        raise StageSplitError(
            f"stage {s} uses {n.name!r} (from layer stage {stage_of(n)}) which is not among the "
            f"tensors crossing into it ({list(inputs)}); a non-tensor value cannot cross a stage "
            "boundary: move the cut or make the value a tensor")

    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or stage_of(node) != s:
            continue
        if node.op == "call_module" and node.target in _DROPPED_MODULES:
            continue
        if node.op == "call_module":
            attrs[node.target] = operator.attrgetter(node.target)(gm)
        env[node.name] = graph.node_copy(node, lookup)
    missing = [name for name in outputs if name not in env]
    if missing:
        raise StageSplitError(f"stage {s} must return {missing} but does not compute or receive "
                              "them; the cut points of the trace are inconsistent")
    graph.output(tuple(env[name] for name in outputs))
    root = nn.Module()
    for target, obj in attrs.items():
        _install(root, target, obj)
    module = fx.GraphModule(root, graph, class_name=f"Stage{s}")
    module.graph.lint()
    return module


_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_MAX_FOLDED = 1 << 26  # elements of a mask worth evaluating at compile time


def causal_attention(gm: fx.GraphModule) -> set[str]:
    """Names of the attention nodes (``aten.scaled_dot_product_attention``) whose mask is
    the causal mask, computed from constants alone.

    transformers builds its causal mask in the graph (``arange``, ``index``, ``le``) and
    export keeps it, so the attention kernel gets a materialised ``[b, 1, L, L]`` mask where
    the eager model takes the kernels' causal path (``is_causal=True``, which skips the
    masked half). A mask that no input, parameter or buffer reaches is a function of the
    traced shapes only: it is evaluated here once, and when it equals the lower-triangular
    mask (boolean, or additive with 0 on and below the diagonal and -inf or the dtype's
    minimum above) over every batch row and head, with as many queries as keys and no
    dropout, the node may take ``is_causal=True`` instead. Any other mask (padding,
    sliding windows, a mask that depends on the inputs) is left as it is.
    """
    values: dict[str, Any] = {}
    out = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _SDPA or len(node.args) < 4:
            continue
        mask_node = node.args[3]
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        if not isinstance(mask_node, fx.Node) or dropout or is_causal:
            continue
        q, k = node.args[0].meta.get("val"), node.args[1].meta.get("val")
        if q is None or k is None or q.shape[-2] != k.shape[-2]:
            continue
        mask = _constant(mask_node, values)
        if isinstance(mask, torch.Tensor) and _is_causal_mask(mask, q.shape[-2]):
            out.add(node.name)
    return out


def _constant(node: fx.Node, values: dict[str, Any]):
    """The value of ``node`` if it depends on no input, parameter or buffer (else None)."""
    if node.name in values:
        return values[node.name]
    value = None
    val = node.meta.get("val")
    small = not isinstance(val, torch.Tensor) or val.numel() <= _MAX_FOLDED
    if node.op == "call_function" and small:
        args = []
        ok = True

        def arg(a):
            nonlocal ok
            if not ok:
                return None
            v = _constant(a, values)
            ok = ok and v is not None
            return v

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg)
        if ok:
            try:
                with torch.no_grad():
                    value = node.target(*args, **kwargs)
            except Exception:  # an op that cannot run eagerly here: not a constant
                value = None
    values[node.name] = value
    return value


def _is_causal_mask(mask: torch.Tensor, n: int) -> bool:
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (n, n):
        return False
    keep = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, keep.expand_as(mask)))
    if not mask.dtype.is_floating_point:
        return False
    low = torch.finfo(mask.dtype).min
    below = (mask == 0) | ~keep
    above = (mask <= low) | keep
    return bool(below.all()) and bool(above.all())


def _use_causal_flag(module: fx.GraphModule, causal: set[str]) -> None:
    """Run the attention nodes in ``causal`` with ``is_causal=True`` and no mask, and drop
    the mask's computation where nothing else uses it (``causal_attention``)."""
    changed = False
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target is _SDPA and node.name in causal:
            node.args = (*node.args[:3], None, 0.0, True)
            changed = True
    if not changed:
        return
    while True:  # export's dtype asserts on the dead mask keep it alive: drop them with it
        module.graph.eliminate_dead_code()
        asserts = [n for n in module.graph.nodes
                   if n.target is torch.ops.aten._assert_tensor_metadata.default
                   and isinstance(n.args[0], fx.Node) and len(n.args[0].users) == 1]
        if not asserts:
            break
        for n in asserts:
            module.graph.erase_node(n)
    module.recompile()


def _install(root: nn.Module, target: str, obj) -> None:
    """Place ``obj`` at dotted ``target`` as a parameter, buffer or submodule."""
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if isinstance(obj, nn.Parameter):
        mod.register_parameter(leaf, obj)
    elif isinstance(obj, torch.Tensor):
        mod.register_buffer(leaf, obj)
    elif isinstance(obj, nn.Module):
        mod.add_module(leaf, obj)
    else:
        setattr(mod, leaf, obj)


def run_stages(stages: Sequence[StageGraph], model_inputs: Sequence[torch.Tensor]) -> tuple:
    """Call the stages in a chain on one process (the reference for the pipelined run).

    Args:
        stages: from ``split_stages`` (possibly sharded).
        model_inputs: the model's tensor inputs, in the order of the model's inputs
            (``stages[0].model_inputs``; for a forward pass, ``stages[0].inputs``).

    Returns:
        The model's flat outputs (the last stage's, with every stage's KV cache where the
        stages keep one).
    """
    names = stages[0].model_inputs or stages[0].inputs
    values: dict[str, Any] = dict(zip(names, model_inputs, strict=True))
    out: tuple = ()
    for stage in stages:
        out = stage.module(*(values[name] for name in stage.inputs))
        values.update(zip(stage.outputs, out, strict=True))
    if stages[-1].model_outputs:  # with a KV cache, every stage returns its own part
        return tuple(values[name] for name in stages[-1].model_outputs)
    return tuple(out)


def model_tensor_inputs(args: Sequence = (), kwargs: dict | None = None) -> list[torch.Tensor]:
    """The model's tensor inputs in the order of stage 0's placeholders (pytree order of
    ``(args, kwargs)``, which is the order ``torch.export`` flattens them in)."""
    return [x for x in pytree.tree_leaves((tuple(args), dict(kwargs or {})))
            if isinstance(x, torch.Tensor)]

"""Per-node work: op class, FLOPs and bytes moved, from the shapes recorded on the graph.

One formula table serves both IRs: ATen ops from ``torch.export`` (``aten.linear``,
``aten.scaled_dot_product_attention``) and torch-level ops from ``fx.symbolic_trace``
(``call_module`` on ``nn.Linear``, ``F.gelu``, ``Tensor.view``). A node's op is reduced to a
name (``"linear"``, ``"conv2d"``, ``"add"``) and looked up; nothing is executed.

>>> import torch
>>> from torch.fx.experimental.proxy_tensor import make_fx
>>> g = make_fx(torch.nn.functional.linear)(torch.zeros(2, 8, 16), torch.zeros(32, 16))  # 2*B*T*in*out
>>> [s.flops for s in map(node_work, g.graph.nodes) if s.op_class == "matmul"]
[16384]
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["NodeWork", "node_work", "op_name", "tensor_bytes", "tensors_in"]

# Op name -> class. Anything not listed is "elementwise" when it produces a floating tensor
# of its input's size, else "other".
_VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "transpose", "permute", "expand", "expand_as", "unsqueeze",
    "squeeze", "slice", "select", "t", "alias", "split", "split_with_sizes", "chunk", "unbind",
    "getitem", "getattr", "size", "sym_size", "contiguous", "flatten", "unflatten", "narrow",
    "view_as", "detach", "_assert_tensor_metadata", "lift_fresh_copy", "dim", "numel",
    "_guards_fn", "floordiv", "type_as", "to",
}
_MATMUL_OPS = {"linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "conv1d", "conv2d", "conv3d",
               "convolution", "_convolution", "einsum", "addmv", "mv", "dot"}
_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_cudnn_attention"}
_NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm",
             "batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
             "native_batch_norm", "instance_norm"}
_EMBEDDING_OPS = {"embedding", "embedding_bag", "index_select", "gather", "index"}
_REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "softmax", "_softmax", "log_softmax",
                  "_log_softmax", "cumsum", "var", "std", "norm", "logsumexp", "argmax", "argmin",
                  "prod", "all", "any", "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d",
                  "_adaptive_avg_pool2d", "max_pool2d_with_indices"}
# FLOPs per output element of norms: mean, variance, normalise, scale, shift.
_NORM_FLOPS_PER_ELEMENT = 5

_MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm", nn.BatchNorm1d: "batch_norm",
    nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm", nn.Embedding: "embedding",
    nn.Dropout: "alias", nn.Identity: "alias", nn.Flatten: "flatten",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.AvgPool2d: "avg_pool2d", nn.MaxPool2d: "max_pool2d",
    nn.Softmax: "softmax",
}
if hasattr(nn, "RMSNorm"):
    _MODULE_OPS[nn.RMSNorm] = "rms_norm"


@dataclass(frozen=True)
class NodeWork:
    """The work of one graph node at the traced shapes."""

    op: str
    op_class: str
    flops: int
    bytes_read: int
    bytes_written: int
    count: int = 1  # kernels launched: more than one for a higher-order op's body


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor inside a (possibly nested) node value."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def tensor_bytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(value))


def op_name(node: fx.Node) -> str:
    """The op a node performs, as a bare name: ``aten.linear.default`` -> ``"linear"``."""
    target = node.target
    if node.op == "call_module":
        mod = _submodule(node)
        for cls, name in _MODULE_OPS.items():
            if isinstance(mod, cls):
                return name
        return type(mod).__name__.lower() if mod is not None else str(target)
    if node.op == "call_method":
        return str(target)
    if node.op != "call_function":
        return node.op
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.strip("_") if name.startswith("__") else name


def _submodule(node: fx.Node):
    root = node.graph.owning_module
    try:
        return root.get_submodule(node.target) if root is not None else None
    except AttributeError:
        return None


def _arg_value(node_or_value):
    if isinstance(node_or_value, fx.Node):
        return node_or_value.meta.get("val")
    return node_or_value


def _inputs(node: fx.Node) -> list[torch.Tensor]:
    vals = [_arg_value(a) for a in node.all_input_nodes]
    if node.op == "call_module":
        mod = _submodule(node)
        if mod is not None:
            vals += list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
    return [t for v in vals for t in tensors_in(v)]


def _numel(value) -> int:
    return sum(t.numel() for t in tensors_in(value))


def _matmul_flops(name: str, node: fx.Node, ins: list[torch.Tensor], out) -> int:
    outs = tensors_in(out)
    if not outs:
        return 0
    out_numel = outs[0].numel()
    if name in ("conv1d", "conv2d", "conv3d", "convolution", "_convolution"):
        weight = _conv_weight(node, ins)
        if weight is None:
            return 0
        # Each output element: (C_in / groups) * prod(kernel) multiply-adds.
        return 2 * out_numel * math.prod(weight.shape[1:])
    if name == "linear":
        weight = _linear_weight(node, ins)
        return 2 * out_numel * weight.shape[-1] if weight is not None else 0
    if name in ("mm", "bmm", "matmul", "addmm", "baddbmm", "addmv", "mv", "dot"):
        # The contracted dimension is the last dim of the first matrix operand.
        mats = [t for t in ins if t.dim() >= 1]
        a = mats[1] if name in ("addmm", "baddbmm", "addmv") and len(mats) >= 3 else mats[0]
        return 2 * out_numel * a.shape[-1]
    if name == "einsum":
        return 2 * out_numel * max((t.shape[-1] for t in ins if t.dim()), default=1)
    return 0


def _linear_weight(node: fx.Node, ins: list[torch.Tensor]) -> torch.Tensor | None:
    if node.op == "call_module":
        return _submodule(node).weight
    return _arg_value(node.args[1]) if len(node.args) > 1 else None


def _conv_weight(node: fx.Node, ins: list[torch.Tensor]) -> torch.Tensor | None:
    if node.op == "call_module":
        return _submodule(node).weight
    return _arg_value(node.args[1]) if len(node.args) > 1 else None


def _attention_flops(node: fx.Node) -> int:
    q, k, v = (_arg_value(a) for a in node.args[:3])
    # QK^T: (B, h, L, E) x (B, h, E, S); PV: (B, h, L, S) x (B, h, S, Ev). Causal masking is
    # not subtracted (the kernels compute full tiles), matching torch.utils.flop_counter.
    batch_heads = math.prod(q.shape[:-2])
    L, E = q.shape[-2], q.shape[-1]
    S, Ev = k.shape[-2], v.shape[-1]
    return 2 * batch_heads * L * S * E + 2 * batch_heads * L * S * Ev


def _higher_order_body(node: fx.Node) -> fx.GraphModule | None:
    """The sub-graph a higher-order op runs (export wraps HF's rotary table in
    ``wrap_with_set_grad_enabled``), or ``None`` for an ordinary op."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            sub = getattr(node.graph.owning_module, str(arg.target), None)
            if isinstance(sub, fx.GraphModule):
                return sub
    return None


def _body_work(name: str, body: fx.GraphModule) -> NodeWork:
    """A higher-order op costs what its body's ops cost; what it holds in memory at once
    (its ``bytes_written``) is the body's peak of live intermediates, not their sum."""
    nodes = list(body.graph.nodes)
    works = [node_work(n) for n in nodes]
    last_use = {src.name: i for i, n in enumerate(nodes) for src in n.all_input_nodes}
    live: dict[str, int] = {}
    peak = 0
    for i, (n, w) in enumerate(zip(nodes, works)):
        if w.bytes_written:
            live[n.name] = w.bytes_written
        peak = max(peak, sum(live.values()))
        for gone in [k for k in live if last_use.get(k, i) <= i and k != n.name]:
            del live[gone]
    classes = [w for w in works if w.op_class not in ("view", "other")]
    op_class = max(classes, key=lambda w: w.bytes_written).op_class if classes else "other"
    return NodeWork(name, op_class, sum(w.flops for w in works),
                    sum(w.bytes_read for w in works), peak,
                    count=sum(w.count for w in works if w.op_class != "view"))


# Layout ops that return a view when the input's strides allow one and copy otherwise.
_MAYBE_COPY_OPS = {"reshape", "flatten", "contiguous"}


def _copies(name: str, node: fx.Node) -> bool:
    """Whether a ``reshape``/``flatten``/``contiguous`` node must copy: its input's recorded
    strides cannot be viewed as its output's shape (an ``expand`` of GQA's keys reshaped to
    every head, a transposed tensor made contiguous). Decided on a meta tensor of the same
    sizes and strides; nothing is computed."""
    if name not in _MAYBE_COPY_OPS or node.op not in ("call_function", "call_method"):
        return False
    src = _arg_value(node.args[0]) if node.args else None
    out = node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    try:
        probe = torch.empty_strided(tuple(src.shape), tuple(src.stride()), dtype=src.dtype,
                                    device="meta")
    except (TypeError, RuntimeError):  # symbolic sizes: leave it a view
        return False
    if name == "contiguous":
        return not probe.is_contiguous()
    try:
        probe.view(tuple(out.shape))
    except RuntimeError:
        return True
    return False


def node_work(node: fx.Node) -> NodeWork:
    """FLOPs and bytes of ``node`` from its recorded ``meta["val"]`` and its inputs' values.

    A layout op that must copy (``_copies``) is class ``copy``: it reads and writes every
    element of its output."""
    name = op_name(node)
    if _copies(name, node):
        nbytes = tensor_bytes(node.meta.get("val"))
        return NodeWork(name, "copy", 0, nbytes, nbytes)
    if node.op in ("placeholder", "output", "get_attr") or name in _VIEW_OPS:
        return NodeWork(name, "view", 0, 0, 0)
    body = _higher_order_body(node)
    if body is not None:
        return _body_work(name, body)
    out = node.meta.get("val")
    ins = _inputs(node)
    read = sum(t.numel() * t.element_size() for t in ins)
    written = tensor_bytes(out)
    out_numel = _numel(out)
    if name in _MATMUL_OPS:
        return NodeWork(name, "matmul", _matmul_flops(name, node, ins, out), read, written)
    if name in _ATTENTION_OPS:
        return NodeWork(name, "attention", _attention_flops(node), read, written)
    if name in _NORM_OPS:
        return NodeWork(name, "norm", _NORM_FLOPS_PER_ELEMENT * out_numel, read, written)
    if name in _EMBEDDING_OPS:
        # A lookup reads only the selected rows, not the whole table.
        return NodeWork(name, "embedding", 0, written + _numel(ins[1:2]) * 8, written)
    if name in _REDUCTION_OPS:
        return NodeWork(name, "reduction", sum(t.numel() for t in ins[:1]), read, written)
    if node.op == "call_module" and "flops" in node.meta:
        # A leaf module the fallback tracer kept opaque; its FLOPs were counted by running it.
        flops = node.meta["flops"]
        return NodeWork(name, "matmul" if flops else "other", flops, read, written)
    if written == 0:
        return NodeWork(name, "other", 0, 0, 0)
    if any(t.is_floating_point() for t in tensors_in(out)):
        return NodeWork(name, "elementwise", out_numel, read, written)
    return NodeWork(name, "other", 0, read, written)

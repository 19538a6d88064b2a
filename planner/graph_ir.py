"""The internal graph IR: a networkx DiGraph over an fx graph, one vertex per node.

Both tracers (``torch.export`` and ``fx.symbolic_trace``) land here; nothing downstream
asks which one ran. Vertex attributes: ``op`` (fx opcode), ``name`` (op name such as
``"linear"``), ``op_class``, ``shape``, ``dtype``, ``flops``, ``count`` (kernels), ``bytes_read``,
``bytes_written``, ``param_bytes``, ``module`` (owning module path) and ``layer``.
"""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from planner.op_stats import node_work, tensor_bytes, tensors_in

__all__ = ["build_graph", "module_path", "node_shape"]


def module_path(node: fx.Node) -> str:
    """The innermost module the node was traced in (``""`` for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else str(path)


def node_shape(node: fx.Node) -> tuple[tuple[int, ...], str] | None:
    """(shape, dtype) of a node's tensor value, or ``None`` if it is not a single tensor."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape), str(val.dtype).removeprefix("torch.")
    return None


def build_graph(gm: fx.GraphModule, layer_of: dict[str, int]) -> nx.DiGraph:
    """Build the IR of ``gm``; ``layer_of`` maps node names to layer indices."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        work = node_work(node)
        shape = node_shape(node)
        param_bytes = 0
        if node.op == "get_attr" and node.target in params:
            param_bytes = tensor_bytes(params[node.target])
        graph.add_node(
            node.name,
            op=node.op,
            name=work.op,
            op_class=work.op_class,
            shape=shape[0] if shape else None,
            dtype=shape[1] if shape else None,
            num_tensors=len(tensors_in(node.meta.get("val"))),
            flops=work.flops,
            count=work.count,
            bytes_read=work.bytes_read,
            bytes_written=work.bytes_written,
            param_bytes=param_bytes,
            module=module_path(node),
            layer=layer_of.get(node.name),
        )
        for src in node.all_input_nodes:
            graph.add_edge(src.name, node.name, bytes=tensor_bytes(src.meta.get("val")))
    return graph

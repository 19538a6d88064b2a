"""Layers and cut points: the unit the planner partitions.

A traced model is a chain of layers: the pre-block part (embeddings, rotary tables,
masks), one layer per repeated block (``model.layers.17``), and the post-block part
(final norm, head). A cut point sits between two consecutive layers and lists every
tensor that crosses it; pipeline point-to-point cost uses the sum of their bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cost_models.roofline import OP_CLASSES, OpWork

__all__ = ["OpStats", "Layer", "CutPoint", "OP_CLASSES"]

# Per-op-class work is the cost model's own type (one definition for both packages):
# ``OpStats(count, flops, bytes_read, bytes_written)``, summed with ``+``.
OpStats = OpWork


@dataclass(frozen=True)
class Layer:
    """One partitionable layer of a traced model.

    Attributes:
        index: position in ``TracedModel.layers``.
        name: ``"pre"``, the block's module path (``"model.layers.3"``), or ``"post"``.
        kind: ``"pre"``, ``"block"`` or ``"post"``.
        nodes: names of the fx nodes that belong to this layer, in graph order.
        param_bytes: bytes of the parameters this layer owns. A parameter used by several
            layers (tied embeddings) is owned by the first; the others list it in
            ``tied_params``. Summed over layers this equals the model's parameter bytes.
        flops: floating-point operations of one forward pass at the traced shapes.
        activation_bytes: bytes of every non-view tensor the layer produces.
        peak_activation_bytes: the largest set of layer-produced tensors alive at once
            during the layer (what inference needs as workspace).
        output_bytes: bytes of the tensors this layer sends to later layers.
        op_stats: work per op class (see ``OP_CLASSES``).
        params: names of the parameters this layer owns.
        tied_params: names of parameters owned by an earlier layer that this layer also uses.
        buffer_bytes: bytes of the buffers (non-trainable state) this layer uses.
    """

    index: int
    name: str
    kind: str
    nodes: tuple[str, ...]
    param_bytes: int
    flops: int
    activation_bytes: int
    peak_activation_bytes: int
    output_bytes: int
    op_stats: dict[str, OpStats] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    tied_params: tuple[str, ...] = ()
    buffer_bytes: int = 0

    @property
    def bytes_accessed(self) -> int:
        return sum(s.bytes_read + s.bytes_written for s in self.op_stats.values())


@dataclass(frozen=True)
class CrossingTensor:
    """A tensor that is produced at or before a cut and used after it."""

    name: str  # the fx node that produces it
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    producer_layer: int
    role: str  # "hidden", "rotary", "mask", "position", "input" or "other"


@dataclass(frozen=True)
class CutPoint:
    """The boundary after ``after_layer``: every tensor crossing it and their total bytes."""

    after_layer: int
    tensors: tuple[CrossingTensor, ...]
    bytes: int


# --------------------------------------------------------------------------- detection


def find_block_container(model) -> tuple[str, int] | None:
    """The ModuleList/Sequential of repeated blocks: ``("model.layers", 80)``, or ``None``.

    A container qualifies when it has at least two children, all of one class, holding
    parameters; the one holding the most parameters wins (the decoder stack, not a list of
    two rotary tables).
    """
    import torch.nn as nn

    best: tuple[int, str, int] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        children = list(mod)
        if len({type(c) for c in children}) != 1:
            continue
        n_params = sum(p.numel() for p in mod.parameters())
        if n_params == 0:
            continue
        if best is None or n_params > best[0]:
            best = (n_params, path, len(children))
    return (best[1], best[2]) if best else None


def block_index(paths: list[str], container: str, num_blocks: int) -> int | None:
    """Index of the block a node belongs to, from its module paths (outermost first)."""
    prefix = f"{container}." if container else ""
    for path in paths:
        if not path.startswith(prefix):
            continue
        head = path[len(prefix):].split(".", 1)[0]
        if head.isdigit() and int(head) < num_blocks:
            return int(head)
    return None

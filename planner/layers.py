"""Layers and cut points: the unit the planner partitions.

A traced model is a chain of layers: the pre-block part (embeddings, rotary tables,
masks), one layer per repeated block (``model.layers.17``), and the post-block part
(final norm, head). A cut point sits between two consecutive layers and lists every
tensor that crosses it; pipeline point-to-point cost uses the sum of their bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cost_models.roofline import OP_CLASSES, OpWork

__all__ = ["OpStats", "Layer", "CutPoint", "BlockRun", "find_block_container", "OP_CLASSES"]

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


@dataclass(frozen=True)
class BlockRun:
    """The repeated blocks: consecutive children of one ModuleList/Sequential.

    Attributes:
        container: module path of the container; ``""`` when it is the model itself (a
            top-level ``nn.Sequential``).
        first: position of the first block among the container's children.
        names: the blocks' child names in the container (``"0"``, ``"1"``, ...), in order.
        num_children: how many children the container has.
    """

    container: str
    first: int
    names: tuple[str, ...]
    num_children: int = 0

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def whole(self) -> bool:
        """Whether the blocks are every child of the container."""
        return self.first == 0 and self.count == self.num_children

    def path(self, i: int) -> str:
        """Module path of block ``i`` (``"model.layers.3"``, or ``"3"`` under the root)."""
        return f"{self.container}.{self.names[i]}" if self.container else self.names[i]

    def first_blocks(self, keep: int) -> BlockRun:
        """The run of the first ``keep`` blocks."""
        return replace(self, names=self.names[:keep])

    def index(self, paths: list[str]) -> int | None:
        """Index of the block a node belongs to, from its module paths (outermost first)."""
        prefix = f"{self.container}." if self.container else ""
        position = {n: i for i, n in enumerate(self.names)}
        for path in paths:
            if not path.startswith(prefix):
                continue
            i = position.get(path[len(prefix):].split(".", 1)[0])
            if i is not None:
                return i
        return None


def find_block_container(model) -> BlockRun | None:
    """The repeated blocks: the longest-in-parameters run of at least two consecutive
    children of one class, holding parameters, of any ModuleList/Sequential (the model
    itself included): ``model.layers`` (80 decoder layers), ``transformer.h``, or children
    1..n of a top-level ``nn.Sequential(embedding, block, ..., block, head)``; ``None`` if
    there is none. The run holding the most parameters wins (the decoder stack, not a list
    of two rotary tables).
    """
    import torch.nn as nn

    best: tuple[int, BlockRun] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        children = list(mod.named_children())
        start = 0
        while start < len(children):
            end = start + 1
            kind = type(children[start][1])
            while end < len(children) and type(children[end][1]) is kind:
                end += 1
            if end - start >= 2:
                n_params = sum(p.numel() for _, c in children[start:end] for p in c.parameters())
                if n_params and (best is None or n_params > best[0]):
                    names = tuple(name for name, _ in children[start:end])
                    best = (n_params, BlockRun(path, start, names, len(children)))
            start = end
    return best[1] if best else None

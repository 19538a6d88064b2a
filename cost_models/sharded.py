"""What the cost model needs of a layer's tensor-parallel strategy, as plain data.

The sharding analysis (``planner.sharding``) decides, from the graph, which values each
rank of a tensor-parallel group holds whole and which in pieces. The cost model prices
that decision and nothing else: it never applies a formula of its own for what a
tensor-parallel group does. ``ShardedLayer`` carries, for one layer at one degree ``tp``:

- the exact collectives the generated code runs (kind and bytes of the whole tensor, at
  the traced shape; they scale with the tokens of the step);
- the bytes of the parameters one rank holds;
- for each op class, the fraction of the layer's FLOPs and activation bytes one rank
  computes (1 for an op run replicated, ``1/tp`` for one whose output or contraction is
  split), and the fraction of the matmul weights it reads (its pieces);
- the fraction of the transient activations and of the keys/values one rank holds.

>>> one = ShardedLayer.replicated(param_bytes=1000)
>>> one.tp, one.fraction("matmul")
(1, (1.0, 1.0))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ShardedLayer"]


@dataclass(frozen=True)
class ShardedLayer:
    """One layer's tensor-parallel strategy at degree ``tp``, for pricing.

    Attributes:
        tp: the group's degree.
        collectives: ``(kind, bytes, batched)`` per microbatch at the traced shape: an
            ``all_reduce``, ``all_gather`` or ``reduce_scatter`` of a tensor of that many
            bytes; ``batched`` when the tensor has one row per token or sequence (its bytes
            scale with the batch), not when it is shared by the batch (a position table).
        param_bytes: bytes of the layer's own parameters one rank holds (traced dtype).
        work: op class -> (fraction of FLOPs, fraction of activation bytes) one rank runs.
        weight_fraction: share of the matmul weights one rank reads (its pieces).
        activation_fraction: share of the layer's activation bytes one rank holds.
        kv_fraction: share of the keys and values one rank caches (decode).
        strategy: the name of the chosen candidate (``greedy``, ``no-fallback``, ...).
    """

    tp: int
    collectives: tuple[tuple[str, int, bool], ...]
    param_bytes: int
    work: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    activation_fraction: float = 1.0
    kv_fraction: float = 1.0
    weight_fraction: float = 1.0
    strategy: str = "replicate"

    @classmethod
    def replicated(cls, param_bytes: int, tp: int = 1) -> ShardedLayer:
        """Every rank runs the whole layer (what tp 1 is)."""
        return cls(tp, (), int(param_bytes))

    def fraction(self, op_class: str) -> tuple[float, float]:
        return tuple(self.work.get(op_class, (1.0, 1.0)))  # type: ignore[return-value]

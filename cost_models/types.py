"""The shapes of the inputs cost_models prices, as protocols cost_models owns.

cost_models imports neither ``planner`` nor ``codegen`` (``tests/test_layering.py``
enforces it, ``TYPE_CHECKING`` blocks included). Its functions are handed the planner's
objects (``planner.layers.Layer``, ``planner.arch.ModelArch``, ``planner.cluster.Workload``
and ``Cluster``, ``planner.tracing.TracedModel``) but annotate them with these protocols,
which list exactly the attributes read here. Anything with those attributes works — the
tests pass ``types.SimpleNamespace`` objects. The protocols are for annotations only:
nothing checks them at run time, and every member is a read-only property so that frozen
dataclasses satisfy them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch.fx as fx

    from cost_models.devices import DeviceSpec

__all__ = [
    "OpStatsLike",
    "LayerLike",
    "NamedLayer",
    "ArchLike",
    "WorkloadLike",
    "ClusterLike",
    "TracedModelLike",
]


class OpStatsLike(Protocol):
    """Work of one op class at the traced shape (``roofline.OpWork`` is one)."""

    @property
    def count(self) -> int: ...
    @property
    def flops(self) -> float: ...
    @property
    def bytes_read(self) -> float: ...
    @property
    def bytes_written(self) -> float: ...


class LayerLike(Protocol):
    """A traced layer as ``roofline``, ``memory`` and ``layer_cost`` read it
    (``planner.layers.Layer``).

    Attributes:
        kind: ``"pre"``, ``"block"`` or ``"post"``.
        op_stats: work per op class (``"matmul"``, ``"attention"``, ...) at the traced shape.
        param_bytes: parameter bytes at the traced dtype.
        output_bytes: bytes of the layer's output at the traced shape.
        peak_activation_bytes: transient peak of the layer at the traced shape.
    """

    @property
    def kind(self) -> str: ...
    @property
    def op_stats(self) -> Mapping[str, OpStatsLike]: ...
    @property
    def param_bytes(self) -> int: ...
    @property
    def output_bytes(self) -> int: ...
    @property
    def peak_activation_bytes(self) -> int: ...


class NamedLayer(Protocol):
    """A layer as the profiler reads it: only its display name."""

    @property
    def name(self) -> str: ...


class ArchLike(Protocol):
    """Transformer hyper-parameters (``planner.arch.ModelArch``).

    Attributes:
        hidden_size: model width.
        num_layers: transformer blocks (``memory.kv_cache_bytes`` default block count).
        num_heads: attention heads, or ``None``.
        num_kv_heads: K/V heads (GQA/MQA), or ``None`` (then ``num_heads``).
        head_dim: width of one head, or ``None``.
        vocab_size: vocabulary size, or ``None``.
        tied_embeddings: the head reuses the embedding table.
        is_transformer: heads and head width are known.
    """

    @property
    def hidden_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int | None: ...
    @property
    def num_kv_heads(self) -> int | None: ...
    @property
    def head_dim(self) -> int | None: ...
    @property
    def vocab_size(self) -> int | None: ...
    @property
    def tied_embeddings(self) -> bool: ...
    @property
    def is_transformer(self) -> bool: ...


class WorkloadLike(Protocol):
    """What is run (``planner.cluster.Workload``).

    Attributes:
        phase: ``"prefill"`` or ``"decode"``.
        seq_len: tokens per sequence (prefill).
        kv_context_len: tokens cached per sequence (decode).
        dtype: dtype name (``"bfloat16"``), the key of ``DeviceSpec.peak_flops``.
        dtype_bytes: bytes per element of ``dtype``.
    """

    @property
    def phase(self) -> str: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def kv_context_len(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def dtype_bytes(self) -> int: ...


class ClusterLike(Protocol):
    """Anything that names its device (``planner.cluster.Cluster``): ``layer_cost`` takes
    a ``DeviceSpec`` or one of these."""

    @property
    def device_spec(self) -> DeviceSpec: ...


class TracedModelLike(Protocol):
    """A traced model as the profiler reads it (``planner.tracing.TracedModel``).

    Attributes:
        name: display name (error messages).
        graph_module: the fx graph of the whole model, with real weights.
        layers: the layers in order; only their ``name`` is read.
        layer_of_node: fx node name -> index into ``layers``.

    Also read when present (``getattr`` with a default, so not part of the protocol):
    ``folded`` (bool; a folded model is refused) and ``graph`` (an IR whose ``nodes``
    maps an fx node name to a dict with ``name``, ``op_class``, ``flops``, ``bytes_read``
    and ``bytes_written``, for the per-node breakdown).
    """

    @property
    def name(self) -> str: ...
    @property
    def graph_module(self) -> fx.GraphModule: ...
    @property
    def layers(self) -> Sequence[NamedLayer]: ...
    @property
    def layer_of_node(self) -> Mapping[str, int]: ...

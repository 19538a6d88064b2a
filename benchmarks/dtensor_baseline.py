"""The DTensor baseline the runtime benchmarks compare against: the torchtitan tensor-parallel
plan for an HF Llama, applied with ``parallelize_module``.

``ColwiseParallel`` on q/k/v/gate/up, ``RowwiseParallel`` on o/down (default
``use_local_output``, so HF's ``view(*input_shape, -1, head_dim)`` sees the local heads), and,
as our graph shards them, the embedding split by vocabulary (``RowwiseParallel``) and the
head by vocabulary (``ColwiseParallel``), both with replicated outputs. Used by
``runtime_overhead.py`` and ``generation.py``.
"""

from __future__ import annotations

__all__ = ["dtensor_llama"]


def dtensor_llama(model, mesh):
    """``model`` (an HF Llama causal LM) tensor-parallel over ``mesh``, in place."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {f"self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")}
    plan |= {"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
             "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    parallelize_module(model, mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(),
                                              output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    return model

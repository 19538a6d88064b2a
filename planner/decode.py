"""The decode step: a causal LM with its KV cache as explicit graph inputs and outputs.

``planner.trace`` captures one forward pass. Generating tokens needs a *step*: the tokens of
this step in, their logits and the updated KV cache out. ``DecodeStep`` wraps a causal LM
so that its forward takes tensors only::

    logits, k_0, v_0, ..., k_{L-1}, v_{L-1} = step(input_ids, positions, cache_mask,
                                                    k_0, v_0, ..., k_{L-1}, v_{L-1})

- ``input_ids`` ``[b, t]``: the step's tokens (the prompt at prefill, one token at decode);
- ``positions`` ``[b, t]``: each token's position *in its own sequence*, which is also the
  cache slot it is written to (so left-padded prompts of different lengths share a batch);
- ``cache_mask`` ``[b, context]`` bool: the slots holding a real token of the sequence once
  this step's tokens are written (padding is never valid);
- ``k_j``, ``v_j`` ``[b, kv_heads, context, head_dim]``: block ``j``'s cache.

The cache is written functionally (``scatter`` along the slot dimension) and returned, never
mutated in place, so one traced graph carries it as data: ``planner.trace(step, args)``
gives ``pre + one layer per block + post`` with block ``j``'s cache inputs and updated
outputs inside block ``j``'s layer (a pipeline stage keeps its blocks' cache; nothing of it
crosses a cut). The context is fixed at construction (static shapes); the same wrapper
serves prefill (``t`` = prompt length) and decode (``t = 1``). A token at position ``p``
attends to the valid slots ``<= p`` and to its own slot.

Models with a cache path: transformers causal LMs (through transformers' ``Cache`` API: a
``Cache`` whose layers hold the tensors passed in, and a ready 4-D attention mask that the
model uses as is) and the zoo ``planner.models.GPT``. Anything else raises ``DecodeError``.

``greedy_generate`` is the reference loop (prefill, then one decode step per token, each
sequence stopped at its EOS) over a ``DecodeStep`` or its traced graph module;
``kv_cache_nbytes`` is what the wrapper allocates, to compare with the cost model's
``cost_models.memory.kv_cache_bytes``.

>>> import torch, planner
>>> from planner.models import GPT, GPTConfig
>>> m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)).eval()
>>> step = DecodeStep(m, context_len=16)
>>> traced = planner.trace(step, step.example_inputs(batch=2, tokens=1))
>>> [layer.name for layer in traced.layers]
['pre', 'model.h.0', 'model.h.1', 'post']
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from planner.models.gpt import GPT

__all__ = [
    "GreedyState",
    "CacheSpec",
    "DecodeError",
    "DecodeStep",
    "greedy_generate",
    "kv_cache_nbytes",
    "prompt_positions",
    "trace_decode_step",
]


class DecodeError(ValueError):
    """The model cannot be wrapped as a decode step; the message says why and what works."""


@dataclass(frozen=True)
class CacheSpec:
    """One block's cache: heads and widths of its keys and values (batch and context are
    chosen per use), and the element type."""

    kv_heads: int
    k_head_dim: int
    v_head_dim: int
    dtype: torch.dtype

    def shapes(self, batch: int, context_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the key and value tensors for ``batch`` sequences of ``context_len`` slots."""
        return ((batch, self.kv_heads, context_len, self.k_head_dim),
                (batch, self.kv_heads, context_len, self.v_head_dim))


# --------------------------------------------------------------------------- cache objects


class _SlotWriter:
    """The cache both model kinds call: block ``j`` hands its new keys/values to
    ``update(k, v, j)``, which writes them at each token's slot with ``scatter`` (a new
    tensor; the input is untouched) and returns the whole cache to attend to."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 slots: torch.Tensor) -> None:
        self.keys, self.values, self.slots = list(keys), list(values), slots

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor,
              layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx] = _scatter_slots(self.keys[layer_idx], key_states, self.slots)
        self.values[layer_idx] = _scatter_slots(self.values[layer_idx], value_states, self.slots)
        return self.keys[layer_idx], self.values[layer_idx]

    update = write  # the zoo GPT's KVCache protocol

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.keys, self.values) for t in pair]


def _scatter_slots(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache`` [b, h, S, d] with ``new`` [b, h, t, d] written at slots [b, t] (per sequence)."""
    b, h, t, d = new.shape
    index = slots[:, None, :, None].expand(b, h, t, d)
    return cache.scatter(2, index, new.to(cache.dtype))


class _Probe:
    """Records the key/value shapes each block produces on a one-token forward and returns
    them unchanged (the token attends to itself only)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor,
              layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen[layer_idx] = (key_states, value_states)
        return key_states, value_states

    update = write


@functools.lru_cache(maxsize=1)
def _hf_cache_class() -> type:
    """A transformers ``Cache`` around a ``_SlotWriter`` (or ``_Probe``), built on first use
    so that transformers stays an optional dependency."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class _StepLayer(CacheLayerMixin):
        """One block's slot of ``_StepCache``; it only answers the size questions transformers
        may ask (the writing is done by the cache, which knows the slots)."""

        is_compileable = True
        is_sliding = False

        def __init__(self, context_len: int) -> None:
            super().__init__()
            self.max_cache_len = context_len
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover
            pass

        def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover
            raise NotImplementedError("_StepCache.update writes the cache")

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.max_cache_len, 0

        def get_seq_length(self) -> int:
            # Only consulted when no position_ids are passed; DecodeStep always passes them.
            raise NotImplementedError("a DecodeStep cache has per-sequence lengths; pass "
                                      "position_ids")

        def get_max_length(self) -> int:
            return self.max_cache_len

    class _StepCache(Cache):
        """transformers' Cache API over tensors that are graph inputs: ``update`` writes the
        block's new keys and values functionally at each token's own slot."""

        def __init__(self, writer: _SlotWriter | _Probe, num_layers: int,
                     context_len: int) -> None:
            super().__init__(layers=[_StepLayer(context_len) for _ in range(num_layers)])
            self.writer = writer

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return self.writer.write(key_states, value_states, layer_idx)

    return _StepCache


# --------------------------------------------------------------------------- the wrapper


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


class DecodeStep(nn.Module):
    """A causal LM as one decode step with an explicit KV cache (see the module docstring).

    Args:
        model: a transformers causal LM (``...ForCausalLM``) or ``planner.models.GPT``, in
            eval mode. It is held, not copied: the step shares its weights.
        context_len: cache slots per sequence (prompt plus generated tokens), fixed.

    Raises:
        DecodeError: the model has no KV-cache path (not a causal LM of those kinds), has no
            LM head, attends through a sliding window shorter than ``context_len``, or
            ``context_len`` exceeds its positions.
    """

    def __init__(self, model: nn.Module, context_len: int) -> None:
        super().__init__()
        if not isinstance(context_len, int) or context_len < 1:
            raise DecodeError(f"context_len must be a positive whole number, not {context_len!r}")
        name = type(model).__name__
        if isinstance(model, GPT):
            self.kind = "gpt"
            limit, key = model.config.block_size, "block_size"
            num_layers = model.config.n_layer
        elif _is_hf_model(model):
            self.kind = "hf"
            config = model.config
            if model.get_output_embeddings() is None:
                raise DecodeError(
                    f"{name} has no language-model head: decoding needs logits over the "
                    "vocabulary; build the causal-LM class (AutoModelForCausalLM)")
            params = inspect.signature(model.forward).parameters
            self._cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
            if self._cache_kw is None or "position_ids" not in params:
                raise DecodeError(
                    f"{name} has no KV-cache path: its forward takes no cache and position_ids, "
                    "so decoding cannot feed it one token at a time")
            self._use_cache = "use_cache" in params
            key = "n_positions" if hasattr(config, "n_positions") else "max_position_embeddings"
            limit = getattr(config, key, None)
            num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
            window = getattr(config, "sliding_window", None)
            if isinstance(window, int) and window < context_len:
                raise DecodeError(
                    f"{name} attends through a sliding window of {window} tokens, shorter than "
                    f"context_len {context_len}: the decode step does not model sliding windows "
                    f"yet; use context_len <= {window} or a config with sliding_window=None")
        else:
            raise DecodeError(
                f"{name} has no KV-cache path, and decoding needs one: each step must read and "
                "write the keys and values of earlier tokens. Use a transformers causal LM "
                "(hf:<type>) or planner.models.GPT, or give the model a cache path (see "
                "planner.models.gpt.KVCache)")
        if isinstance(limit, int) and context_len > limit:
            raise DecodeError(f"{name} has {limit} positions ({key}); context_len {context_len} "
                              "is too long")
        self.model = model
        self.context_len = context_len
        self.num_layers = int(num_layers)
        self.cache_specs: list[CacheSpec] = self._probe()

    @property
    def config(self) -> Any:
        """The wrapped model's config (``planner.trace`` reads the architecture from it)."""
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: _SlotWriter | _Probe) -> torch.Tensor:
        """The wrapped model's logits with ``cache`` as its KV cache and ``mask`` as its
        ready attention mask [b, 1, t, slots]."""
        if self.kind == "gpt":
            return self.model(input_ids, positions=positions, attn_mask=mask, cache=cache)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_kw: _hf_cache_class()(cache, self.num_layers, mask.shape[-1]),
        }
        if self._use_cache:
            kwargs["use_cache"] = True
        return self.model(**kwargs).logits

    def _probe(self) -> list[CacheSpec]:
        """Per-block cache shapes, read from one forward of one token (the keys and values
        each block actually produces: GQA heads, explicit head_dim, unequal k/v widths)."""
        probe = _Probe()
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        mask = torch.zeros(1, 1, 1, 1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            self._run(ids, torch.zeros_like(ids), mask, probe)
        missing = [j for j in range(self.num_layers) if j not in probe.seen]
        if missing:
            raise DecodeError(f"{type(self.model).__name__}: blocks {missing} wrote no KV cache; "
                              "the decode step needs every block to cache keys and values")
        specs = []
        for j in range(self.num_layers):
            k, v = probe.seen[j]
            if k.dim() != 4 or v.dim() != 4 or k.shape[1] != v.shape[1]:
                raise DecodeError(f"{type(self.model).__name__}: block {j} caches keys "
                                  f"{tuple(k.shape)} and values {tuple(v.shape)}, not "
                                  "[batch, kv_heads, tokens, head_dim]")
            specs.append(CacheSpec(int(k.shape[1]), int(k.shape[3]), int(v.shape[3]), k.dtype))
        return specs

    def empty_cache(self, batch: int, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """Zeroed cache tensors ``[k_0, v_0, ..., k_{L-1}, v_{L-1}]`` for ``batch`` sequences."""
        device = self.device if device is None else device
        out = []
        for spec in self.cache_specs:
            for shape in spec.shapes(batch, self.context_len):
                out.append(torch.zeros(shape, dtype=spec.dtype, device=device))
        return out

    def example_inputs(self, batch: int, tokens: int,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """Inputs to trace a step of ``tokens`` tokens per sequence (``tokens=1``: decode;
        the prompt length: prefill): token 0s at positions 0..tokens-1, those slots valid,
        an empty cache."""
        device = self.device if device is None else device
        ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        positions = torch.arange(tokens, device=device).expand(batch, tokens).contiguous()
        cache_mask = torch.zeros(batch, self.context_len, dtype=torch.bool, device=device)
        cache_mask[:, :tokens] = True
        return (ids, positions, cache_mask, *self.empty_cache(batch, device))

    def attention_mask(self, positions: torch.Tensor, cache_mask: torch.Tensor) -> torch.Tensor:
        """The additive mask [b, 1, t, context] (0 where a token may attend, the dtype's
        minimum elsewhere; additive so that eager and SDPA attention read it alike): a token
        at position p sees the valid slots <= p, and its own slot (a padding token then
        attends to something, so no row is empty)."""
        slots = torch.arange(cache_mask.shape[-1], device=positions.device)
        pos = positions[:, :, None]  # [b, t, 1]
        allowed = (cache_mask[:, None, :] & (slots <= pos)) | (slots == pos)  # [b, t, context]
        zero = torch.zeros((), dtype=self.dtype, device=positions.device)
        blocked = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype,
                             device=positions.device)
        return torch.where(allowed, zero, blocked)[:, None]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache_mask: torch.Tensor,
                *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits [b, t, vocab], k_0, v_0, ..., k_{L-1}, v_{L-1})`` after writing this
        step's keys and values at ``positions`` (see the module docstring)."""
        if len(cache) != 2 * self.num_layers:
            raise ValueError(f"expected {2 * self.num_layers} cache tensors (k and v of "
                             f"{self.num_layers} blocks), got {len(cache)}")
        mask = self.attention_mask(positions, cache_mask)
        writer = _SlotWriter(cache[0::2], cache[1::2], positions)
        logits = self._run(input_ids, positions, mask, writer)
        return (logits, *writer.tensors())


def trace_decode_step(model: nn.Module, batch: int, context_len: int,
                      name: str | None = None) -> tuple[Any, str | None]:
    """``model``'s one-token decode step traced for pricing: ``(TracedModel, None)``, or
    ``(None, reason)`` for a model without a cache path (``DecodeStep`` refuses it, or its
    step cannot be traced).

    A decode plan prices every layer's compute from this graph (``CostBuilder``'s
    ``decode_traced``): the ops ``plan run`` generates with, the cache write and the mask
    over the whole context included, which the prefill-shaped trace scaled to one token
    does not have. Works on ``meta`` models (nothing is computed)."""
    from planner.tracing import trace

    try:
        step = DecodeStep(model, context_len=context_len)
        args = step.example_inputs(batch=batch, tokens=1)
        traced = trace(step, args, name=f"{name or type(model).__name__} decode step")
    except (DecodeError, NotImplementedError, TypeError, ValueError, AttributeError,
            RuntimeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return None, f"its decode step (planner.decode.DecodeStep) fails: {first}"
    return traced, None


def kv_cache_nbytes(step: DecodeStep, batch: int, context_len: int | None = None,
                    dtype: torch.dtype | None = None) -> int:
    """Bytes of the KV cache ``step`` allocates for ``batch`` sequences of ``context_len``
    slots (default: the step's) in ``dtype`` (default: the cache's own): the sum over the
    blocks' key and value tensors of numel x element size."""
    context_len = step.context_len if context_len is None else context_len
    total = 0
    for spec in step.cache_specs:
        size = torch.empty((), dtype=dtype or spec.dtype).element_size()
        for shape in spec.shapes(batch, context_len):
            total += size * int(torch.Size(shape).numel())
    return total


# --------------------------------------------------------------------------- generation

StepFn = Callable[..., Sequence[torch.Tensor]]


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (= cache slots) of a left-padded prompt [b, T]: a sequence's real tokens
    get 0..n-1 (as transformers numbers them), its padding the slots n..T-1 after them, so
    that no two tokens of a sequence share a slot; decoding then overwrites the padding's
    slots in order, and they are invalid until it does."""
    real = attention_mask.bool()
    n = real.sum(-1, keepdim=True)  # [b, 1]
    pos_real = real.long().cumsum(-1) - 1
    pos_pad = n + (~real).long().cumsum(-1) - 1
    return torch.where(real, pos_real, pos_pad)



class GreedyState:
    """The bookkeeping of greedy generation for one batch of left-padded prompts, shared by
    the single-process loop (``greedy_generate``) and the distributed one
    (``codegen.generate.generate_stage``, one per group of sequences in flight).

    A step's inputs are the tokens, their positions (= cache slots) and the cache mask of
    the slots that hold a real token once the step's tokens are written. A sequence that
    produced ``eos_token_id`` is finished: it is given ``pad_token_id`` from then on (as
    transformers' ``generate`` does). Generation ends after ``max_new_tokens`` or when every
    sequence finished.

    >>> s = GreedyState(torch.tensor([[0, 1, 1], [1, 1, 1]]), 8, 2, eos_token_id=5,
    ...                 pad_token_id=0)
    >>> s.positions.tolist(), s.valid[:, :4].int().tolist()
    ([[2, 0, 1], [0, 1, 2]], [[1, 1, 0, 0], [1, 1, 1, 0]])
    >>> s.accept(torch.tensor([5, 7]))
    False
    >>> ids, pos, valid = s.advance(torch.tensor([5, 7]))
    >>> pos.tolist(), s.choose(torch.eye(8)[[3, 4]]).tolist()
    ([[2], [3]], [0, 4])
    """

    def __init__(self, attention_mask: torch.Tensor, context_len: int, max_new_tokens: int,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        real = attention_mask.bool()
        if not bool(real.any(-1).all()):
            raise ValueError("every prompt needs at least one token (attention_mask is all 0 "
                             "in a row)")
        self.max_new_tokens = max_new_tokens
        self.eos = eos_token_id
        self.pad = eos_token_id if pad_token_id is None else pad_token_id
        if self.eos is not None and self.pad is None:
            raise ValueError("pad_token_id is needed")
        self.positions = prompt_positions(real)  # [b, T]: the prompt's slots
        self.position = real.sum(-1)  # [b]: the next token's position per sequence
        self.slots = torch.arange(context_len, device=real.device)
        self.valid = self.slots[None, :] < self.position[:, None]  # the prompt's, once written
        self.done = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
        self.out: list[torch.Tensor] = []

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every sequence from its last logits ``[b, vocab]``: the argmax,
        or the pad id for a finished sequence."""
        token = logits.argmax(-1)
        if self.eos is not None:
            token = torch.where(self.done, torch.full_like(token, self.pad), token)
        return token

    def accept(self, token: torch.Tensor) -> bool:
        """Record the chosen ``token`` ``[b]``; True when generation is over."""
        if self.eos is not None:
            self.done = self.done | (token == self.eos)
        self.out.append(token)
        return len(self.out) >= self.max_new_tokens or (
            self.eos is not None and bool(self.done.all()))

    def advance(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next decode step's ``(input_ids [b, 1], positions [b, 1], cache_mask)``."""
        self.valid = self.valid | (self.slots[None, :] == self.position[:, None])
        pos = self.position[:, None]
        self.position = self.position + 1
        return token[:, None], pos, self.valid

    def tokens(self, width: int | None = None) -> torch.Tensor:
        """The generated ids ``[b, n]``, right-filled with the pad id up to ``width``."""
        b = self.done.shape[0]
        out = torch.stack(self.out, 1) if self.out else self.done.new_zeros(b, 0, dtype=torch.long)
        if width is not None and width > out.shape[1]:
            fill = self.pad if self.pad is not None else 0
            out = torch.cat([out, out.new_full((b, width - out.shape[1]), fill)], 1)
        return out


def _step_inputs(step: Any, batch: int, device: torch.device
                 ) -> tuple[StepFn, list[torch.Tensor], int, int | None]:
    """(the callable, an empty cache, the context length, the step's fixed tokens per call
    or None when any number works)."""
    if isinstance(step, DecodeStep):
        return step, step.empty_cache(batch, device), step.context_len, None
    gm = step.graph_module if hasattr(step, "graph_module") else step
    if not isinstance(gm, fx.GraphModule):
        raise TypeError("greedy_generate takes a DecodeStep, a traced DecodeStep "
                        f"(TracedModel or its graph_module), not {type(step).__name__}")
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if len(vals) < 5 or not all(isinstance(v, torch.Tensor) for v in vals):
        raise TypeError("the graph is not a traced DecodeStep (input_ids, positions, "
                        "cache_mask, k_0, v_0, ...)")
    ids, _, cache_mask, *cache = vals
    if ids.shape[0] != batch:
        raise ValueError(f"the graph was traced for batch {ids.shape[0]}, not {batch}: shapes "
                         "are static; trace the step with the batch you generate for")
    empty = [torch.zeros(v.shape, dtype=v.dtype, device=device) for v in cache]
    return gm, empty, int(cache_mask.shape[-1]), int(ids.shape[1])


@torch.no_grad()
def greedy_generate(
    step: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    *,
    prefill: Any = None,
) -> torch.Tensor:
    """Greedy decoding with the KV cache, single process: the reference loop.

    The prompt is written in one step when the step takes its length (a ``DecodeStep``, or a
    ``prefill`` graph traced with ``tokens`` = the prompt length), else one column per step
    through the one-token decode graph; then one decode step per new token. A sequence that
    produced ``eos_token_id`` is finished: it is fed and given ``pad_token_id`` (default the
    EOS id) from then on. Generation ends after ``max_new_tokens`` or when all finished.

    Args:
        step: a ``DecodeStep``, or a traced one (``TracedModel`` or its ``graph_module``,
            traced with ``tokens=1`` and this batch: shapes are static).
        input_ids: prompts [b, T], left-padded.
        attention_mask: [b, T], 1 for prompt tokens and 0 for padding (None: no padding).
        max_new_tokens: tokens to generate at most.
        eos_token_id, pad_token_id: as in transformers' ``generate``.
        prefill: a traced step for the whole prompt (``tokens`` = T); optional.

    Returns:
        The generated ids [b, n] (prompt excluded), n <= ``max_new_tokens``; equal to
        ``model.generate(...)[:, T:]`` of transformers with ``do_sample=False``.
    """
    b, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    step, cache, context, tokens = _step_inputs(step, b, device)
    if T + max_new_tokens > context:
        raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed the step's context "
                         f"of {context} slots")
    seqs = GreedyState(attention_mask, context, max_new_tokens, eos_token_id, pad_token_id)
    positions, valid = seqs.positions, seqs.valid

    def call(fn, ids, pos, mask, cache):
        out = fn(ids, pos, mask, *cache)
        return out[0], list(out[1:])

    if tokens is None or prefill is not None:
        fn = step if prefill is None else _step_inputs(prefill, b, device)[0]
        logits, cache = call(fn, input_ids, positions, valid, cache)
    else:  # the one-token graph: write the prompt column by column
        seen = torch.zeros_like(valid)
        for i in range(T):
            pos = positions[:, i : i + 1]
            seen = seen | ((seqs.slots[None, :] == pos) & real[:, i : i + 1])
            logits, cache = call(step, input_ids[:, i : i + 1], pos, seen, cache)
    while True:
        token = seqs.choose(logits[:, -1])
        if seqs.accept(token):
            return seqs.tokens()
        logits, cache = call(step, *seqs.advance(token), cache)


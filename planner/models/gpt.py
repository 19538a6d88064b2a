"""A nanoGPT-style decoder with a fused q|k|v projection (``c_attn``).

>>> m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=128, block_size=32))
>>> m(torch.zeros(2, 8, dtype=torch.long)).shape
torch.Size([2, 8, 128])

The plain forward is the full-sequence causal pass the planner traces. A KV-cache path is
added beside it (``planner.decode.DecodeStep`` drives it): ``forward(idx, positions=...,
attn_mask=..., cache=...)`` takes per-token positions, an explicit attention mask and a cache
object whose ``update(k, v, layer_idx)`` returns the keys and values to attend to (the
``transformers`` Cache protocol). Without those arguments the forward runs exactly the code
it always ran, so its traced graph and fingerprint do not change. ``GPT.generate`` is a
greedy reference loop that recomputes the whole sequence each step (no cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from planner.arch import ModelArch

__all__ = ["GPTConfig", "GPT", "KVCache"]


class KVCache(Protocol):
    """What the cache path of ``GPT.forward`` needs from a cache: each block hands it the
    new keys and values ``[B, n_head, T, head_dim]`` and attends to what it returns (the
    cached ones with the new ones written in). ``planner.decode`` implements it with
    tensors passed in and out of the graph (written functionally, no in-place mutation)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    tie_embeddings: bool = True

    def to_arch(self) -> ModelArch:
        """The hyper-parameters the planner and codegen read (``planner.trace`` calls this)."""
        return ModelArch("gpt", self.n_embd, self.n_layer, self.n_head, self.n_head,
                         self.n_embd // self.n_head, 4 * self.n_embd, self.vocab_size,
                         self.tie_embeddings)  # fmt: skip


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q|k|v fused
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        """Causal self-attention over ``x`` (B, T, C).

        ``attn_mask`` (broadcastable to (B, nh, T, S), boolean "may attend" or additive)
        replaces the causal flag; with ``cache`` the keys and values attended to are what
        ``cache.update(k, v, layer_idx)`` returns (S cache slots), which needs ``attn_mask``.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if attn_mask is None:
                raise ValueError("the KV-cache path needs attn_mask (which cache slots each "
                                 "token may attend to)")
            k, v = cache.update(k, v, layer_idx)  # (B, nh, S, hs)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer_idx)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of token ids ``idx`` (B, T).

        Without keywords: the full-sequence causal pass (positions 0..T-1). The cache path
        (``planner.decode``) passes ``positions`` (B, T) per token, ``attn_mask`` (B, 1, T, S)
        and ``cache`` (``KVCache``); ``positions`` and ``attn_mask`` alone serve left-padded
        batches without a cache (``generate``).
        """
        B, T = idx.shape
        if positions is None and attn_mask is None and cache is None:
            pos = torch.arange(T, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.wte(idx) + self.wpe(positions)  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, attn_mask, cache, i)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding by full recomputation (no KV cache): the reference that the
        cached decode step of ``planner.decode`` is checked against.

        Args:
            idx: prompt ids (B, T), left-padded when ``attention_mask`` has zeros.
            max_new_tokens: tokens to add at most.
            attention_mask: (B, T), 1 for prompt tokens and 0 for padding (default all 1).
            eos_token_id: a sequence that produced it stops; later steps append
                ``pad_token_id`` (default ``eos_token_id``) to it. Generation ends when every
                sequence stopped.
            pad_token_id: what finished sequences are padded with.

        Returns:
            (B, T + n) ids, prompt included (like transformers' ``generate``), n <= max_new_tokens.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        ids, mask = idx, attention_mask.bool()
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            T = ids.shape[1]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            allowed = (causal & mask[:, None, :]) | torch.eye(T, dtype=torch.bool,
                                                              device=ids.device)
            logits = self(ids, positions=positions, attn_mask=allowed[:, None])
            token = logits[:, -1].argmax(-1)  # (B,)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
                done = done | (token == eos_token_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return ids

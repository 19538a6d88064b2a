from __future__ import annotations

import pytest
import torch

from cost_models.devices import lookup
from cost_models.memory import (
    kv_cache_bytes,
    kv_heads_per_device,
    param_bytes_per_device,
    usable_bytes,
)
from planner.arch import ModelArch
from planner.layers import Layer


@pytest.fixture(scope="module")
def llama_cache():
    """A real transformers Llama (tiny, random weights, GQA 4 query / 2 KV heads) and the
    DynamicCache of one forward over a (3, 7) batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 64, (3, 7)), use_cache=True)
    return ModelArch.from_hf_config(cfg), out.past_key_values


def test_kv_cache_formula_equals_a_real_hf_llama_cache(llama_cache):
    arch, cache = llama_cache
    real = sum(
        layer.keys.numel() * layer.keys.element_size()
        + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )
    assert kv_cache_bytes(arch, batch=3, context_len=7, tp=1, dtype_bytes=4) == real
    assert real == 3 * 7 * 3 * 2 * 2 * 8 * 4


def test_kv_cache_per_device_under_tp_shards_heads_then_replicates(llama_cache):
    arch, cache = llama_cache
    # Per device, tp=2 holds one of the 2 KV heads of each layer: the real tensors' head slice.
    one_head = sum(layer.keys[:, :1].numel() * 4 * 2 for layer in cache.layers)
    assert kv_cache_bytes(arch, 3, 7, tp=2, dtype_bytes=4) == one_head
    # tp=4 > 2 KV heads: each device still holds one whole head (replicated twice).
    assert kv_cache_bytes(arch, 3, 7, tp=4, dtype_bytes=4) == one_head
    assert kv_heads_per_device(2, 4) == 1
    assert kv_heads_per_device(8, 2) == 4


def test_params_per_device_shards_weights_but_not_replicated_kv_heads():
    arch = ModelArch("llama", hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=2,
                     head_dim=8, ffn_hidden_size=128, vocab_size=100)
    kv_w = 2 * 64 * 2 * 8 * 4  # K and V projections, float32
    norms = 4 * 64 * 4
    other = 100_000
    layer = Layer(1, "b", "block", (), kv_w + norms + other, 0, 0, 0, 0, {})
    assert param_bytes_per_device(layer, arch, 1) == layer.param_bytes
    assert param_bytes_per_device(layer, arch, 2) == other / 2 + kv_w / 2 + norms
    # tp 8 > 2 KV heads: one KV head per device = kv_w / 2.
    assert param_bytes_per_device(layer, arch, 8) == other / 8 + kv_w / 2 + norms
    # bfloat16 workload of a float32 trace halves every term.
    assert param_bytes_per_device(layer, arch, 1, dtype_bytes=2) == layer.param_bytes // 2


def test_usable_bytes_keeps_headroom():
    assert usable_bytes(lookup("H100"), 0.1) == int(80e9 * 0.9)

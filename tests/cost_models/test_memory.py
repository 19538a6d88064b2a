from __future__ import annotations

import pytest
import torch

from cost_models.devices import lookup
from cost_models.memory import kv_cache_bytes, layer_memory, usable_bytes
from cost_models.sharded import ShardedLayer
from planner.arch import ModelArch
from planner.cluster import Workload
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
    assert kv_cache_bytes(arch, batch=3, context_len=7, dtype_bytes=4) == real
    assert real == 3 * 7 * 3 * 2 * 2 * 8 * 4


def test_kv_cache_per_rank_is_the_analysed_share_of_the_real_cache(llama_cache):
    """The share of the keys/values a rank holds comes from the sharding analysis of the
    block (K/V projections split at tp 2; replicated at tp 4, with 2 KV heads)."""
    import planner
    from planner.models import load_model
    from planner.sharding import analyse_layer, to_sharded

    arch, cache = llama_cache
    lm = load_model("llama-tiny", batch_size=1, seq_len=8)
    traced = planner.trace(lm.model, lm.args, lm.kwargs)
    at2 = to_sharded(analyse_layer(traced, 1, tp=2), traced.layers[1])
    at4 = to_sharded(analyse_layer(traced, 1, tp=4), traced.layers[1])
    assert (at2.kv_fraction, at4.kv_fraction) == (0.5, 1.0)
    one_head = sum(layer.keys[:, :1].numel() * 4 * 2 for layer in cache.layers)
    assert kv_cache_bytes(arch, 3, 7, dtype_bytes=4) * at2.kv_fraction == one_head


def test_layer_memory_holds_the_analysed_parameter_pieces():
    arch = ModelArch("llama", hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=2,
                     head_dim=8, ffn_hidden_size=128, vocab_size=100)
    layer = Layer(1, "b", "block", (), 100_000, 0, 0, 1000, 0, {})
    work = Workload(batch_size=1, seq_len=8, dtype="float32")
    whole = layer_memory(layer, arch, 1, work, 1)
    assert whole.params == 100_000
    piece = ShardedLayer(2, (), 52_000, activation_fraction=0.5)
    half = layer_memory(layer, arch, 2, work, 1, sharded=piece)
    assert half.params == 52_000
    assert half.activations < whole.activations
    bf16 = layer_memory(layer, arch, 2, Workload(batch_size=1, seq_len=8, dtype="bfloat16"), 1,
                        sharded=piece)
    assert bf16.params == 26_000
    with pytest.raises(ValueError, match="sharding analysis"):
        layer_memory(layer, arch, 2, work, 1)


def test_usable_bytes_keeps_headroom():
    assert usable_bytes(lookup("H100"), 0.1) == int(80e9 * 0.9)

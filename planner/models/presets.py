"""Presets of real model sizes, looked up by name.

Hyper-parameters are the published configurations (HF ``config.json`` of each release);
weights are never downloaded: models are built from the config with random weights, or on
the ``meta`` device for planning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """A named model: ``kind`` is ``"hf"`` (config kwargs include ``model_type``), ``"gpt"``,
    ``"mlp"`` or ``"cnn"`` (kwargs of the hand-written model's config dataclass)."""

    name: str
    kind: str
    config: dict = field(default_factory=dict)
    description: str = ""


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> dict:
    return dict(model_type="gpt2", n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                vocab_size=50257, n_positions=1024)


def _llama(hidden, inter, layers, heads, kv, vocab, theta, max_pos) -> dict:
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                vocab_size=vocab, rope_theta=theta, max_position_embeddings=max_pos,
                rms_norm_eps=1e-5, tie_word_embeddings=False)


_ALL = [
    Preset("gpt2", "hf", _gpt2(12, 768, 12), "GPT-2 small (124M)"),
    Preset("gpt2-medium", "hf", _gpt2(24, 1024, 16), "GPT-2 medium (355M)"),
    Preset("gpt2-large", "hf", _gpt2(36, 1280, 20), "GPT-2 large (774M)"),
    Preset("gpt2-xl", "hf", _gpt2(48, 1600, 25), "GPT-2 XL (1.5B)"),
    Preset("llama-2-7b", "hf", _llama(4096, 11008, 32, 32, 32, 32000, 10000.0, 4096), "Llama 2 7B"),
    Preset("llama-2-13b", "hf", _llama(5120, 13824, 40, 40, 40, 32000, 10000.0, 4096), "Llama 2 13B"),
    Preset("llama-2-70b", "hf", _llama(8192, 28672, 80, 64, 8, 32000, 10000.0, 4096), "Llama 2 70B (GQA)"),
    Preset("llama-3-8b", "hf", _llama(4096, 14336, 32, 32, 8, 128256, 500000.0, 8192), "Llama 3 8B (GQA)"),
    Preset("llama-3-70b", "hf", _llama(8192, 28672, 80, 64, 8, 128256, 500000.0, 8192), "Llama 3 70B (GQA)"),
    Preset("llama-3.1-405b", "hf", _llama(16384, 53248, 126, 128, 8, 128256, 500000.0, 131072),
           "Llama 3.1 405B (126 layers, GQA)"),
    # Small models for tests, examples and `plan run` on CPU.
    Preset("gpt-tiny", "gpt", dict(n_layer=4, n_head=4, n_embd=64, vocab_size=256, block_size=128),
           "hand-written GPT, fused qkv (tiny)"),
    Preset("gpt2-tiny", "hf", dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4, vocab_size=256, bos_token_id=0, eos_token_id=0,
                                   n_positions=128), "HF GPT-2 architecture (tiny)"),
    Preset("llama-tiny", "hf", dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=256, max_position_embeddings=256),
           "HF Llama architecture with GQA (tiny)"),
    Preset("mlp", "mlp", dict(in_features=256, hidden=512, out_features=10, num_blocks=4),
           "residual MLP"),
    Preset("cnn", "cnn", dict(), "small CNN (conv-bn-relu blocks)"),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}

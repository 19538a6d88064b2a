"""Calibrating this machine's device: profile a fixed set of models, fit the roofline.

``plan calibrate`` and ``benchmarks/cost_model_accuracy.py`` both call
``calibrate_this_device``, so the efficiencies a plan uses are the ones whose accuracy the
benchmark reports. The set is three small decoders (hand-written GPT, HF GPT-2, HF Llama
with GQA) at ``CALIBRATION_SHAPES``; the benchmark evaluates at other shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["CALIBRATION_SHAPES", "CALIBRATION_VOCAB", "calibration_models", "calibration_inputs",
           "calibrate_this_device"]

CALIBRATION_SHAPES = [(1, 16), (2, 48), (8, 96)]
CALIBRATION_VOCAB = 512


def calibration_models() -> list[tuple[str, torch.nn.Module]]:
    """(name, model) of the calibration set: tiny configs, random weights, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from planner.models import GPT, GPTConfig

    torch.manual_seed(0)
    vocab = CALIBRATION_VOCAB
    gpt = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=vocab, block_size=256))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=vocab,
                                      n_positions=256, bos_token_id=0, eos_token_id=0))
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    return [("gpt", gpt.eval()), ("hf-gpt2", gpt2.eval()), ("hf-llama", llama.eval())]


def calibration_inputs(name: str, batch: int, seq: int) -> tuple[tuple, dict]:
    ids = torch.randint(0, CALIBRATION_VOCAB, (batch, seq))
    if name == "gpt":
        return (ids,), {}
    return (), {"input_ids": ids, "use_cache": False}


def calibrate_this_device(*, repeats: int = 30, cache=None, models=None,
                          progress: Callable[[int, int, str], None] | None = None):
    """Profile the calibration set on the CPU here and store fitted roofline efficiencies.

    Returns:
        ``cost_models.roofline.Efficiencies`` (also written to the cache).
    """
    from cost_models.profiler import profile_model
    from cost_models.roofline import calibrate_device, layer_work
    from planner.cluster import Workload
    from planner.tracing import trace

    models = models or calibration_models()
    samples, layer_pairs = [], []
    steps = [(name, model, b, s) for name, model in models for b, s in CALIBRATION_SHAPES]
    for i, (name, model, batch, seq) in enumerate(steps):
        if progress:
            progress(i, len(steps), f"{name} {batch}x{seq}")
        args, kwargs = calibration_inputs(name, batch, seq)
        traced = trace(model, args=args, kwargs=kwargs, name=name)
        prof = profile_model(traced, args, kwargs, repeats=repeats, node_repeats=5, cache=cache)
        samples += prof.op_samples()
        work = Workload(batch_size=batch, seq_len=seq, dtype="float32", phase="prefill")
        layer_pairs += [(layer_work(layer, traced.arch, 1, work, batch), lp.median_s)
                        for layer, lp in zip(traced.layers, prof.layers)]
    if progress:
        progress(len(steps), len(steps), "fitting")
    return calibrate_device(samples, layer_pairs, cache=cache)

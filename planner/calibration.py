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
           "profile_calibration_set", "fit_this_device", "calibrate_this_device"]

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


def profile_calibration_set(shapes=None, *, models=None, repeats: int = 150, cache=None,
                            progress: Callable[[int, int, str], None] | None = None):
    """Trace and profile every (model, shape) in one interleaved measurement.

    Returns:
        ``[(name, batch, seq, traced, profile), ...]`` in the order of models, then shapes.
    """
    from cost_models.profiler import profile_models
    from planner.tracing import trace

    models = models or calibration_models()
    shapes = shapes or CALIBRATION_SHAPES
    traced = []
    for name, model in models:
        for batch, seq in shapes:
            args, kwargs = calibration_inputs(name, batch, seq)
            traced.append((name, batch, seq, trace(model, args=args, kwargs=kwargs, name=name),
                           args, kwargs))  # fmt: skip

    def hook(done, total, layer, _cached):
        if progress:
            progress(done, total, layer)

    profiles = profile_models([(t, a, k) for _, _, _, t, a, k in traced], repeats=repeats,
                              node_repeats=15, cache=cache, progress=hook)  # fmt: skip
    return [(n, b, s, t, p) for (n, b, s, t, _, _), p in zip(traced, profiles)]


def fit_this_device(profiled, *, cache=None, save: bool = True, host_ranks: int = 1):
    """Fit the roofline of this CPU to ``profile_calibration_set`` results (and store it);
    ``host_ranks``: ranks plans run on this host (``calibrate_device``)."""
    from cost_models.roofline import calibrate_device, layer_work
    from planner.cluster import Workload

    samples, layer_pairs = [], []
    for _name, batch, seq, traced, prof in profiled:
        samples += prof.op_samples()
        work = Workload(batch_size=batch, seq_len=seq, dtype="float32", phase="prefill")
        layer_pairs += [(layer_work(layer, traced.arch, 1, work, batch), lp.time_s)
                        for layer, lp in zip(traced.layers, prof.layers)]  # fmt: skip
    return calibrate_device(samples, layer_pairs, cache=cache, save=save, host_ranks=host_ranks)


def calibrate_this_device(*, repeats: int = 150, cache=None, models=None, host_ranks: int = 1,
                          progress: Callable[[int, int, str], None] | None = None):
    """Profile the calibration set on the CPU here and store fitted roofline efficiencies
    (``host_ranks``: the ranks plans run on this host, ``plan calibrate --cluster Nxcpu``).

    Returns:
        ``cost_models.roofline.Efficiencies`` (also written to the cache).
    """
    profiled = profile_calibration_set(models=models, repeats=repeats, cache=cache,
                                       progress=progress)  # fmt: skip
    return fit_this_device(profiled, cache=cache, host_ranks=host_ranks)

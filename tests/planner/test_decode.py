"""The decode step (planner/decode.py): a causal LM with its KV cache as graph inputs and
outputs, traced by ``planner.trace``, generating the tokens transformers' ``generate`` does.

Every generation test is a batch of 2 left-padded prompts of different lengths, where one
sequence meets its EOS mid-generation (the EOS id is a token it produces at step k >= 1 in a
first run, and one the other sequence never produces), so padding, per-sequence positions,
EOS stopping and padding after EOS are all compared token for token.
"""

from __future__ import annotations

import pytest
import torch

import planner
from cost_models.memory import kv_cache_bytes
from planner.arch import ModelArch
from planner.decode import DecodeError, DecodeStep, greedy_generate, kv_cache_nbytes
from planner.models import GPT, MLP, GPTConfig, MLPConfig, load_model

pytest.importorskip("transformers")

PROMPT, NEW, CONTEXT, PAD = 6, 8, 16, 0  # prompt 6 + 8 new tokens <= 16 cache slots

_GQA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 64}
# Tiny random models (hidden 64, 2 blocks, vocab 256, fp32). A larger initializer_range
# where the default one makes greedy decoding repeat one token, so that an EOS can appear
# mid-generation.
HF_MODELS = {
    "llama": _GQA,  # GQA 4:2, rotary
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "vocab_size": 256,
             "n_positions": 64, "initializer_range": 0.3},  # Conv1D, learned positions, tied
    "qwen2": _GQA,  # q/k/v biases
    "phi3": {**_GQA, "pad_token_id": 0},  # fused qkv_proj, fused gate_up
    "mistral": {**_GQA, "head_dim": 16, "sliding_window": None},
    "gemma": {**_GQA, "head_dim": 16, "initializer_range": 0.3},  # scaled embedding, tied
}


def _prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of lengths 6 and 4, the second left-padded with PAD."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :2] = 0
    ids[1, :2] = PAD
    return ids, mask


def _pick_eos(free: torch.Tensor) -> tuple[int, int, int]:
    """(sequence a, step k, token): a token that sequence a produces first at step k (1 <= k
    < NEW - 2) and the other sequence never produces, so a stops mid-generation and the other
    runs to the end."""
    for k in range(1, NEW - 2):
        for a in (0, 1):
            tok = int(free[a, k])
            if tok not in free[a, :k].tolist() and tok not in free[1 - a].tolist() and tok != PAD:
                return a, k, tok
    raise AssertionError(f"no mid-generation EOS candidate in {free.tolist()}; change the seed")


def _check_layout(traced, num_blocks: int) -> None:
    """pre + one layer per block + post; block j holds its cache inputs k_j, v_j and their
    updated values; no cache tensor crosses a cut."""
    assert [layer.kind for layer in traced.layers] == ["pre"] + ["block"] * num_blocks + ["post"]
    graph = traced.graph_module.graph
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    assert len(inputs) == 3 + 2 * num_blocks
    outputs = [n.name for n in next(n for n in graph.nodes if n.op == "output").all_input_nodes]
    assert len(outputs) == 1 + 2 * num_blocks
    cache_names = set(inputs[3:]) | set(outputs[1:])
    for j in range(num_blocks):
        nodes = set(traced.layers[j + 1].nodes)
        assert {inputs[3 + 2 * j], inputs[4 + 2 * j]} <= nodes, j
        assert {outputs[1 + 2 * j], outputs[2 + 2 * j]} <= nodes, j
    for cut in traced.cuts:
        assert not cache_names & {t.name for t in cut.tensors}, cut.after_layer
    assert outputs[0] in traced.layers[-1].nodes  # the logits


@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_traced_decode_step_generates_what_hf_generate_does(model_type: str) -> None:
    model = load_model(f"hf:{model_type}", HF_MODELS[model_type]).model
    step = DecodeStep(model, context_len=CONTEXT)
    traced = planner.trace(step, step.example_inputs(batch=2, tokens=1))
    _check_layout(traced, model.config.num_hidden_layers)

    ids, mask = _prompts(model.config.vocab_size)
    free = greedy_generate(step, ids, mask, NEW)  # the eager step, prompt in one step
    a, k, eos = _pick_eos(free)
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                              eos_token_id=eos, pad_token_id=PAD)[:, PROMPT:]
    # the scenario is real: a stops at step k and is padded, the other runs to the end
    assert expected.shape == (2, NEW)
    assert int(expected[a, k]) == eos and bool((expected[a, k + 1:] == PAD).all())
    assert torch.equal(expected[a, :k], free[a, :k]) and torch.equal(expected[1 - a], free[1 - a])

    got = greedy_generate(traced, ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())
    eager = greedy_generate(step, ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(eager, expected)


def test_prefill_graph_then_decode_graph() -> None:
    """A prefill graph traced at the prompt length writes the whole prompt in one call; the
    one-token graph continues from its cache (llama, GQA)."""
    model = load_model("hf:llama", HF_MODELS["llama"]).model
    step = DecodeStep(model, context_len=CONTEXT)
    decode = planner.trace(step, step.example_inputs(batch=2, tokens=1))
    prefill = planner.trace(step, step.example_inputs(batch=2, tokens=PROMPT))
    _check_layout(prefill, 2)
    ids, mask = _prompts(model.config.vocab_size)
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
                              eos_token_id=None, pad_token_id=PAD)[:, PROMPT:]
    got = greedy_generate(decode, ids, mask, NEW, prefill=prefill)
    assert torch.equal(got, expected[:, : got.shape[1]]) and got.shape[1] >= 1


def _zoo_gpt() -> GPT:
    # Untied: with the default N(0, 1) embedding tied to the head, the tiny random model
    # greedily repeats the prompt's last token, and no EOS could appear mid-generation.
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=64,
                         tie_embeddings=False)).eval()


def test_zoo_gpt_traced_decode_step_matches_its_reference_generate() -> None:
    model = _zoo_gpt()
    step = DecodeStep(model, context_len=CONTEXT)
    traced = planner.trace(step, step.example_inputs(batch=2, tokens=1))
    _check_layout(traced, 2)
    assert [layer.name for layer in traced.layers] == ["pre", "model.h.0", "model.h.1", "post"]

    ids, mask = _prompts(256)
    free = model.generate(ids, NEW, attention_mask=mask)[:, PROMPT:]
    a, k, eos = _pick_eos(free)
    expected = model.generate(ids, NEW, attention_mask=mask, eos_token_id=eos,
                              pad_token_id=PAD)[:, PROMPT:]
    assert expected.shape == (2, NEW) and int(expected[a, k]) == eos
    assert bool((expected[a, k + 1:] == PAD).all())
    got = greedy_generate(traced, ids, mask, NEW, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(got, expected), (got.tolist(), expected.tolist())


def test_zoo_gpt_explicit_positions_and_mask_equal_the_plain_forward() -> None:
    """The additive path (positions 0..T-1, a causal mask, no cache) computes what the plain
    causal forward does."""
    model = _zoo_gpt()
    ids = torch.randint(0, 256, (2, 7))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        plain = model(ids)
        explicit = model(ids, positions=torch.arange(7).expand(2, 7), attn_mask=causal)
    torch.testing.assert_close(explicit, plain)


@pytest.mark.parametrize("spec, overrides", [
    ("hf:llama", HF_MODELS["llama"]),
    ("hf:gpt2", HF_MODELS["gpt2"]),
])
def test_allocated_cache_bytes_equal_the_cost_model(spec: str, overrides: dict) -> None:
    model = load_model(spec, overrides).model
    step = DecodeStep(model, context_len=CONTEXT)
    allocated = sum(t.numel() * t.element_size() for t in step.empty_cache(batch=3))
    assert allocated == kv_cache_nbytes(step, batch=3)
    arch = ModelArch.of_module(model)
    assert allocated == kv_cache_bytes(arch, batch=3, context_len=CONTEXT, dtype_bytes=4)
    assert kv_cache_nbytes(step, 3, 64, torch.bfloat16) == kv_cache_bytes(arch, 3, 64, 2)
    if spec == "hf:llama":  # GQA: 2 KV heads of 16, not the 4 query heads
        assert step.cache_specs[0].kv_heads == 2 and step.cache_specs[0].k_head_dim == 16


def test_model_without_a_cache_path_is_refused() -> None:
    class Plain(torch.nn.Module):  # a factory's model: logits of token ids, no cache
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(32, 16)
            self.head = torch.nn.Linear(16, 32)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    for model in (Plain(), MLP(MLPConfig(in_features=8, hidden=16, out_features=4))):
        with pytest.raises(ValueError, match="no KV-cache path"):
            DecodeStep(model, context_len=8)
    assert issubclass(DecodeError, ValueError)


def test_sliding_window_shorter_than_the_context_is_refused() -> None:
    model = load_model("hf:mistral", {**HF_MODELS["mistral"], "sliding_window": 4}).model
    with pytest.raises(DecodeError, match="sliding window of 4"):
        DecodeStep(model, context_len=CONTEXT)


def test_folded_meta_trace_of_a_decode_step_equals_the_full_trace() -> None:
    """On meta with 8 blocks the tracer folds (traces 3 blocks); the caches of the blocks it
    left out are returned untouched and must not cross cuts either, so the folded layers and
    cuts equal the full trace's."""
    model = load_model("hf:llama", {**HF_MODELS["llama"], "num_hidden_layers": 8},
                       device="meta").model
    step = DecodeStep(model, context_len=CONTEXT)
    folded = planner.trace(step, step.example_inputs(batch=2, tokens=1))
    full = planner.trace(step, step.example_inputs(batch=2, tokens=1), fold_blocks=False)
    assert folded.folded and not full.folded
    _check_layout(full, 8)
    assert folded.fingerprint == full.fingerprint
    assert [c.bytes for c in folded.cuts] == [c.bytes for c in full.cuts]
    assert [(la.flops, la.output_bytes) for la in folded.layers] == \
        [(la.flops, la.output_bytes) for la in full.layers]

"""Tiny HuggingFace decoder-only models for the sharding coverage sweep (issue 11).

The sweep plans each model type below on ``4xcpu`` with tensor- and pipeline-parallel pins
and runs the plan with ``plan run --check``, so that every weight and activation layout
that the sharding analysis has to handle (fused q|k|v with unequal GQA slices, fused
gate|up, MQA projections split with ``split_with_sizes``, biases, learned and sinusoidal
positions, alibi, partial and interleaved rotary, q/k norms, parallel residuals, MoE
experts, MLA, ...) is met by at least one model that is checked against eager::

    plan hf:phi3 --set hidden_size=64 ... --cluster 4xcpu --batch 2 --seq 8 --tp 2 --pp 1 \\
        --dp 1 --out phi3.json
    plan run phi3.json --check

``COVERAGE_MODELS`` maps a transformers ``model_type`` to the config overrides (the CLI's
``--set`` values, ``overrides`` of ``planner.models.load_model``) that make it tiny: hidden
64, 4 layers, 4 attention heads (2 KV heads where the type has GQA, so that kv < tp=4
cases exist), FFN 128, vocab 256 (divisible by 4), 64 positions. Each loads with random
weights through ``load_model("hf:<type>", batch_size=2, seq_len=8, overrides=...)``, traces
with ``planner.trace`` into pre + 4 blocks + post, and runs eagerly in fp32 without NaN on
transformers 5.24 / torch 2.13. ``FEATURES`` names the layout feature each type exercises;
``SUBSET`` is the short list ``make test`` sweeps (it covers every required feature).
``coverage_spec(model_type)`` gives the ``plan`` arguments.

The comment above each entry records what the sweep measured at commit 6ce6610 (before the
issue 11 sharding rewrite), all with ``--cluster 4xcpu --batch 2 --seq 8``:

- ``pp2``: ``--pp 2 --tp 1 --dp 1 --objective throughput`` (the throughput objective
  splits the 4 blocks 2+2 with 2 microbatches; latency puts every block on stage 0),
  then ``plan run --check`` (tolerance 1e-4);
- ``tp2 today``: ``--tp 2 --pp 1 --dp 1`` (sequence parallelism left to the solver), then
  ``plan run --check``: ``pass``, or where it failed (every failure today is a
  ``ShardingError`` raised by ``codegen.tensor_parallel`` in the ranks; planning itself
  never failed). A pass says how many block parameters were sharded (``shard_stage``'s
  report at tp 2, rank 0): "blocks replicated" means none of the type's projections
  is named in ``TP_PLAN``, so only the embedding and LM head were split (vocab-parallel)
  and the check compared replicated blocks.

The sweep took about 1 h 34 min of wall time on the shared 2-core machine (82 plan + run
pairs and 2 reruns; about 30 s per ``plan run`` when the machine was quiet, up to 2 min
under load).

transformers quirks met while building the table:

- config keys differ per type (``n_embd``/``n_layer``/``n_head``/``n_inner`` for gpt2,
  gptj, codegen, gpt_bigcode, ctrl (``dff``); ``d_model``/``n_layers``/``n_heads``/
  ``expansion_ratio``/``max_seq_len`` for mpt; ``d_model``/``num_layers``/
  ``attention_heads`` for xglm; ``num_layers``/``num_heads`` for gpt_neo; ``n_layer``/
  ``n_head`` for bloom; ``ffn_dim`` for opt and xglm; ``ffn_hidden_size`` for falcon);
- partial rotary is ``rope_parameters["partial_rotary_factor"]`` in 5.x (``rotary_pct`` is
  gone); the defaults already are partial (gpt_neox 0.25, stablelm 0.25, phi 0.5,
  persimmon 0.5, nemotron 0.5, glm 0.5), so no override is needed;
- types whose default ``head_dim`` is fixed (gemma 256, qwen3 128, ...) need
  ``head_dim=16``; a default ``pad_token_id`` beyond the small vocab (phi3 32000, glm,
  smollm3) makes ``nn.Embedding`` refuse it, so it is set to 0;
- opt's ``word_embed_proj_dim`` (default 768) must equal ``hidden_size`` or it adds
  project_in/project_out;
- bloom, mpt, xglm, gpt_neo, gemma2, gpt_oss and mamba pick eager attention by themselves
  (the loader does not accept ``attn_implementation`` as a ``--set`` key, and none is
  needed);
- granitemoe returns a ``DynamicCache`` unless ``use_cache=false`` (its forward has no
  ``use_cache`` parameter the loader could set);
- the expert count is ``num_local_experts`` (mixtral, granitemoe, gpt_oss; also qwen3_moe),
  ``num_experts`` (qwen2_moe, olmoe) or ``n_routed_experts`` (deepseek_v3);
- a default ``num_key_value_heads`` larger than the tiny head count (deepseek_v3: 128) is
  refused by the loader, so it is set even where it means nothing (MLA).

Left out because they do not trace: dbrx (its experts loop over ``nonzero()``, data
dependent; it also needs ``clip_qkv`` set, its ``clamp(min=None, max=None)`` fails) and
jetmoe (data-dependent expert dispatch).
"""

from __future__ import annotations

import json

__all__ = ["COVERAGE_MODELS", "FEATURES", "SUBSET", "coverage_spec"]

# llama-style keys: hidden 64, 4 layers, 4 heads, 2 KV heads, FFN 128, vocab 256, 64 positions
_GQA = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 64,
}
# the same without num_key_value_heads (types that have no GQA)
_MHA = {k: v for k, v in _GQA.items() if k != "num_key_value_heads"}
# gpt2-style keys
_GPT2 = {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_inner": 128, "vocab_size": 256,
         "n_positions": 64}

COVERAGE_MODELS: dict[str, dict] = {
    # --- the required layout features --------------------------------------------------
    # pp2: pass | tp2 today: ShardingError at o_proj (fused qkv_proj is not in TP_PLAN, so
    # the attention output is replicated while o_proj is row-parallel)
    "phi3": {**_GQA, "pad_token_id": 0},
    # pp2: pass | tp2 today: ShardingError, split_with_sizes of the column-sharded c_attn
    # output has no rule
    "gpt_bigcode": {**_GPT2, "multi_query": True},
    # pp2: pass | tp2 today: pass, but the blocks stay replicated (query_key_value, dense,
    # dense_h_to_4h are not in TP_PLAN; only the embedding and head are vocab-parallel)
    "falcon": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
               "ffn_hidden_size": 128, "vocab_size": 256, "max_position_embeddings": 64,
               "multi_query": True, "parallel_attn": True},
    # pp2: pass | tp2 today: pass (40 block params sharded)
    "qwen2": {**_GQA},
    # pp2: pass | tp2 today: ShardingError at out_proj (q/k/v_proj column-sharded, out_proj
    # not in TP_PLAN)
    "opt": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "ffn_dim": 128, "vocab_size": 256, "max_position_embeddings": 64,
            "word_embed_proj_dim": 64},
    # pp2: pass | tp2 today: pass, blocks replicated (query_key_value/dense not in TP_PLAN)
    "gpt_neox": {**_MHA},
    # pp2: pass | tp2 today: pass, blocks replicated (query_key_value/dense not in TP_PLAN)
    "bloom": {"hidden_size": 64, "n_layer": 4, "n_head": 4, "vocab_size": 256},
    # pp2: pass | tp2 today: ShardingError at dense (the o-projection's name is not in TP_PLAN)
    "phi": {**_GQA},
    # pp2: pass | tp2 today: pass (28 block params sharded)
    "qwen3": {**_GQA, "head_dim": 16},
    # pp2: pass | tp2 today: ShardingError, mean over a sharded dim (full-width q_norm)
    "olmo2": {**_GQA},
    # pp2: pass | tp2 today: pass (16 block params: attention only, experts replicated)
    "mixtral": {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
    # pp2: pass | tp2 today: ShardingError with sp on (the solver's pick): the shared expert
    # runs on [B*T, C], sequence parallelism needs (B, T, C); with --sp off: pass (40 sharded)
    "qwen2_moe": {**_GQA, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128},
    # pp2: pass | tp2 today: ShardingError, mean over a sharded dim (full-width q_norm)
    "olmoe": {**_GQA, "num_experts": 4, "num_experts_per_tok": 2},
    # --- more layouts --------------------------------------------------------------------
    # pp2: pass | tp2 today: pass (28 block params sharded)
    "llama": {**_GQA, "head_dim": 16},
    # pp2: pass | tp2 today: pass (28 block params sharded)
    "mistral": {**_GQA, "head_dim": 16, "sliding_window": 4},
    # pp2: pass | tp2 today: pass (28 block params sharded)
    "gemma": {**_GQA, "head_dim": 16},
    # pp2: pass | tp2 today: ShardingError, matmul (eager attention) has no rule
    "gemma2": {**_GQA, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4},
    # pp2: pass | tp2 today: ShardingError, type_as (q/k norm on sharded heads) has no rule
    "gemma3_text": {**_GQA, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4},
    # pp2: pass | tp2 today: pass (28 block params sharded)
    "granite": {**_GQA, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                "attention_multiplier": 0.25, "logits_scaling": 2.0},
    # pp2: pass | tp2 today: pass (40 block params sharded)
    "starcoder2": {**_GQA},
    # pp2: pass | tp2 today: ShardingError, mul of the replicated per-head q/k norm weight
    # with sharded heads
    "cohere": {**_GQA, "use_qk_norm": True},
    # pp2: pass | tp2 today: ShardingError, clamp_ (clip_qkv) has no rule
    "olmo": {**_MHA, "clip_qkv": 8.0},
    # pp2: pass | tp2 today: ShardingError, split of the sharded heads dim into 4 (per-head
    # q/k LayerNorm)
    "stablelm": {**_GQA, "qk_layernorm": True, "use_qkv_bias": True},
    # pp2: pass | tp2 today: pass, blocks replicated (query_key_value/dense not in TP_PLAN)
    "persimmon": {**_MHA},
    # pp2: pass | tp2 today: ShardingError, square (relu^2) has no rule
    "nemotron": {**_GQA, "head_dim": 16},
    # pp2: pass | tp2 today: ShardingError, stack (interleaved rotary) has no rule
    "glm": {**_GQA, "head_dim": 16, "pad_token_id": 0, "eos_token_id": 1},
    # pp2: pass | tp2 today: ShardingError, mean over a sharded dim (attn/ffn sub-norm)
    "bitnet": {**_GQA},
    # pp2: pass | tp2 today: pass (28 block params sharded)
    "smollm3": {**_GQA, "pad_token_id": 0, "no_rope_layer_interval": 2},
    # pp2: pass | tp2 today: pass (24 block params sharded)
    "gpt2": {**_GPT2},
    # pp2: FAIL, RuntimeError 'input tensor has to be contiguous': the rotary sin/cos crossing
    # the cut are views from split(sincos), gloo isend/irecv refuse them | tp2 today:
    # ShardingError, stack (interleaved rotary) has no rule
    "gptj": {**_GPT2, "rotary_dim": 8},
    # pp2: FAIL, same non-contiguous rotary sin/cos as gptj | tp2 today: pass, blocks
    # replicated (qkv_proj/out_proj/fc_in/fc_out not in TP_PLAN)
    "codegen": {**_GPT2, "n_ctx": 64, "rotary_dim": 8},
    # pp2: pass | tp2 today: pass (8 block params: ffn up/down sharded, Wqkv/out_proj
    # replicated)
    "mpt": {"d_model": 64, "n_layers": 4, "n_heads": 4, "expansion_ratio": 2,
            "vocab_size": 256, "max_seq_len": 64},
    # pp2: pass | tp2 today: ShardingError, reshape [B,nh,T,hd] -> [B*nh,T,hd] of sharded heads
    "xglm": {"d_model": 64, "num_layers": 4, "attention_heads": 4, "ffn_dim": 128,
             "vocab_size": 256, "max_position_embeddings": 64},
    # pp2: pass | tp2 today: ShardingError at out_proj (not in TP_PLAN)
    "biogpt": {**_MHA},
    # pp2: pass (a first try died with torchrun status -15 after 1 s, empty log, under heavy
    # machine load; the rerun passed) | tp2 today: ShardingError, matmul (eager attention)
    "gpt_neo": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "intermediate_size": 128,
                "vocab_size": 256, "max_position_embeddings": 64,
                "attention_types": [[["global", "local"], 2]], "window_size": 4},
    # pp2: pass | tp2 today: pass, blocks replicated (Wq/Wk/Wv/dense/ffn not in TP_PLAN)
    "ctrl": {"n_embd": 64, "n_layer": 4, "n_head": 4, "dff": 128, "vocab_size": 256,
             "n_positions": 64},
    # pp2: pass | tp2 today: pass (16 block params: attention only, experts replicated)
    "granitemoe": {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2,
                   "use_cache": False},
    # pp2: pass | tp2 today: ShardingError, chunk (rotary halves) has no rule
    "gpt_oss": {**_GQA, "head_dim": 16, "intermediate_size": 64, "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": 4},
    # pp2: pass | tp2 today: ShardingError at o_proj (MLA q_b_proj/kv_b_proj not in
    # TP_PLAN, so the attention output is replicated)
    "deepseek_v3": {**_MHA, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 32,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                    "v_head_dim": 16, "head_dim": 8},
    # pp2: pass | tp2 today: ShardingError at out_proj (not in TP_PLAN)
    "lfm2": {**_GQA, "full_attn_idxs": [1, 3], "block_auto_adjust_ff_dim": False},
    # pp2: pass | tp2 today: pass, blocks replicated (no attention; mixer not in TP_PLAN)
    "mamba": {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
              "vocab_size": 256, "state_size": 8, "conv_kernel": 4, "time_step_rank": 4},
}

FEATURES: dict[str, str] = {
    "phi3": "fused qkv_proj with unequal GQA slices (64|32|32) + fused gate_up_proj (chunk)",
    "gpt_bigcode": "MQA: fused c_attn split by split() into q (64) and one shared k|v head",
    "falcon": "MQA fused query_key_value viewed [B,T,nh+2,hd]; parallel attn+MLP on one LN",
    "qwen2": "separate q/k/v projections with biases (o_proj without), GQA",
    "opt": "learned positions (offset 2), fc1/fc2 MLP with ReLU, biases everywhere",
    "gpt_neox": "parallel residual (two LNs), per-head interleaved fused qkv, partial rotary 0.25",
    "bloom": "alibi (baddbmm with a per-head bias), per-head fused qkv, embedding LayerNorm",
    "phi": "partial rotary 0.5, attn+MLP in parallel on one LN, dense/fc1/fc2 with biases",
    "qwen3": "per-head q/k RMSNorm over head_dim, explicit head_dim",
    "olmo2": "q/k RMSNorm over the whole projection width (all heads), post-norms",
    "mixtral": "MoE: 4 experts top-2, stacked expert weights (grouped_mm fallback)",
    "qwen2_moe": "MoE 4 experts top-2 + shared expert with a sigmoid gate",
    "olmoe": "MoE 4 experts top-2 + full-width q/k RMSNorm",
    "llama": "baseline: separate q/k/v, GQA 4:2, SwiGLU, RMSNorm, rotary",
    "mistral": "sliding-window causal mask (window 4 < seq 8)",
    "gemma": "GeGLU, embedding scaled by sqrt(hidden), (1+w) RMSNorm, tied embeddings",
    "gemma2": "attn/logit soft-capping, sandwich norms, alternating sliding/global layers",
    "gemma3_text": "per-head q/k norm, sandwich norms, sliding/global layers with two ropes",
    "granite": "scalar embedding/residual/attention/logit multipliers",
    "starcoder2": "GQA with biases, LayerNorm, non-gated c_fc/c_proj MLP",
    "cohere": "parallel attn+MLP, interleaved rotary, per-head q/k LayerNorm, logit scale",
    "olmo": "non-parametric LayerNorm, clip_qkv clamp on q/k/v",
    "stablelm": "partial rotary 0.25, per-head q/k LayerNorm (one weight per head), qkv bias",
    "persimmon": "fused qkv interleaved per head, q/k LayerNorm, partial rotary 0.5, relu^2",
    "nemotron": "non-gated relu^2 MLP, LayerNorm1P, partial rotary 0.5",
    "glm": "interleaved partial rotary 0.5, fused gate_up_proj, qkv bias",
    "bitnet": "RMSNorm on the attention output before o_proj and on the MLP hidden (sub-norms)",
    "smollm3": "NoPE: rotary skipped on every 2nd layer (blocks of one class, two graphs)",
    "gpt2": "Conv1D (addmm, transposed weights), fused c_attn split into equal thirds",
    "gptj": "parallel residual, interleaved partial rotary (rotary_dim 8), no q/k/v bias",
    "codegen": "fused qkv_proj in 4 mp groups (q|v|k order inside each), partial rotary",
    "mpt": "alibi with fused Wqkv, no biases, expansion_ratio MLP",
    "xglm": "sinusoidal positions, scaled embeddings, fc1/fc2 MLP",
    "biogpt": "learned positions with scaled embeddings, LayerNorm pre-norm",
    "gpt_neo": "alternating global/local (window 4) attention, no attention scaling",
    "ctrl": "sinusoidal positions, separate Wq/Wk/Wv with biases",
    "granitemoe": "MoE with fused expert input_linear (ParallelExperts), multipliers",
    "gpt_oss": "attention sinks, MoE with biases and clamped SwiGLU, sliding/global layers",
    "deepseek_v3": "MLA (low-rank q and kv, rope/nope head split) + grouped-routing MoE",
    "lfm2": "hybrid: short depthwise conv blocks and attention blocks (one layer class)",
    "mamba": "SSM, no attention: fused in_proj x|z, depthwise conv1d, selective scan",
}

#: The types ``make test`` sweeps (tests/codegen/test_coverage.py): one type per layout
#: feature issue 11 names — fused qkv with unequal GQA slices and fused gate_up (phi3), MQA
#: split with split_with_sizes (gpt_bigcode), separate q/k/v with biases (qwen2), learned
#: positions with fc1/fc2 (opt), parallel residual and partial rotary (gpt_neox), alibi
#: (bloom), q/k norms (qwen3), MoE (mixtral). ``benchmarks/coverage.py`` runs every type.
SUBSET: tuple[str, ...] = (
    "phi3", "gpt_bigcode", "qwen2", "opt", "gpt_neox", "bloom", "qwen3", "mixtral",
)


def coverage_spec(model_type: str) -> tuple[str, list[str]]:
    """``("hf:<model_type>", ["key=value", ...])``: the MODEL argument and the ``--set``
    values of ``plan MODEL --set key=value ...`` for one entry of ``COVERAGE_MODELS``.

    Values are compact JSON (``true``, ``null``, ``[1,3]``, ``{"a":1}``), which is what
    ``--set`` parses; each item is one shell word.

    Raises:
        KeyError: ``model_type`` is not in ``COVERAGE_MODELS`` (the message lists them).
    """
    if model_type not in COVERAGE_MODELS:
        raise KeyError(f"{model_type!r} is not a coverage model; one of "
                       f"{', '.join(COVERAGE_MODELS)}")
    sets = [f"{key}={json.dumps(value, separators=(',', ':'))}"
            for key, value in COVERAGE_MODELS[model_type].items()]
    return f"hf:{model_type}", sets

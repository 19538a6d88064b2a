"""A decode plan prices every layer's compute from the decode step's graph (the one-token
``planner.decode.DecodeStep`` that ``plan run`` generates with), not from the
prefill-shaped trace scaled to one token; a model without a cache path falls back to the
latter and the plan says why."""

from __future__ import annotations

import pytest

from cost_models.layer_cost import TracedShape, compute_time
from cost_models.roofline import efficiencies_for
from planner.api import DecodeUnavailable, decode_step_for, plan_traced
from planner.cluster import Cluster, Workload
from planner.models.loader import load_model
from planner.tracing import trace

_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
BATCH, SEQ, CONTEXT = 2, 8, 32


@pytest.fixture(scope="module")
def llama():
    lm = load_model("hf:llama", _CONFIG, batch_size=BATCH, seq_len=SEQ, context_len=CONTEXT)
    traced = trace(lm.model, lm.args, lm.kwargs, name=lm.name, arch=lm.arch)
    return lm, traced


def _work(batch=BATCH):
    return Workload(batch_size=batch, seq_len=SEQ, dtype="float32", phase="decode",
                    context_len=CONTEXT)


def test_decode_step_pairs_with_the_model_layer_for_layer_and_carries_the_cache(llama):
    lm, traced = llama
    step = decode_step_for(lm.model, traced, _work(), Cluster.parse("1xcpu"))
    assert [layer.kind for layer in step.layers] == [layer.kind for layer in traced.layers]
    assert (step.batch_size, step.seq_len) == (BATCH, 1)
    block, decode_block = traced.layers[1], step.layers[1]
    # the step's block writes its cache (context-long tensors) and masks the whole context:
    # more ops than the prefill-shaped block has
    ops = sum(s.count for s in decode_block.op_stats.values())
    assert ops > sum(s.count for s in block.op_stats.values())


@pytest.mark.parametrize("mb", [1, 2])
def test_a_cpu_decode_plan_prices_each_layer_from_the_decode_step(llama, mb):
    lm, traced = llama
    work = _work()
    cluster = Cluster.parse("1xcpu")
    step = decode_step_for(lm.model, traced, work, cluster)
    plan = plan_traced(traced, cluster, work, pins={"microbatches": BATCH // mb},
                       alternatives=0, decode_traced=step)
    assert plan.extra["decode_pricing"].startswith("decode step graph")
    assert plan.parallelism.microbatch_size == mb
    eff = efficiencies_for(cluster.device_spec)
    shape = TracedShape(BATCH, 1, 4)
    for j, layer in enumerate(plan.layers):
        expected = compute_time(step.layers[j], traced.arch, 1, work, eff, mb, shape)
        assert layer.costs[1].compute_s == pytest.approx(expected, rel=1e-9)
    # not what the prefill-shaped block scaled to one token costs
    prefill = plan_traced(traced, cluster, work, pins={"microbatches": BATCH // mb},
                          alternatives=0)
    assert "prefill-shaped" in prefill.extra["decode_pricing"]
    assert prefill.layers[1].costs[1].compute_s != plan.layers[1].costs[1].compute_s


def test_a_model_without_a_cache_path_is_priced_from_the_prefill_trace_and_says_why():
    lm = load_model("hf:opt", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "vocab_size": 128,
                               "word_embed_proj_dim": 32},
                    batch_size=1, seq_len=8, context_len=16)
    traced = trace(lm.model, lm.args, lm.kwargs, name=lm.name, arch=lm.arch)
    work = Workload(batch_size=1, seq_len=8, dtype="float32", phase="decode", context_len=16)
    step = decode_step_for(lm.model, traced, work, Cluster.parse("1xcpu"))
    assert isinstance(step, DecodeUnavailable) and "DecodeStep" in step.reason
    plan = plan_traced(traced, Cluster.parse("1xcpu"), work, alternatives=0, decode_traced=step)
    assert plan.extra["decode_pricing"] == f"prefill-shaped layers scaled to one token ({step.reason})"


def test_gpu_decode_plans_keep_the_prefill_shaped_pricing(llama):
    lm, traced = llama
    work = Workload(batch_size=BATCH, seq_len=SEQ, dtype="bfloat16", phase="decode",
                    context_len=CONTEXT)
    gpu = Cluster.parse("2xH100")
    unavailable = decode_step_for(lm.model, traced, work, gpu)
    assert isinstance(unavailable, DecodeUnavailable) and "in place" in unavailable.reason
    # a step traced for cpu and handed to a GPU plan is not used either
    step = decode_step_for(lm.model, traced, work, Cluster.parse("1xcpu"))
    with_step = plan_traced(traced, gpu, work, alternatives=0, decode_traced=step)
    without = plan_traced(traced, gpu, work, alternatives=0)
    assert with_step.extra["decode_pricing"] == (
        f"prefill-shaped layers scaled to one token ({unavailable.reason})")
    assert [layer.costs for layer in with_step.layers] == [layer.costs for layer in without.layers]

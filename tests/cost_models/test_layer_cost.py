from __future__ import annotations

import pytest

from cost_models.devices import lookup
from cost_models.layer_cost import collectives_at, layer_cost
from cost_models.nccl import choose as nccl_choose
from cost_models.roofline import TracedShape
from planner.cluster import Cluster, Workload


def test_tp_block_prices_exactly_the_analysed_collectives_and_shares(llama_tiny):
    """The block's strategy comes from the graph (two all-reduces of the hidden state,
    Megatron-style for Llama); the cost is that strategy's collectives scaled to the
    workload's tokens, its parameter pieces, and its share of the work."""
    from planner.sharding import analyse_layer, to_sharded

    traced = llama_tiny
    block = traced.layers[1]
    sharded = to_sharded(analyse_layer(traced, 1, tp=2), block)
    work = Workload(batch_size=64, seq_len=2048, dtype="bfloat16")
    cluster = Cluster.parse("8xH100")
    traced_shape = TracedShape(1, 8, 4)
    one = layer_cost(block, traced.arch, 1, work, cluster, 8, traced=traced_shape)
    two = layer_cost(block, traced.arch, 2, work, cluster, 8, traced=traced_shape,
                     sharded=sharded)
    hidden = 8 * 2048 * 64 * 2  # tokens x hidden x bf16
    assert collectives_at(sharded, work, 8, traced_shape) == [("all_reduce", hidden)] * 2
    # on a GPU each is priced as NCCL runs it (its best algorithm and protocol)
    assert two.comm_s == pytest.approx(
        2 * nccl_choose("all_reduce", hidden, 2, lookup("H100")).seconds)
    assert one.comm_s == 0.0
    assert two.compute_s < one.compute_s
    # every projection is split in two; the two norm weights (64 floats each) are not
    norms = 2 * 64 * 4
    assert sharded.param_bytes == (block.param_bytes - norms) // 2 + norms
    assert two.memory.params == sharded.param_bytes // 2  # bf16 workload of an fp32 trace
    assert one.source == two.source == "predicted"
    compute_s, comm_s, memory_bytes = two
    assert (compute_s, comm_s, memory_bytes) == (two.compute_s, two.comm_s, two.memory_bytes)


def test_tp_without_its_analysis_is_an_error(llama_tiny):
    work = Workload(batch_size=1, seq_len=8, dtype="float32")
    with pytest.raises(ValueError, match="sharding analysis"):
        layer_cost(llama_tiny.layers[1], llama_tiny.arch, 2, work, Cluster.parse("8xH100"), 1)


def test_measured_time_is_used_at_the_traced_shape(tiny_gpt, tmp_path):
    _, traced, ids = tiny_gpt
    from cost_models.profiler import profile_model

    prof = profile_model(traced, args=(ids,), cache=tmp_path, repeats=3, node_repeats=1, min_time_s=0)
    work = Workload(batch_size=1, seq_len=8, dtype="float32")
    est = layer_cost(traced.layers[1], None, 1, work, Cluster.parse("1xcpu"), 1,
                     measured=prof.layers[1])
    assert est.source == "measured"
    assert est.compute_s == prof.layers[1].time_s


def test_decode_memory_includes_the_kv_cache_of_every_microbatch(tiny_gpt):
    _, traced, _ = tiny_gpt
    from planner.arch import ModelArch

    arch = ModelArch("gpt", 32, 2, num_heads=2, num_kv_heads=2, head_dim=16)
    work = Workload(batch_size=8, seq_len=8, dtype="float32", phase="decode", context_len=100)
    est = layer_cost(traced.layers[1], arch, 1, work, lookup("H100"), 2, microbatches=4,
                     traced=TracedShape(1, 8, 4))
    assert est.memory.kv_cache == 8 * 100 * 2 * 2 * 16 * 4
    assert est.memory_bytes == est.memory.params + est.memory.kv_cache

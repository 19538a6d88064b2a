from __future__ import annotations

import pytest

from cost_models.collectives import collective_time
from cost_models.devices import lookup
from cost_models.layer_cost import layer_cost, tp_collectives
from cost_models.roofline import TracedShape
from planner.cluster import Cluster, Workload


def test_tp_block_costs_two_all_reduces_and_splits_compute(tiny_gpt):
    _, traced, _ = tiny_gpt
    from planner.arch import ModelArch

    arch = ModelArch("gpt", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                     head_dim=16, ffn_hidden_size=128, vocab_size=64, tied_embeddings=True)
    block = traced.layers[1]
    work = Workload(batch_size=64, seq_len=2048, dtype="bfloat16")
    cluster = Cluster.parse("8xH100")
    traced_shape = TracedShape(1, 8, 4)
    one = layer_cost(block, arch, 1, work, cluster, 8, traced=traced_shape)
    two = layer_cost(block, arch, 2, work, cluster, 8, traced=traced_shape)
    hidden = 8 * 2048 * 32 * 2
    assert tp_collectives(block, arch, 2, work, 8, traced_shape) == [("all_reduce", hidden)] * 2
    assert two.comm_s == pytest.approx(
        2 * collective_time("all_reduce", hidden, 2, device=lookup("H100")))
    assert one.comm_s == 0.0
    assert two.compute_s < one.compute_s
    assert two.memory_bytes < one.memory_bytes
    assert one.source == two.source == "predicted"
    compute_s, comm_s, memory_bytes = two
    assert (compute_s, comm_s, memory_bytes) == (two.compute_s, two.comm_s, two.memory_bytes)


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

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cost_models.devices import lookup
from cost_models.roofline import (
    ClassEfficiency,
    Efficiencies,
    OpSample,
    OpWork,
    TracedShape,
    attention_work,
    efficiencies_for,
    elementwise_work,
    fit_class_scales,
    fit_efficiencies,
    layer_work,
    matmul_work,
    norm_work,
    op_time,
    work_time,
)
from planner.arch import ModelArch
from planner.cluster import Workload
from planner.layers import Layer, OpStats


def test_matmul_work_is_2mkn_flops_and_operand_bytes():
    w = matmul_work(m=8, k=16, n=32, dtype_bytes=2, batch=3)
    assert w.flops == 2 * 3 * 8 * 16 * 32
    assert w.bytes_read == 3 * (8 * 16 + 16 * 32) * 2
    assert w.bytes_written == 3 * 8 * 32 * 2


def test_attention_work_counts_qk_and_pv_and_gqa_kv_reads():
    # batch 2, 8 query heads, 2 kv heads, L=4 queries, S=16 keys, E=64
    w = attention_work(2, 8, 4, 16, 64, dtype_bytes=2, kv_heads=2)
    assert w.flops == 2 * (2 * 8 * 4 * 16 * 64) * 2  # QK^T + PV
    assert w.bytes_read == 2 * (8 * 4 + 2 * 2 * 16) * 64 * 2
    assert w.bytes_written == 2 * 8 * 4 * 64 * 2


def test_elementwise_and_norm_work():
    assert elementwise_work(1000, inputs=2, dtype_bytes=4) == OpWork(1, 1000, 8000, 4000)
    assert norm_work(rows=10, width=64, dtype_bytes=2) == OpWork(1, 5 * 640, (640 + 128) * 2, 1280)


def test_op_time_is_max_of_compute_and_memory_plus_overhead():
    eff = ClassEfficiency(compute=0.5, memory=0.8, overhead_s=1e-6)
    compute_bound = OpWork(2, flops=1e12, bytes_read=1e6, bytes_written=0)
    assert op_time(compute_bound, eff, peak_flops=1e15, bandwidth=1e12) == pytest.approx(2e-6 + 2e-3)
    memory_bound = OpWork(1, flops=1e6, bytes_read=8e9, bytes_written=0)
    assert op_time(memory_bound, eff, peak_flops=1e15, bandwidth=1e12) == pytest.approx(1e-6 + 1e-2)


ARCH = ModelArch("llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 ffn_hidden_size=128, vocab_size=100)


def _block(tokens: int = 32) -> Layer:
    stats = {
        "matmul": OpStats(7, 1_000_000, 200_000 + tokens * 1000, tokens * 500),
        "attention": OpStats(1, 80_000, 30_000, 10_000),
        "elementwise": OpStats(10, 50_000, 200_000, 100_000),
        "norm": OpStats(2, 20_000, 16_000, 16_000),
        "view": OpStats(20, 0, 0, 0),
    }
    return Layer(1, "model.layers.0", "block", (), 200_000, 1_150_000, 0, 40_000, 8_192, stats)


def test_tp_work_is_the_analysed_share_of_each_class():
    from cost_models.sharded import ShardedLayer

    work = Workload(batch_size=2, seq_len=16, dtype="float32")
    one = layer_work(_block(), ARCH, 1, work, 2)
    shares = ShardedLayer(4, (), 0, {"matmul": (0.25, 0.3), "attention": (0.25, 0.25)},
                          weight_fraction=0.25)
    four = layer_work(_block(), ARCH, 4, work, 2, sharded=shares)
    assert four["matmul"].flops == one["matmul"].flops / 4
    weights, acts = 200_000, 32 * 1000  # _block(): param bytes, activations read
    assert four["matmul"].bytes_read == pytest.approx(weights * 0.25 + acts * 0.3)
    assert four["attention"].flops == one["attention"].flops / 4
    assert four["norm"] == one["norm"]  # no share given: run whole on every rank
    assert four["view"].count == one["view"].count
    with pytest.raises(ValueError, match="sharding analysis"):
        layer_work(_block(), ARCH, 4, work, 2)


def test_prefill_scaling_keeps_weights_and_scales_tokens_and_attention_quadratically():
    traced = TracedShape(batch_size=2, seq_len=16, dtype_bytes=4)
    work = Workload(batch_size=4, seq_len=32, dtype="float32")
    w = layer_work(_block(), ARCH, 1, work, 4, traced)
    r = (4 * 32) / (2 * 16)
    assert w["matmul"].flops == 1_000_000 * r
    weights = 200_000  # param_bytes: read once whatever the batch
    assert w["matmul"].bytes_read == pytest.approx(weights + 32 * 1000 * r)
    assert w["attention"].flops == pytest.approx(80_000 * (4 * 32 * 32) / (2 * 16 * 16))


def test_decode_attention_reads_the_kv_cache_of_the_context():
    work = Workload(batch_size=8, seq_len=128, dtype="bfloat16", phase="decode", context_len=1000)
    w = layer_work(_block(), ARCH, 1, work, 8, TracedShape(2, 16, 4))
    kv_read = 8 * 1001 * 2 * 2 * 16 * 2  # batch x (context + new) x K,V x kv_heads x dim x bytes
    assert w["attention"].bytes_read == 8 * 4 * 1 * 16 * 2 + kv_read
    assert w["attention"].flops == 4 * 8 * 4 * 1 * 1001 * 16


def test_fit_recovers_known_efficiencies_and_overhead():
    peak, bw = 1e11, 1e10
    true = ClassEfficiency(0.5, 0.8, 20e-6)
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(40):
        w = OpWork(1, float(10 ** rng.uniform(4, 9)), float(10 ** rng.uniform(3, 8)), 0)
        samples.append(OpSample("matmul", w.flops, w.bytes, op_time(w, true, peak, bw)))
    fitted = fit_efficiencies(samples, peak, bw).for_class("matmul")
    assert fitted.compute == pytest.approx(0.5, rel=0.05)
    assert fitted.memory == pytest.approx(0.8, rel=0.05)
    assert fitted.overhead_s == pytest.approx(20e-6, rel=0.1)


def test_uncalibrated_gpu_uses_catalogue_peaks_and_launch_overhead(tmp_path):
    eff = efficiencies_for(lookup("H100"), cache=tmp_path)
    assert eff.source == "default"
    assert eff.peak_flops["bfloat16"] == 989e12
    assert eff.for_class("matmul").overhead_s == lookup("H100").launch_overhead_s
    assert eff.for_class("view").overhead_s == 0.0


def _two_class_efficiencies(layer_scale: float = 1.0):
    classes = {c: ClassEfficiency(1.0, 1.0, 0.0) for c in ("matmul", "norm", "other")}
    return Efficiencies("cpu", {"float32": 1e9}, 1e9, classes, "calibrated",
                        layer_scale=layer_scale)


def test_class_scales_recover_how_much_slower_a_class_runs_inside_a_layer():
    eff = _two_class_efficiencies()
    rng = np.random.default_rng(1)
    layers = []
    for _ in range(30):  # node-fitted times t_matmul, t_norm; inside a layer norm takes 2x
        work = {"matmul": OpWork(1, float(rng.uniform(1e5, 1e6)), 0, 0),
                "norm": OpWork(1, float(rng.uniform(1e5, 1e6)), 0, 0)}
        t = work["matmul"].flops / 1e9 + 2.0 * work["norm"].flops / 1e9
        layers.append((work, t))
    k = fit_class_scales(layers, eff, shrink=1e-6)
    assert k["matmul"] == pytest.approx(1.0, rel=1e-3)
    assert k["norm"] == pytest.approx(2.0, rel=1e-3)
    scaled = replace(eff, class_scales=k)
    assert all(work_time(w, scaled, "float32") == pytest.approx(t, rel=1e-3) for w, t in layers)
    # A class no calibration layer has keeps the global scale.
    assert scaled.scale_for("other") == eff.layer_scale
    # Strong shrinkage pulls every class back toward the global scale.
    k_shrunk = fit_class_scales(layers, eff, shrink=1e6)
    assert k_shrunk["norm"] == pytest.approx(1.0, abs=1e-3)


def test_class_scales_round_trip_through_the_stored_record():
    eff = replace(_two_class_efficiencies(0.9), class_scales={"matmul": 0.8, "norm": 1.3})
    again = Efficiencies.from_dict(eff.to_dict())
    assert again == eff
    w = {"matmul": OpWork(1, 1e6, 0, 0), "norm": OpWork(1, 1e6, 0, 0), "other": OpWork(1, 1e6, 0, 0)}
    assert work_time(w, again, "float32") == pytest.approx((0.8 + 1.3 + 0.9) * 1e6 / 1e9)


def test_matmul_work_carries_the_gemm_rows_of_the_step():
    """``layer_work`` records how many rows the layer's GEMMs have: the tokens of a
    prefill microbatch, the sequences of a decode step."""
    prefill = layer_work(_block(), ARCH, 1, Workload(batch_size=2, seq_len=16, dtype="float32"), 2)
    assert prefill["matmul"].rows == 32
    decode = Workload(batch_size=3, seq_len=16, dtype="float32", phase="decode", context_len=64)
    assert layer_work(_block(), ARCH, 1, decode, 3, TracedShape(2, 16, 4))["matmul"].rows == 3
    assert prefill["elementwise"].rows == 0  # only the matmul class has GEMM rows


def test_few_row_gemms_are_priced_by_the_measured_factor_interpolated_in_log_rows():
    eff = replace(_two_class_efficiencies(1.0), matmul_rows={1: 0.5, 2: 1.2, 4: 1.4, 8: 1.1})
    assert eff.rows_factor(1) == 0.5
    assert eff.rows_factor(4) == 1.4
    assert eff.rows_factor(3) == pytest.approx(1.2 + (1.4 - 1.2) * np.log(3 / 2) / np.log(2))
    assert eff.rows_factor(12) == pytest.approx(1.1 + (1.0 - 1.1) * np.log(12 / 8) / np.log(2))
    assert [eff.rows_factor(r) for r in (0, 16, 17, 4096)] == [1.0] * 4  # unknown, fit's range
    assert _two_class_efficiencies(1.0).rows_factor(1) == 1.0  # nothing measured
    w = {"matmul": OpWork(1, 1e6, 0, 0, rows=1), "norm": OpWork(1, 1e6, 0, 0, rows=1)}
    # only the matmul class is scaled: 0.5 x its 1 ms, the norm's 1 ms as it was
    assert work_time(w, eff, "float32") == pytest.approx(0.5e-3 + 1e-3)
    assert Efficiencies.from_dict(eff.to_dict()) == eff
    # a tensor-parallel group's ranks share the host: the factors measured that way
    both = replace(eff, matmul_rows_shared={1: 0.9, 8: 1.3})
    assert both.rows_factor(1, shared=True) == 0.9 and both.rows_factor(1) == 0.5
    assert work_time(w, both, "float32", shared=True) == pytest.approx(0.9e-3 + 1e-3)
    assert eff.rows_factor(1, shared=True) == 0.5  # nothing measured shared: the lone factors
    assert Efficiencies.from_dict(both.to_dict()) == both


def test_measured_row_factors_are_measured_over_fitted_time_of_each_row_count():
    """A real (small) measurement: one factor per row count, each the measured time of
    that GEMM over what the fit says; with a fit that makes every GEMM free but its
    overhead, the factor is the measured seconds over that overhead."""
    from cost_models.roofline import measure_matmul_rows

    eff = Efficiencies("cpu", {"float32": 1e30}, 1e30,
                       {"matmul": ClassEfficiency(1.0, 1.0, 1e-7), "other": ClassEfficiency(1, 1, 0)},
                       "calibrated")
    factors = measure_matmul_rows(eff, rows=(1, 8), shapes=((64, 64),), stream_bytes=2**20,
                                  repeats=3)
    assert sorted(factors) == [1, 8]
    shared = measure_matmul_rows(eff, rows=(1,), shapes=((64, 64),), stream_bytes=2**20,
                                 repeats=3, others=1)  # one more process streams meanwhile
    assert list(shared) == [1] and shared[1] > 1.0
    # an 8-row GEMM does 8x the FLOPs of a 1-row one on the same weights: never faster
    # than a tenth of it, and a 64x64 float32 GEMM takes well over the 0.1 us the fit says
    assert all(f > 1.0 for f in factors.values())
    assert factors[8] > 0.1 * factors[1]

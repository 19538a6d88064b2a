from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cost_models.profiler as profiler
from cost_models.profiler import layer_signatures, profile_model


def _profile(traced, ids, cache, **kw):
    return profile_model(traced, args=(ids,), cache=cache, warmup=1, repeats=3, node_repeats=1,
                         min_time_s=0, **kw)


def test_profile_measures_every_layer_and_reports_progress(tiny_gpt, tmp_path):
    _, traced, ids = tiny_gpt
    calls = []
    prof = _profile(traced, ids, tmp_path, progress=lambda *a: calls.append(a))
    assert [p.name for p in prof.layers] == [layer.name for layer in traced.layers]
    assert all(p.median_s > 0 and p.p10_s <= p.median_s <= p.p90_s for p in prof.layers)
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == len(traced.layers)
    assert {c[1] for c in calls} == {len(traced.layers)}
    # Layer time is the best round: never above the median of all calls.
    assert all(0 < p.best_s <= p.median_s and p.time_s == p.best_s for p in prof.layers)
    # The two identical blocks share one signature and one measurement.
    sigs = layer_signatures(traced)
    assert sigs[1] == sigs[2] and sigs[0] != sigs[1]
    # Allocator-measured peak of a block equals the graph's live-tensor peak here.
    assert prof.layers[1].peak_alloc_bytes == traced.layers[1].peak_activation_bytes


def test_second_run_is_a_cache_hit_without_measuring(tiny_gpt, tmp_path, monkeypatch):
    _, traced, ids = tiny_gpt
    first = _profile(traced, ids, tmp_path)

    def no_measuring(*a, **k):
        raise AssertionError("a cached profile must not run the model")

    monkeypatch.setattr(profiler, "_measure", no_measuring)
    second = _profile(traced, ids, tmp_path)
    assert second.cache_hits == len(traced.layers)
    assert [p.median_s for p in second.layers] == [p.median_s for p in first.layers]


def test_cache_is_invalidated_by_a_new_signature_or_device(tiny_gpt, tmp_path, monkeypatch):
    model, traced, ids = tiny_gpt
    from planner.tracing import trace

    _profile(traced, ids, tmp_path)
    longer = torch.randint(0, 64, (1, 12))
    other = _profile(trace(model, args=(longer,)), longer, tmp_path)
    assert other.cache_hits == 1  # only the second identical block reuses the first's run
    again = _profile(traced, ids, tmp_path, threads=2)  # another device fingerprint
    assert again.cache_hits == 1
    real = profiler.device_fingerprint
    monkeypatch.setattr(profiler, "device_fingerprint",
                        lambda *a, **k: {**real(*a, **k), "cpu": "another CPU"})
    assert _profile(traced, ids, tmp_path).cache_hits == 1


def test_corrupted_cache_file_is_ignored_with_a_warning_and_rebuilt(tiny_gpt, tmp_path):
    _, traced, ids = tiny_gpt
    _profile(traced, ids, tmp_path)
    files = sorted((tmp_path / "profile").rglob("*.json"))
    assert len(files) == 3  # pre, one shared block, post
    files[0].write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt cache file"):
        prof = _profile(traced, ids, tmp_path)
    assert prof.cache_hits == len(traced.layers) - 1
    assert json.loads(files[0].read_text())["schema"] == profiler._SCHEMA


def test_best_round_is_the_lowest_median_of_consecutive_calls():
    times = np.array([5, 5, 9, 9, 9, 1, 9, 1, 9, 1, 3, 3, 3, 8, 8], dtype=float)
    # rounds of 5: medians 9, 1, 3 -> 1 (a round with three fast calls), never a lone fast call
    assert profiler.best_round(times) == 1.0
    assert profiler.best_round(np.array([4.0, 2.0, 6.0])) == 4.0  # fewer than one round


def test_models_profiled_together_interleave_their_rounds(tiny_gpt, tmp_path, monkeypatch):
    model, traced, ids = tiny_gpt
    from planner.tracing import trace

    longer = torch.randint(0, 64, (2, 12))
    other = trace(model, args=(longer,))
    order = []
    real = profiler._layer_module

    def tagged(gm, nodes):  # record which model's layer each timed call belongs to
        module, inputs = real(gm, nodes)
        tag = "short" if gm is traced.graph_module else "long"
        forward = module.forward
        module.forward = lambda *a: (order.append(tag), forward(*a))[1]
        return module, inputs

    monkeypatch.setattr(profiler, "_layer_module", tagged)
    short, long_ = profiler.profile_models([(traced, (ids,), {}), (other, (longer,), {})],
                                           cache=tmp_path, warmup=0, repeats=15, node_repeats=1,
                                           min_time_s=0)  # fmt: skip
    assert [len(p.layers) for p in (short, long_)] == [len(traced.layers), len(other.layers)]
    assert all(p.repeats == 15 for p in short.layers + long_.layers)
    switches = sum(a != b for a, b in zip(order, order[1:]))
    # 3 rounds of short then long: 5 switches, then one peak-memory call per layer (short,
    # long): 2 more. Timing one model after the other would switch 3 times in all.
    assert switches == 7


def test_min_time_adds_rounds_until_the_measurement_has_lasted_that_long(tiny_gpt, tmp_path):
    _, traced, ids = tiny_gpt
    quick = _profile(traced, ids, tmp_path / "a")
    slow = profile_model(traced, args=(ids,), cache=tmp_path / "b", warmup=1, repeats=3,
                         node_repeats=1, min_time_s=0.3)  # fmt: skip
    assert all(p.repeats == profiler.ROUND_CALLS for p in quick.layers)
    block = slow.layers[1]
    assert block.repeats > profiler.ROUND_CALLS
    assert block.repeats % profiler.ROUND_CALLS == 0


def test_train_profile_times_forward_and_backward_under_its_own_cache_key(tiny_gpt, tmp_path,
                                                                          monkeypatch):
    _, traced, ids = tiny_gpt
    grads_before = [(p.requires_grad, p.grad) for p in traced.graph_module.parameters()]
    prof = profile_model(traced, args=(ids,), cache=tmp_path / "a", warmup=2, repeats=20,
                         node_repeats=1, min_time_s=0, train=True)
    for p in prof.layers:
        assert 0 < p.train.best_s <= p.train.median_s and p.train.time_s == p.train.best_s
        assert p.train.repeats == 20
    block = prof.layers[1]  # forward and forward + backward timed in the same rounds
    backward = block.train.time_s - block.time_s
    assert 0.5 <= backward / block.time_s <= 8  # ~2x the forward's FLOPs, plus autograd
    # Gradients are taken, not accumulated, and the parameters are left as they were.
    assert [(p.requires_grad, p.grad) for p in traced.graph_module.parameters()] == grads_before

    # An inference profile written before stays valid: its records are read, the backward
    # is measured and stored under a key of its own.
    inference = _profile(traced, ids, tmp_path / "b")
    assert all(p.train is None for p in inference.layers)
    trained = _profile(traced, ids, tmp_path / "b", train=True)
    assert [p.time_s for p in trained.layers] == [p.time_s for p in inference.layers]
    assert len({f.parent for f in (tmp_path / "b" / "profile").rglob("*.json")}) == 2

    def no_measuring(*a, **k):
        raise AssertionError("a cached training profile must not run the model")

    monkeypatch.setattr(profiler, "_measure", no_measuring)
    again = _profile(traced, ids, tmp_path / "b", train=True)
    assert [p.train for p in again.layers] == [p.train for p in trained.layers]
    assert _profile(traced, ids, tmp_path / "b").cache_hits == len(traced.layers)

"""The infeasibility diagnosis: every "smallest change" it suggests fits, one step less does not.

Each suggestion is checked against the CP-SAT search itself (``solve`` without diagnosis):
the suggested memory, device count, batch size or KV context gives a plan, and the next
smaller value (0.01 GiB less, one node or node device fewer, one sample or token more)
does not.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cluster import Cluster, Workload
from planner.cost_table import CostTable, LayerCost, Link
from planner.solver import InfeasiblePlanError, PlanError, _batch_pins, solve
from tests.planner.test_solver import instances

GiB = 2**30


def _fits(build, cluster, work, pins=None) -> bool:
    try:
        solve(build, cluster, work, pins=pins, diagnose=False)
    except InfeasiblePlanError:
        return False
    except PlanError as e:  # pins or degrees the changed request cannot take: no plan
        assert any(k in str(e) for k in ("contradict", "not allowed", "no tp degree")), e
        return False
    return True


def _with_memory(cluster: Cluster, gib: float) -> Cluster:
    return replace(cluster, memory_bytes=int(gib * GiB))


def check_suggestions(build, cluster, work, suggestions, rebuild=None, pins=None) -> int:
    """Assert that each suggestion fits and one step less does not; returns how many."""
    checked = 0
    for text in suggestions:
        if m := re.fullmatch(r"per-device memory >= ([\d.]+) GiB \(peak ([\d.]+) GiB.*\)", text):
            gib = float(m.group(1))
            assert _fits(build, replace(cluster, memory_bytes=math.ceil(gib * GiB)), work, pins)
            assert not _fits(build, replace(cluster, memory_bytes=math.floor((gib - 0.01) * GiB)),
                             work, pins), text
        elif m := re.fullmatch(r">= (\d+) devices \((\d+) node\(s\) × (\d+)\)", text):
            nodes, per_node = int(m.group(2)), int(m.group(3))
            assert int(m.group(1)) == nodes * per_node
            assert _fits(build, replace(cluster, nodes=nodes, devices_per_node=per_node), work,
                         pins), text
            if per_node != cluster.devices_per_node:  # grown inside the node
                assert nodes == cluster.nodes and per_node > cluster.devices_per_node
                fewer = replace(cluster, devices_per_node=per_node - 1)
            else:
                assert nodes > cluster.nodes
                fewer = replace(cluster, nodes=nodes - 1)
            assert not _fits(build, fewer, work, pins), text
        elif m := re.fullmatch(r"batch size <= (\d+)( \(without the .* pin\))?", text):
            batch = int(m.group(1))
            assert batch < work.batch_size
            assert bool(m.group(2)) == (_batch_pins(pins or {}, batch) != (pins or {}))
            assert _fits(build, cluster, replace(work, batch_size=batch),
                         _batch_pins(pins or {}, batch))
            assert not _fits(build, cluster, replace(work, batch_size=batch + 1),
                             _batch_pins(pins or {}, batch + 1)), text
        elif m := re.fullmatch(r"KV context <= (\d+) tokens", text):
            context = int(m.group(1))
            assert context < work.kv_context_len
            w = replace(work, context_len=context)
            assert _fits(rebuild(w), cluster, w, pins)
            w = replace(work, context_len=context + 1)
            assert not _fits(rebuild(w), cluster, w, pins), text
        elif m := re.fullmatch(r"dtype (\w+) instead of (\w+)", text):
            w = replace(work, dtype=m.group(1))
            assert _fits(rebuild(w), cluster, w, pins)
        else:
            raise AssertionError(f"unexpected suggestion {text!r}")
        checked += 1
    return checked


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_every_suggestion_fits_and_one_step_less_does_not(case):
    build, cluster, work = case
    try:
        solve(build, cluster, work)
    except InfeasiblePlanError as e:
        check_suggestions(build, cluster, work, e.suggestions)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.data())
def test_suggestions_with_pins_fit_and_one_step_less_does_not(case, data):
    build, cluster, work = case
    pins = data.draw(st.fixed_dictionaries({}, optional={
        "pp": st.integers(1, 4), "tp": st.sampled_from([1, 2, 4]), "dp": st.sampled_from([1, 2]),
        "microbatches": st.sampled_from([1, 2])}))
    try:
        solve(build, cluster, work, pins=pins)
    except InfeasiblePlanError as e:
        check_suggestions(build, cluster, work, e.suggestions, pins=pins)
    except PlanError:  # the pins contradict the request itself: nothing to diagnose
        pass


def _decode_builder(layers: int, weights_gib: float, kv_gib_per_token_sample: float):
    """A decode chain whose KV cache grows with the context (``rebuild`` takes a workload)."""
    def rebuild(work: Workload):
        def build(mbs: int, m: int) -> CostTable:
            kv = kv_gib_per_token_sample * work.kv_context_len * mbs * m
            row = {t: LayerCost(1e-4 * mbs / t, 1e-5 * (t > 1), int((weights_gib + kv) * GiB / t))
                   for t in (1, 2, 4)}
            return CostTable((row,) * layers, (4096 * mbs,) * (layers - 1), Link(1e-6, 1e11),
                             Link(1e-5, 1e10), mbs, m, stage_workspace_bytes={1: GiB, 2: GiB,
                                                                              4: GiB})
        return build
    return rebuild


def test_decode_with_a_huge_context_suggests_exact_changes():
    rebuild = _decode_builder(layers=6, weights_gib=2.0, kv_gib_per_token_sample=1e-4)
    cluster = Cluster(1, 4, "H100", memory_bytes=16 * GiB)
    work = Workload(batch_size=16, phase="decode", seq_len=1, context_len=100_000,
                    objective="throughput", memory_headroom=0.1)
    with pytest.raises(InfeasiblePlanError) as err:
        solve(rebuild(work), cluster, work, rebuild=rebuild)
    # even one sequence's cache (6 layers x 10 GiB) does not fit 4 devices: no batch change
    # helps, and H100 nodes hold at most 8 devices, which do not fit either
    assert [s.split(" ")[0] for s in err.value.suggestions] == ["per-device", ">=", "KV"]
    assert check_suggestions(rebuild(work), cluster, work, err.value.suggestions,
                             rebuild=rebuild) == 3
    # dp 8 (2 sequences each), 3 stages of 2 layers at tp 4: (2 + 20) / 4 x 2 + 1 = 12 GiB
    assert ">= 96 devices (24 node(s) × 4)" in err.value.suggestions
    # hand-computed: 4 devices hold 6 layers x (2 GiB + 1e-4 GiB x 16 x context) / tp
    # within 14.4 GiB usable: tp 4 holds them all plus the 1 GiB workspace when
    # 6 x (2 + 0.0016 c) / 4 + 1 <= 14.4, i.e. c <= 4333.
    assert "KV context <= 4333 tokens" in err.value.suggestions


def test_a_cluster_near_the_largest_planned_gets_the_diagnosis_not_a_cluster_error():
    # The node search may grow the cluster only up to MAX_DEVICES (131072); past 2048
    # devices a fixed 64x would build a cluster the planner refuses to describe.
    rebuild = _decode_builder(layers=6, weights_gib=2.0, kv_gib_per_token_sample=1e-4)
    cluster = Cluster(257, 8, "H100", memory_bytes=GiB)
    work = Workload(batch_size=16, phase="decode", seq_len=1, context_len=1000)
    with pytest.raises(InfeasiblePlanError) as err:
        solve(rebuild(work), cluster, work, rebuild=rebuild)
    assert err.value.suggestions and err.value.suggestions[0].startswith("per-device memory")
    # the 1 GiB workspace alone fills a device: more devices never help
    assert not any("node(s)" in s for s in err.value.suggestions)


def test_pinned_request_suggestions_respect_the_pins():
    rebuild = _decode_builder(layers=8, weights_gib=6.0, kv_gib_per_token_sample=1e-4)
    cluster = Cluster(1, 4, "H100", memory_bytes=20 * GiB)
    work = Workload(batch_size=8, phase="decode", seq_len=1, context_len=20_000,
                    memory_headroom=0.0)
    pins = {"pp": 2, "tp": 2}
    with pytest.raises(InfeasiblePlanError) as err:
        solve(rebuild(work), cluster, work, pins=pins, rebuild=rebuild)
    assert check_suggestions(rebuild(work), cluster, work, err.value.suggestions,
                             rebuild=rebuild, pins=pins) >= 3


def test_a_real_model_refusal_is_exact():
    import torch

    from planner.cost_builder import CostBuilder
    from planner.models import load_model
    from planner.tracing import trace

    lm = load_model("llama-tiny", batch_size=4, seq_len=1, dtype=torch.bfloat16, device="meta")
    traced = trace(lm.model, lm.args, lm.kwargs, name="llama-tiny")
    cluster = Cluster(1, 2, "H100", memory_bytes=64 * 2**20)
    work = Workload(batch_size=64, seq_len=1, phase="decode", context_len=4096,
                    objective="throughput")

    def rebuild(w):
        return CostBuilder(traced, cluster, w)

    with pytest.raises(InfeasiblePlanError) as err:
        solve(rebuild(work), cluster, work, rebuild=rebuild)
    assert len(err.value.suggestions) >= 3
    assert check_suggestions(rebuild(work), cluster, work, err.value.suggestions,
                             rebuild=rebuild) == len(err.value.suggestions)


def test_the_diagnosis_stops_at_the_deadline_and_says_what_it_skipped():
    from planner.solver import _build_space, _diagnose

    build = _decode_builder(layers=4, weights_gib=30.0, kv_gib_per_token_sample=0.0)(
        Workload(batch_size=2))
    cluster = Cluster(1, 2, "H100", memory_bytes=40 * GiB)
    work = Workload(batch_size=2, memory_headroom=0.0)
    space, pins = _build_space(build, cluster, work, None, None, None)
    message, suggestions = _diagnose(space, build, cluster, work, pins, None, None, True,
                                     deadline=0.0, time_limit_s=0.5)
    assert suggestions == []
    assert message.endswith("(stopped at the 0.5 s time limit before trying: per-device memory, "
                            "devices, batch size).")
    # with time left, the same request gets its changes
    with pytest.raises(InfeasiblePlanError) as err:
        solve(build, cluster, work)
    assert err.value.suggestions[0].startswith("per-device memory >= ")


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_the_diagnosis_memory_table_is_the_solvers_memory(phase):
    """The diagnosis reads ``memory_table``; it must charge what the solver's table does."""
    import torch

    from planner.cost_builder import CostBuilder
    from planner.models import load_model
    from planner.tracing import trace

    lm = load_model("llama-tiny", batch_size=4, seq_len=16, dtype=torch.bfloat16, device="meta")
    traced = trace(lm.model, lm.args, lm.kwargs, name="llama-tiny")
    work = Workload(batch_size=4, seq_len=16, phase=phase, context_len=256)
    builder = CostBuilder(traced, Cluster(1, 4, "H100"), work)
    for mbs, m in [(1, 4), (2, 2), (4, 1)]:
        full, memory = builder(mbs, m), builder.memory_table(mbs, m)
        assert [{t: c.memory_bytes for t, c in row.items()} for row in memory.costs] == \
            [{t: c.memory_bytes for t, c in row.items()} for row in full.costs]
        assert memory.stage_workspace_bytes == full.stage_workspace_bytes

"""The training step's formulas (cost_models/training.py): states per ZeRO level,
microbatches in flight per schedule, a layer's step, saved activations, the dp tail."""

from __future__ import annotations

import pytest

from cost_models import training as tm
from cost_models.devices import lookup
from cost_models.layer_cost import comm_time
from cost_models.roofline import efficiencies_for


@pytest.mark.parametrize("dtype, per_param", [("bfloat16", (2, 2, 12)), ("float16", (2, 2, 12)),
                                              ("float32", (4, 4, 8))])
def test_adamw_states_per_parameter_under_mixed_and_full_precision(dtype, per_param):
    assert tm.state_bytes_per_param(dtype) == per_param


@pytest.mark.parametrize("zero, expected", [(0, 16 * 1000), (1, 4 * 1000 + 12 * 250),
                                            (2, 2 * 1000 + 14 * 250), (3, 16 * 250)])
def test_zero_levels_shard_states_then_gradients_then_parameters_over_dp(zero, expected):
    assert tm.model_state_bytes(1000, "bfloat16", zero, dp=4) == expected


def test_in_flight_gpipe_holds_every_microbatch_1f1b_pp_minus_stage():
    assert [tm.in_flight("gpipe", i, 4, 6) for i in range(4)] == [6, 6, 6, 6]
    assert [tm.in_flight("1f1b", i, 4, 6) for i in range(4)] == [4, 3, 2, 1]
    assert [tm.in_flight("1f1b", i, 4, 2) for i in range(4)] == [2, 2, 2, 1]


def test_layer_step_is_forward_plus_twice_its_kernels_plus_conjugate_collectives():
    c, k, a, g = 1.0, 0.25, 0.1, 0.05
    assert tm.layer_step_s(c, k, "none") == pytest.approx(3 * c + 2 * k)
    assert tm.layer_step_s(c, k, "selective", attention_s=a) == pytest.approx(3 * c + 2 * k + a)
    assert tm.layer_step_s(c, k, "full", attention_s=a) == pytest.approx(4 * c + 3 * k)
    assert tm.layer_step_s(c, k, "none", zero3_gather_s=g) == pytest.approx(3 * c + 2 * k + 2 * g)


def test_recompute_keeps_less_for_backward():
    assert tm.saved_activation_bytes(1000, 100, 300, "none") == 1000
    assert tm.saved_activation_bytes(1000, 100, 300, "selective") == 700
    assert tm.saved_activation_bytes(1000, 100, 300, "full") == 100


def test_dp_collectives_per_zero_level():
    assert tm.dp_collectives(64, "bfloat16", 0) == [("all_reduce", 64)]
    assert tm.dp_collectives(64, "bfloat16", 1) == [("all_reduce", 64), ("all_gather", 64)]
    assert tm.dp_collectives(64, "bfloat16", 2) == [("reduce_scatter", 64), ("all_gather", 64)]
    assert tm.dp_collectives(64, "bfloat16", 3) == [("reduce_scatter", 64)]


def test_stage_tail_is_the_collectives_priced_by_comm_time_plus_the_update():
    spec = lookup("H100")
    eff = efficiencies_for(spec)
    nbytes = 2 * 10**9  # 1e9 bf16 parameters
    tail = tm.stage_tail_s(nbytes, "bfloat16", 2, 8, spec, eff, link="inter")
    sync = (comm_time("reduce_scatter", nbytes, 8, spec, link="inter")
            + comm_time("all_gather", nbytes, 8, spec, link="inter"))
    update = tm.optimizer_s(125_000_000, "bfloat16", eff)
    assert tail == pytest.approx(sync + update)
    # the update reads grad + master/m/v and writes master/m/v + the bf16 copy: 28 B/param
    assert update >= 125_000_000 * 28 / spec.memory_bandwidth
    assert tm.stage_tail_s(nbytes, "bfloat16", 0, 1, spec, eff, link="intra") == \
        pytest.approx(tm.optimizer_s(10**9, "bfloat16", eff))


def test_pipeline_step_uniform_stages_is_m_plus_pp_minus_one_slots_plus_the_tail():
    assert tm.pipeline_step_s([2.0] * 4, [0.0] * 3, [0.5, 0.7, 0.1, 0.2], 8) == \
        pytest.approx((8 + 4 - 1) * 2.0 + 0.7)


def test_interleaved_step_is_the_flow_shop_at_one_chunk_and_megatrons_bubble_when_uniform():
    """v = 1 is the 1F1B flow shop; uniform groups of t give Megatron-LM's m t + (pp - 1) t / v
    (Narayanan et al. 2021, eq. for the interleaved bubble)."""
    e, hops, tails = [3.0, 5.0, 4.0], [0.5, 0.25], [1.0, 2.0, 1.5]
    assert tm.interleaved_step_s(e, hops, tails, 6, 1) == \
        pytest.approx(tm.pipeline_step_s(e, hops, tails, 6))
    for pp, m, v, t in [(4, 8, 2, 1.5), (8, 16, 4, 0.25), (2, 3, 3, 2.0)]:
        assert tm.interleaved_step_s([t] * pp, [], [0.0], m, v) == \
            pytest.approx(m * t + (pp - 1) * t / v)
    # the bubble shrinks with v; the steady state (m x the bottleneck) does not
    steps = [tm.interleaved_step_s(e, [], [0.0], 8, v) for v in (1, 2, 4)]
    assert steps[0] > steps[1] > steps[2] > 8 * max(e)


def test_round_bounds_split_the_layers_into_v_nearly_equal_rounds():
    assert tm.round_bounds(8, 2) == [0, 4, 8]
    assert tm.round_bounds(10, 3) == [0, 3, 6, 10]
    for n, v in [(82, 4), (34, 3), (7, 7)]:
        b = tm.round_bounds(n, v)
        sizes = [y - x for x, y in zip(b, b[1:])]
        assert b[0] == 0 and b[-1] == n and len(sizes) == v and max(sizes) - min(sizes) <= 1


def test_interleaved_holds_at_least_1f1b_microbatches_at_every_position():
    """Per chunk (rounded up) Megatron's warm-up count: never fewer than 1F1B's min(pp - i, m)
    at the same position, so interleaving trades memory for the smaller bubble."""
    for pp, m, v in [(4, 8, 2), (8, 16, 3), (2, 2, 2), (4, 4, 4)]:
        got = [tm.in_flight("interleaved", i, pp, m, v) for i in range(pp)]
        assert all(g >= tm.in_flight("1f1b", i, pp, m) for i, g in enumerate(got))
        assert got == sorted(got, reverse=True)
    assert [tm.in_flight("interleaved", i, 4, 8, 2) for i in range(4)] == [6, 5, 4, 3]

"""Training plans (planner/training.py): CP-SAT equals the exact reference on small
instances, the plan's figures are the cost model's formulas, 1F1B memory per stage
position, baselines, pins and the CLI's train flags."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import planner
from cost_models import training as tm
from planner.cost_table import CostTable, LayerCost, Link
from planner.models import GPT, GPTConfig
from planner.plan import Plan
from planner.reference_solver import solve_train_reference
from planner.solver import InfeasiblePlanError, PlanError, Restriction
from planner.training import TrainTable, solve_train, train_space
from tests.bad_input.cli_helpers import refused

RC_TIME = {"none": 1.0, "selective": 1.1, "full": 1.35}
RC_SAVED = {"none": 1.0, "selective": 0.6, "full": 0.15}


class _Forward:
    def __init__(self, owner):
        self.owner = owner

    def __call__(self, mb, m=1):
        return self.owner.table(mb, m)


class _Synthetic:
    """A ``TrainCostBuilder`` over made-up per-layer numbers (no model, no device)."""

    def __init__(self, base, params, acts, boundary, tps=(1, 2)):
        self.base, self.params, self.acts = base, params, acts
        self.tp_degrees, self.excluded_tp = tuple(tps), {}
        L = len(base)
        layers = [SimpleNamespace(flops=10**9) for _ in range(L)]
        self.forward = _Forward(self)
        self.forward.traced = SimpleNamespace(layers=layers)
        self.forward.traced_shape = SimpleNamespace(tokens=1)
        self.forward.efficiencies = SimpleNamespace(peak_flops={"bfloat16": 1e12,
                                                                "float32": 1e12})
        self.boundary = boundary

    def table(self, mb, m=1):
        costs = tuple({t: LayerCost(self.base[j] * mb / t ** 0.8, 0.0, self.params[j] // t)
                       for t in self.tp_degrees} for j in range(len(self.base)))
        return CostTable(costs, self.boundary, Link(1e-5, 1e10), Link(5e-5, 1e9), mb, m,
                         stage_workspace_bytes={t: 1000 for t in self.tp_degrees})

    def __call__(self, mb, dp, zero, link):
        fwd = self.forward(mb, 1)
        L = len(self.base)
        gather = 2e-4 if zero == 3 and dp > 1 else 0.0
        time = [{(t, rc): fwd.costs[j][t].compute_s * 3 * RC_TIME[rc] + 2 * gather
                 for t in self.tp_degrees for rc in tm.RECOMPUTE} for j in range(L)]
        comm = [{k: 0.0 for k in row} for row in time]
        state = [{t: tm.model_state_bytes(self.params[j] // t // 2, "bfloat16", zero, dp)
                  for t in self.tp_degrees} for j in range(L)]
        saved = [{(t, rc): int(self.acts[j] * mb / t * RC_SAVED[rc])
                  for t in self.tp_degrees for rc in tm.RECOMPUTE} for j in range(L)]
        params = [{t: self.params[j] // t for t in self.tp_degrees} for j in range(L)]
        scale = 2.0 if link == "inter" else 1.0
        step = {0: 2.0, 1: 2.5, 2: 2.2, 3: 1.1}[zero]

        def tail_of(nbytes):  # grows with the bytes, as the real tail does
            sync = (1e-5 + nbytes * step * scale / 1e10) if dp > 1 else 0.0
            return sync + nbytes / (dp if zero else 1) / 1e11

        return TrainTable(fwd, dp, zero, link, time, comm, state, saved, params, "bfloat16",
                          tail_of=tail_of)


def _workload(batch):
    return planner.Workload(batch_size=batch, seq_len=8, phase="train", memory_headroom=0.0)


def _layer_numbers(draw, L):
    """Made-up per-layer numbers for ``_Synthetic``: forward seconds, parameter and
    activation bytes, and the boundary bytes after each layer but the last."""
    base = [draw(st.integers(1, 20)) * 1e-3 for _ in range(L)]
    params = [draw(st.integers(1, 8)) * 10**6 for _ in range(L)]
    acts = [draw(st.integers(1, 8)) * 10**6 for _ in range(L)]
    boundary = tuple(draw(st.integers(1, 8)) * 10**6 for _ in range(L - 1))
    return base, params, acts, boundary


def _both(builder, cluster, work, pins, restriction=None, contradictions_skip=True):
    """``(reference, search)`` solutions of one request, or None when both find it
    infeasible (asserted) or, with ``contradictions_skip``, the pins contradict it."""
    try:
        ref = solve_train_reference(builder, cluster, work, pins=pins, restriction=restriction)
    except InfeasiblePlanError:
        with pytest.raises(InfeasiblePlanError):
            solve_train(builder, cluster, work, pins=pins, time_limit_s=30,
                        restriction=restriction)
        return None
    except PlanError:
        if not contradictions_skip:
            raise
        return None
    return ref, solve_train(builder, cluster, work, pins=pins, time_limit_s=30,
                            restriction=restriction)


@st.composite
def _instances(draw):
    L = draw(st.integers(2, 5))
    base, params, acts, boundary = _layer_numbers(draw, L)
    nodes = draw(st.integers(1, 2))
    per_node = draw(st.sampled_from([2, 4]))
    batch = draw(st.sampled_from([1, 2, 4]))
    total = sum(params) * 8 + sum(acts) * batch
    cap = int(total * draw(st.sampled_from([0.3, 0.45, 0.6, 2.0])))
    pins = draw(st.sampled_from([{}, {"zero": 3}, {"schedule": "gpipe"}, {"recompute": "full"},
                                 {"pp": 2}, {"dp": 1}, {"dp": 1, "tp": 1}]))
    tps = draw(st.sampled_from([(1,), (1, 2)]))
    restriction = draw(st.sampled_from([None, _FRAMEWORK]))
    return (_Synthetic(base, params, acts, boundary, tps), nodes, per_node, batch, cap, pins,
            restriction)


def _even(stages, layers=5):
    from planner.baselines import even_split

    return None if stages > layers else even_split(layers, stages)


#: A framework's rules (planner.engines builds these for torchtitan, megatron, deepspeed):
#: one tp and one recompute mode for all stages, no selective recompute, no tp with pp,
#: ZeRO 0/1 only with pp, 1F1B, and its own even split of the layers.
_FRAMEWORK = Restriction(uniform_tp=True, name="framework", uniform_recompute=True,
                         recompute=frozenset({"none", "full"}), tp_with_pp=False,
                         zero_levels=lambda dp, pp, tp: frozenset({0, 1} if pp > 1 else
                                                                  {0, 1, 2, 3}),
                         schedules=frozenset({"1f1b"}))


def _cluster(nodes, per_node, cap):
    return planner.Cluster(nodes, per_node, "H100", memory_bytes=cap)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(_instances())
def test_cp_sat_training_optimum_equals_the_reference(instance):
    builder, nodes, per_node, batch, cap, pins, restriction = instance
    cluster, work = _cluster(nodes, per_node, cap), _workload(batch)
    if restriction is not None and pins.get("schedule") == "gpipe":
        pins = {}
    if restriction is not None:
        L = len(builder.base)
        restriction = replace(restriction, split=lambda n: _even(n, L))
    # None: both infeasible, or pins the request contradicts (pp 2 on one layer's worth of
    # devices)
    both = _both(builder, cluster, work, pins, restriction)
    if both is None:
        return
    ref, got = both
    if restriction is not None:  # the framework's rules hold
        sol = got.solution
        assert len({s.tp for s in sol.stages}) == 1 and len(set(got.recompute)) == 1
        assert set(got.recompute) <= {"none", "full"}
        assert sol.pp == 1 or sol.stages[0].tp == 1
        assert got.zero in restriction.zero_levels(sol.dp, sol.pp, sol.stages[0].tp)
        assert [(s.first, s.last) for s in sol.stages] == _even(sol.pp, len(builder.base))
    assert got.solution.solver.status == "OPTIMAL"
    assert got.solution.solver.objective_ticks == ref.solution.solver.objective_ticks
    # the plan's figures: the unrounded formulas, within half a tick per summed term
    terms = 2 * len(got.solution.stages) + 2
    assert abs(got.step_s - got.solution.solver.objective) <= terms * 1e-10
    assert got.solution.predicted.peak_memory_bytes <= cap


@st.composite
def _deep_instances(draw):
    """More layers, nodes and microbatches than ``_instances``: deep pipelines whose labels
    merge by the devices' residue on the node, and memory tight enough that position
    matters (1F1B stage k holds min(pp - k, m) microbatches)."""
    L = draw(st.integers(5, 8))
    base, params, acts, boundary = _layer_numbers(draw, L)
    nodes = draw(st.integers(2, 4))
    batch = draw(st.sampled_from([4, 8]))
    total = sum(params) * 8 + sum(acts) * batch
    cap = int(total * draw(st.sampled_from([0.15, 0.25, 0.4, 2.0])))
    pins = draw(st.sampled_from([{}, {"dp": 1}, {"microbatches": 4}, {"zero": 3}]))
    return _Synthetic(base, params, acts, boundary, (1, 2)), nodes, 2, batch, cap, pins


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(_deep_instances())
def test_deep_pipelines_equal_the_reference(instance):
    builder, nodes, per_node, batch, cap, pins = instance
    cluster, work = _cluster(nodes, per_node, cap), _workload(batch)
    both = _both(builder, cluster, work, pins, contradictions_skip=False)
    if both is None:
        return
    ref, got = both
    assert got.solution.solver.status == "OPTIMAL"
    assert got.solution.solver.objective_ticks == ref.solution.solver.objective_ticks


@st.composite
def _interleaved_instances(draw):
    """Pinned interleaved 1F1B: 4..9 layers in 2 or 3 rounds, memory tight enough that the
    groups' in-flight counts matter."""
    L = draw(st.integers(4, 9))
    base, params, acts, boundary = _layer_numbers(draw, L)
    nodes = draw(st.integers(1, 2))
    batch = draw(st.sampled_from([2, 4, 8]))
    total = sum(params) * 8 + sum(acts) * batch
    cap = int(total * draw(st.sampled_from([0.2, 0.35, 2.0])))
    pins = draw(st.sampled_from([{"schedule": "interleaved"}, {"virtual_stages": 2},
                                 {"virtual_stages": 3}, {"virtual_stages": 2, "pp": 3},
                                 {"virtual_stages": 2, "dp": 1, "zero": 0}]))
    tps = draw(st.sampled_from([(1,), (1, 2)]))
    per_node = draw(st.sampled_from([2, 4]))
    return _Synthetic(base, params, acts, boundary, tps), nodes, per_node, batch, cap, pins


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(_interleaved_instances())
def test_interleaved_optimum_equals_every_pattern_enumerated(instance):
    """The interleaved search (bounds, even-split incumbent, label DP) finds the least step
    time of every periodic split the reference enumerates; the plan's stages are the
    chunks in model order on their groups' devices, its figures the formula's."""
    builder, nodes, per_node, batch, cap, pins = instance
    cluster, work = _cluster(nodes, per_node, cap), _workload(batch)
    both = _both(builder, cluster, work, pins)  # None: too few layers or devices for pp / v
    if both is None:
        return
    ref, got = both
    assert got.solution.solver.status == "OPTIMAL"
    assert got.solution.solver.objective_ticks == ref.solution.solver.objective_ticks
    assert got.schedule == "interleaved" and got.virtual_stages >= 2
    sol, v = got.solution, got.virtual_stages
    pp = sol.pp // v
    assert sol.pp == pp * v and pp >= 2
    if "virtual_stages" in pins:
        assert v == pins["virtual_stages"]
    stages = sol.stages
    assert stages[0].first == 0 and stages[-1].last == len(builder.base) - 1
    assert all(b.first == a.last + 1 for a, b in zip(stages, stages[1:]))
    for i, s in enumerate(stages):  # chunk i on group i mod pp: same devices, tp, recompute
        g = stages[i % pp]
        assert (s.devices, s.tp, got.recompute[i]) == (g.devices, g.tp, got.recompute[i % pp])
        assert s.memory_bytes == g.memory_bytes <= cap
    # the step: interleaved_step_s over the groups' times, the links and the tails
    groups = [sum(s.compute_s + s.comm_s for s in stages[i::pp]) for i in range(pp)]
    want = tm.interleaved_step_s(groups, sol.predicted.p2p_s, got.tail_s, sol.microbatches, v)
    assert got.step_s == pytest.approx(want, rel=1e-12)
    # ticks: each layer and link rounded by half a tick, the bottleneck counted ~m times
    rounding = (sol.microbatches + 1) * (len(builder.base) + 2 * pp + 2) * 0.5e-10
    assert abs(got.step_s - sol.solver.objective) <= rounding


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(_deep_instances(), st.integers(1, 6))
def test_position_bottleneck_is_the_least_largest_stage_by_enumeration(instance, pp):
    """``_Positions.least`` (exact with ``within=0``) and ``_Positions.sums`` against every
    split of the layers into ``pp`` stages, each at any (tp, recompute) whose memory at its
    position's in-flight count fits, on at most ``S_max`` devices (no placement, as they
    relax)."""
    from planner.training import _Positions

    builder, nodes, per_node, batch, cap, _ = instance
    space = train_space(builder, _cluster(nodes, per_node, cap), _workload(batch), None)
    combo = space.combos[len(space.combos) // 2]
    L, best, least_sum = combo.num_layers, None, None
    # _Positions.sums: the least sum of (time + price * tp) with every stage <= limit
    limit = max(max(c.values()) for c in combo.ticks) * 2
    price = 10**6
    for cuts in itertools.combinations(range(1, L), pp - 1):
        bounds = (0, *cuts, L)
        options = []
        for k in range(pp):
            a, b = bounds[k], bounds[k + 1] - 1
            flight = combo.in_flight(k, pp)
            options.append([
                (t, sum(combo.ticks[j][(t, rc)] for j in range(a, b + 1)))
                for t in combo.tps for rc in combo.rcs
                if combo.table.forward.workspace(t) + sum(
                    combo.table.state[j][t] + flight * combo.table.saved[j][(t, rc)]
                    for j in range(a, b + 1)) <= combo.cap])
        for choice in itertools.product(*options):
            worst = max(v for _, v in choice)
            if sum(t for t, _ in choice) <= combo.s_max:
                best = worst if best is None else min(best, worst)
            if worst <= limit:  # sums: no device limit, priced instead
                priced = sum(v + price * t for t, v in choice)
                least_sum = priced if least_sum is None else min(least_sum, priced)
    positions = _Positions(combo)
    assert positions.least(pp, within=0.0) == best
    if pp <= len(positions.sums(limit, price)) - 1:
        got = positions.sums(limit, price)[pp][0]
        assert got == least_sum if least_sum is not None else got >= positions.BIG


def test_1f1b_stage_memory_depends_on_its_position_and_gpipe_holds_every_microbatch():
    builder = _Synthetic([1e-3] * 4, [10**6] * 4, [4 * 10**6] * 4, (10**6,) * 3)
    cluster, work = _cluster(1, 4, 10**10), _workload(4)
    pins = {"dp": 1, "pp": 4, "tp": 1, "microbatches": 4, "recompute": "none"}
    one = solve_train(builder, cluster, work, pins={**pins, "schedule": "1f1b"})
    gp = solve_train(builder, cluster, work, pins={**pins, "schedule": "gpipe"})
    assert one.in_flight == (4, 3, 2, 1) and gp.in_flight == (4, 4, 4, 4)
    table = builder(1, 1, 0, "intra")
    for sol in (one, gp):
        for i, s in enumerate(sol.solution.stages):
            assert s.memory_bytes == table.stage_memory(s.first, s.last, 1, "none",
                                                        sol.in_flight[i])
    assert one.step_s == pytest.approx(gp.step_s)  # same time: 1F1B only saves memory


def test_memory_forces_recompute_only_on_the_stages_that_hold_more_microbatches():
    # 1F1B: stage 0 holds 2 microbatches, stage 1 one; only stage 0 must recompute.
    builder = _Synthetic([1e-3] * 2, [10**5] * 2, [10**7] * 2, (10**5,))
    cluster, work = _cluster(1, 2, 1000 + 8 * 10**5 + 15 * 10**6), _workload(2)
    sol = solve_train(builder, cluster, work,
                      pins={"dp": 1, "pp": 2, "tp": 1, "microbatches": 2, "schedule": "1f1b"})
    ref = solve_train_reference(builder, cluster, work,
                                pins={"dp": 1, "pp": 2, "tp": 1, "microbatches": 2,
                                      "schedule": "1f1b"})
    assert sol.recompute[1] == "none" and sol.recompute[0] != "none"
    assert sol.solution.solver.objective_ticks == ref.solution.solver.objective_ticks


@pytest.mark.parametrize("pins, expected", [
    ({"zero": 5}, "zero 5 must be one of 0, 1, 2, 3"),
    ({"schedule": "zigzag"}, "schedule 'zigzag' must be one of gpipe, 1f1b, interleaved"),
    ({"recompute": "half"}, "recompute 'half' must be one of none, selective, full"),
    ({"zero": 2, "dp": 1}, "dp 1 has none to shard over"),
    ({"schedule": "1f1b", "virtual_stages": 2}, "virtual_stages 2 needs --schedule interleaved"),
    ({"schedule": "interleaved", "virtual_stages": 1}, "pin --virtual-stages 2 or more"),
    ({"virtual_stages": 2, "pp": 1}, "interleaved 1F1B needs 2 or more pipeline stages"),
])
def test_contradictory_training_pins_are_one_plan_error(pins, expected):
    builder = _Synthetic([1e-3] * 2, [10**5] * 2, [10**5] * 2, (10**5,))
    with pytest.raises(PlanError, match=expected.replace("(", r"\(")):
        train_space(builder, _cluster(1, 2, 10**10), _workload(2), pins)


# ------------------------------------------------------------------ a real (tiny) model


@pytest.fixture(scope="module")
def gpt_plan():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=64, vocab_size=256, block_size=64))
    ids = torch.randint(0, 256, (8, 32))
    traced = planner.trace(model, (ids,), name="gpt-tiny")
    work = planner.Workload(batch_size=8, seq_len=32, phase="train", dtype="bfloat16")
    return traced, planner.plan(traced, "2x4xH100", work, alternatives=1)


def test_train_plan_records_the_training_keys_and_round_trips(gpt_plan, tmp_path):
    _, plan = gpt_plan
    plan.validate()
    assert plan.workload.phase == "train" and plan.parallelism.schedule == "1f1b"
    assert plan.parallelism.virtual_stages == 1 and plan.solver.status == "OPTIMAL"
    assert all(s.recompute in tm.RECOMPUTE for s in plan.stages)
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again.to_dict() == plan.to_dict()


def test_train_plan_figures_are_the_cost_models_formulas(gpt_plan):
    traced, plan = gpt_plan
    t = plan.extra["training"]
    times = [s.predicted.compute_s + s.predicted.comm_s for s in plan.stages]
    hops = [2 * plan.cost_table().p2p_s(s.layers[1], inter_node=False)
            for s in plan.stages[:-1]]  # every replica of this plan sits in one node
    step = tm.pipeline_step_s(times, hops, t["stage_tail_s"], plan.parallelism.microbatches)
    assert plan.predicted.latency_s == pytest.approx(step, rel=1e-12)
    assert t["step_s"] == plan.predicted.latency_s
    used = plan.parallelism.dp * sum(s.tp for s in plan.stages)
    flops = 3 * sum(layer.flops for layer in traced.layers)  # traced at the global batch
    peak = 989e12  # H100 SXM dense bf16 in the catalogue
    assert plan.predicted.mfu == pytest.approx(flops / step / (used * peak), rel=0.05)
    assert plan.predicted.throughput_samples_per_s == pytest.approx(8 / step)


def test_train_plan_beats_or_ties_every_feasible_baseline(gpt_plan):
    _, plan = gpt_plan
    assert set(plan.baselines) == {"ddp", "fsdp", "megatron"}
    feasible = [b for b in plan.baselines.values() if b.feasible]
    assert feasible
    for b in feasible:
        assert plan.predicted.latency_s <= b.latency_s * (1 + 1e-9)


def test_explain_alternatives_name_the_other_recompute_and_zero_choices(gpt_plan):
    _, plan = gpt_plan
    changes = {a["change"] for a in plan.extra["training_alternatives"]}
    chosen = {s.recompute for s in plan.stages}
    assert {f"recompute {rc}" for rc in tm.RECOMPUTE if {rc} != chosen} <= changes
    assert ("zero 3" in changes) != (plan.parallelism.zero == 3)
    for a in plan.extra["training_alternatives"]:
        if a["feasible"]:  # every alternative is a constrained version of the optimum
            assert a["step_s"] >= plan.predicted.latency_s * (1 - 1e-9)


# ------------------------------------------------------------------ the CLI

TINY = ["gpt-tiny", "--cluster", "2xcpu", "--batch", "2", "--seq", "16", "--alternatives", "0"]


@pytest.mark.parametrize("extra, expected", [
    (["--zero", "2"], "--zero describe a training step; add --phase train or drop them"),
    (["--recompute", "full", "--phase", "decode"], "--recompute describe a training step"),
    (["--phase", "train", "--schedule", "interleaved", "--virtual-stages", "2", "--pp", "1"],
     "interleaved 1F1B needs 2 or more pipeline stages: drop --pp 1"),
    (["--phase", "train", "--schedule", "interleaved", "--target", "torchtitan"],
     "interleaved 1F1B is not searched for --target torchtitan"),
    (["--phase", "train", "--schedule", "interleaved", "--virtual-stages", "8"],
     "leave no plan shape to search on 2 cpu devices"),
    (["--phase", "train", "--zero", "1", "--dp", "1"], "dp 1 has none to shard over"),
    (["--phase", "train", "--target", "vllm"], "--target"),
])
def test_bad_training_flags_are_one_error(capsys, extra, expected):
    refused([*TINY, *extra], capsys, expected)


def test_cli_train_plan_json_has_the_pinned_choices(capsys):
    from tests.bad_input.cli_helpers import call

    code, out, err = call([*TINY, "--phase", "train", "--zero", "1", "--recompute", "full",
                           "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["workload"]["phase"] == "train"
    assert data["parallelism"]["zero"] == 1 and data["parallelism"]["dp"] == 2
    assert {s["recompute"] for s in data["stages"]} == {"full"}
    assert 0 < data["predicted"]["mfu"] < 1 and math.isfinite(data["predicted"]["latency_s"])


@pytest.mark.parametrize("target", ["torchtitan", "megatron", "deepspeed"])
def test_train_plan_for_a_target_exports_to_it(target, tmp_path, capsys):
    from tests.bad_input.cli_helpers import call

    out = tmp_path / "p.json"
    code, _, err = call(["llama-tiny", "--cluster", "4xcpu", "--batch", "4", "--seq", "32",
                         "--phase", "train", "--target", target, "--alternatives", "0",
                         "--out", out], capsys)
    assert code == 0, err
    from planner.engines import training_differences

    assert training_differences(Plan.load(out), target) == []
    code, text, err = call(["export", out, "--to", target], capsys)
    assert code == 0 and target in text.splitlines()[0].lower(), err


def test_cli_interleaved_plan_holds_pp_groups_times_virtual_stages(capsys, tmp_path):
    """``--schedule interleaved --virtual-stages 2``: the plan file has pp groups × v
    stages in model order, stage i on group i mod pp's devices, and loads back valid;
    ``plan show`` names the groups instead of drawing a flow-shop timeline."""
    from tests.bad_input.cli_helpers import call

    out_file = tmp_path / "il.json"
    code, out, err = call([*TINY, "--phase", "train", "--schedule", "interleaved",
                           "--virtual-stages", "2", "--out", out_file], capsys)
    assert code == 0, err
    assert "dp 1 x pp 2 x tp 1/1 = 2 of 2 devices" in out
    assert "each of the 2 device groups runs 2 stages" in out and "timeline" not in out
    plan = Plan.load(out_file)
    par = plan.parallelism
    assert (par.schedule, par.pp, par.virtual_stages) == ("interleaved", 2, 2)
    assert len(plan.stages) == 4 and plan.stages[0].layers[0] == 0
    assert plan.stages[-1].layers[1] == plan.model.num_layers - 1
    for i, s in enumerate(plan.stages):
        g = plan.stages[i % 2]
        assert s.devices == g.devices and s.predicted.memory_bytes == g.predicted.memory_bytes
    flights = plan.extra["training"]["in_flight"]
    assert flights == [tm.in_flight("interleaved", i % 2, 2, par.microbatches, 2)
                       for i in range(4)]

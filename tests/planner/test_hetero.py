"""Mixed clusters: node groups in specs and files, and the mixed-cluster solvers (CP-SAT
against the exact DP reference on random small clusters)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cluster import Cluster, MixedCluster, SpecError, Workload
from planner.cost_table import TICK_S, CostTable, LayerCost, Link, to_ticks
from planner.hetero import (
    _UNREACHED,
    _best_path_dp,
    _build,
    _path_value,
    _StageSums,
    group_link,
    solve_mixed,
    solve_mixed_reference,
)
from planner.solver import PlanError, solve

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- cluster specs


def test_spec_with_groups_numbers_devices_group_after_group():
    c = Cluster.parse("2x8xH100+4x8xA100-80GB")
    assert isinstance(c, MixedCluster) and c.is_mixed
    assert [(g.nodes, g.devices_per_node, g.device) for g in c.groups] == \
        [(2, 8, "H100-SXM-80GB"), (4, 8, "A100-80GB")]
    assert (c.nodes, c.num_devices, c.group_offsets) == (6, 48, (0, 16))
    assert [c.group_of(d) for d in (0, 15, 16, 47)] == [0, 0, 1, 1]
    assert c.spec_string == "2x8xH100-SXM-80GB+4x8xA100-80GB"
    assert Cluster.parse(c.spec_string) == c


def test_homogeneous_cluster_is_one_group_and_identical_groups_merge():
    c = Cluster.parse("2x8xH100")
    assert c.groups == (c,) and c.group_offsets == (0,) and not c.is_mixed
    assert Cluster.parse("2x8xH100+1x8xH100") == Cluster(3, 8, "H100-SXM-80GB")
    assert isinstance(Cluster.parse("1x2xcpu+1x4xcpu"), MixedCluster)


def test_mixed_cluster_refuses_one_device_attributes_with_what_to_write():
    c = Cluster.parse("1x8xH100+1x8xA100-80GB")
    for attribute in ("device", "devices_per_node", "device_spec"):
        with pytest.raises(SpecError, match="mixes 8xH100-SXM-80GB, 8xA100-80GB.*"
                                            "--cluster 8xH100-SXM-80GB"):
            getattr(c, attribute)


@pytest.mark.parametrize("spec, message", [
    ("8xH100+", "nothing empty between them"),
    ("8xH100+12xA100-80GB", r"group 1 \('12xA100-80GB'\).*largest A100-80GB node has 8"),
    ("8xH100+4xcpu", "mix GPUs and CPUs"),
    ("8xH100+4xB9000", "group 1.*B9000"),
    ("65536x2xcpu+1x4xcpu", "131072 devices"),
])
def test_bad_group_specs_say_what_to_write(spec, message):
    with pytest.raises(SpecError, match=message):
        Cluster.parse(spec)


def test_cluster_file_with_groups_and_per_group_overrides(tmp_path):
    data = {"groups": [{"nodes": 1, "devices_per_node": 8, "device": "H100",
                        "inter_node_bandwidth": 2.5e10},
                       {"nodes": 2, "devices_per_node": 4, "device": "cpu",
                        "memory_bytes": 2**33}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SpecError, match="mix GPUs and CPUs"):
        Cluster.parse(str(path))
    data["groups"][1]["device"] = "A100-80GB"
    path.write_text(json.dumps(data))
    c = Cluster.parse(str(path))
    assert c.groups[0].device_spec.inter_node_bandwidth == 2.5e10
    assert c.groups[1].device_spec.memory_bytes == 2**33 and c.num_devices == 16
    assert Cluster.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("data, message", [
    ({"groups": []}, "non-empty list"),
    ({"groups": [{"nodes": 1, "devices_per_node": 8}]}, r"groups\[0\]: missing keys \['device'\]"),
    ({"groups": [{"nodes": 1, "devices_per_node": 8, "device": "H100"}], "device": "H100"},
     "unknown keys \\['device'\\] next to \"groups\""),
    ({"groups": [{"groups": []}]}, "do not nest"),
    ({"groups": [{"nodes": 1, "devices_per_node": 8, "device": "H100"},
                 {"nodes": 1, "devices_per_node": 8, "device": "A100-80GB"}],
      "num_devices": 8}, "num_devices is 8 but the groups have 16"),
])
def test_bad_group_files_name_the_key(data, message):
    with pytest.raises(SpecError, match=message):
        Cluster.from_dict(data)


def test_a_single_group_file_is_the_homogeneous_cluster():
    assert Cluster.from_dict({"groups": [{"nodes": 2, "devices_per_node": 8,
                                          "device": "H100"}]}) == Cluster(2, 8, "H100-SXM-80GB")


# --------------------------------------------------------------------------- solvers


def _builder(layers, bounds, allowed, speed, ws):
    def build(mbs: int, m: int) -> CostTable:
        costs = tuple({t: LayerCost(c * speed * mbs / t * (1 + 0.1 * (t - 1)),
                                    k * (t > 1) * mbs,
                                    w * 10**8 // t + a * 10**7 * mbs * m // t)
                       for t in allowed} for c, k, w, a in layers)
        return CostTable(costs, tuple(b * mbs for b in bounds), Link(3e-6, 4.5e11),
                         Link(2e-5, 5e10 * speed), mbs, m,
                         stage_workspace_bytes={t: ws for t in allowed})
    return build


@st.composite
def mixed_instances(draw):
    """2-3 groups of 1-2 nodes of 1-4 devices (<= 12 devices), <= 6 layers, each group with
    its own speed, memory and inter-node bandwidth."""
    k = draw(st.sampled_from([2, 2, 3]))
    L = draw(st.integers(1, 6))
    layers = draw(st.lists(st.tuples(st.floats(1e-4, 5e-3), st.floats(0, 1e-3),
                                     st.integers(1, 50), st.integers(0, 20)),
                           min_size=L, max_size=L))
    bounds = draw(st.lists(st.integers(0, 10**8), min_size=L - 1, max_size=L - 1))
    groups, builders = [], []
    devices = ["H100", "A100-80GB", "L4"]
    for i in range(k):
        per_node = draw(st.sampled_from([1, 2, 4]))
        nodes = draw(st.sampled_from([1, 2] if per_node < 4 else [1]))
        allowed = draw(st.lists(st.sampled_from([t for t in (1, 2, 4) if per_node % t == 0]),
                                min_size=1, unique=True))
        groups.append(Cluster(nodes, per_node, devices[i],
                              memory_bytes=draw(st.integers(5, 60)) * 10**8))
        builders.append(_builder(layers, bounds, allowed, draw(st.sampled_from([1.0, 1.5, 3.0])),
                                 draw(st.integers(0, 3)) * 10**8))
    work = Workload(batch_size=draw(st.sampled_from([1, 2, 3, 4])),
                    objective=draw(st.sampled_from(["latency", "throughput"])),
                    memory_headroom=0.0)
    return builders, MixedCluster(tuple(groups)), work


def _check_structure(sol, cluster):
    """Every tp group inside one node of one group; per-group counts the same per replica."""
    used = set()
    for s in sol.stages:
        for replica in s.devices:
            g = {cluster.group_of(d) for d in replica}
            assert len(g) == 1
            gi = g.pop()
            per_node = cluster.groups[gi].devices_per_node
            local = [d - cluster.group_offsets[gi] for d in replica]
            assert len({d // per_node for d in local}) == 1 and len(replica) == s.tp
            assert not used & set(replica)
            used |= set(replica)


@settings(max_examples=80, **SETTINGS)
@given(mixed_instances())
def test_cpsat_objective_equals_the_reference_on_random_mixed_clusters(case):
    builders, cluster, work = case
    try:
        fast = solve_mixed(builders, cluster, work)
    except PlanError:
        fast = None
    try:
        exact = solve_mixed_reference(builders, cluster, work)
    except PlanError:
        exact = None
    assert (fast is None) == (exact is None)
    if fast is None:
        return
    assert fast.solver.status == "OPTIMAL"
    assert fast.solver.objective_ticks == exact.solver.objective_ticks
    for sol in (fast, exact):
        _check_structure(sol, cluster)
        minimised = sol.predicted.latency_s if work.objective == "latency" \
            else sol.predicted.period_s
        terms = 2 * (len(sol.stages) * 7 + 1) * sol.microbatches
        assert abs(minimised - sol.solver.objective_ticks * TICK_S) <= terms * TICK_S
    # no plan on one group alone beats the mixed optimum (a group alone is a mixed plan)
    for gi, group in enumerate(cluster.groups):
        try:
            alone = solve(builders[gi], group, work, diagnose=False)
        except PlanError:
            continue
        assert fast.solver.objective_ticks <= alone.solver.objective_ticks


@settings(max_examples=20, **SETTINGS)
@given(mixed_instances(), st.data())
def test_pins_on_mixed_clusters_agree_with_the_reference(case, data):
    builders, cluster, work = case
    pins = {k: data.draw(st.sampled_from(v), label=k)
            for k, v in (("pp", [1, 2, 3]), ("tp", [1, 2]), ("dp", [1, 2]))
            if data.draw(st.booleans(), label=f"pin {k}")}
    results = []
    for solver in (solve_mixed, solve_mixed_reference):
        try:
            results.append(solver(builders, cluster, work, pins=pins))
        except PlanError as e:
            results.append(str(e).split(":")[0])
    fast, exact = results
    assert type(fast) is type(exact)
    if isinstance(fast, str):
        return
    assert fast.solver.objective_ticks == exact.solver.objective_ticks
    for sol in results:
        assert all(s.tp == pins.get("tp", s.tp) for s in sol.stages)
        assert sol.dp == pins.get("dp", sol.dp) and sol.pp == pins.get("pp", sol.pp)


@settings(max_examples=60, **SETTINGS)
@given(mixed_instances())
def test_the_dp_bound_holds_per_combo_and_its_plan_is_priced_exactly(case):
    """``_StageSums.bound`` <= the combo's exact optimum (the reference DP on that combo),
    equal to it for one microbatch's latency (the sum of stage times and hops, which the
    DP prices exactly), and the plan at its best case, when there is one, is a plan of the
    combo: its value is at least the optimum."""
    builders, cluster, work = case
    combos, _ = _build(builders, cluster, work, None, None)
    for combo in combos:
        exact = _best_path_dp(combo, work.objective, None)
        sums = _StageSums(combo)
        bound = sums.bound(work.objective, None)
        if exact is None:
            assert bound >= _UNREACHED or sums.path(sums.at) is None
            continue
        assert bound <= exact[0]
        if work.objective == "latency" and combo.m == 1:  # the sum alone: the DP is exact
            assert bound == exact[0]
        path = sums.path(sums.at)
        if path is not None:
            assert _path_value(combo, path, work.objective) >= exact[0]


def test_70b_prefill_on_h100_and_a100_nodes_is_proven_optimal():
    """The case the mixed search used to end FEASIBLE on (60 s; benchmarks/mixed_clusters.py):
    the DP bound and the plan at its best case close every combo; the optimum of the
    winning (dp, microbatches) equals the reference's, 22% below the best group alone."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from solver_scaling import ARCHS, synthetic_builder

    from planner.hetero import best_subsets

    cluster = Cluster.parse("1x8xH100+2x8xA100-80GB")
    work = Workload(batch_size=8, seq_len=2048)
    builders = [synthetic_builder(ARCHS["llama-3-70b"], g, work) for g in cluster.groups]
    sol = solve_mixed(builders, cluster, work, time_limit_s=30.0)
    assert sol.solver.status == "OPTIMAL" and sol.solver.bound == sol.solver.objective
    exact = solve_mixed_reference(builders, cluster, work,
                                  pins={"dp": sol.dp, "microbatches": sol.microbatches})
    assert sol.solver.objective_ticks == exact.solver.objective_ticks
    _check_structure(sol, cluster)
    alone = min(a.solver.objective_ticks for a in best_subsets(builders, cluster, work) if a)
    assert sol.solver.objective_ticks < 0.8 * alone
    assert {cluster.group_of(s.devices[0][0]) for s in sol.stages} == {0, 1}


def _linear(speed, L=4, mem=10**9, boundary=1 << 20, inter=5e10, first_mem=None):
    def build(mbs, m):
        c = {1: LayerCost(1e-3 * speed * mbs, 0, mem)}
        first = {1: LayerCost(1e-3 * speed * mbs, 0, first_mem or mem)}
        return CostTable((first,) + (c,) * (L - 1), (boundary,) * (L - 1), Link(1e-6, 1e11),
                         Link(5e-6, inter), mbs, m)
    return build


def test_layers_balance_by_speed_and_the_group_cut_is_priced_by_the_slower_side():
    # a fast group (1 ms per layer) and a slow one (3 ms): the memory of one device holds
    # 3 layers, so the 4 layers need both; the fast device takes 3.
    cluster = MixedCluster((Cluster(1, 1, "H100", memory_bytes=3 * 10**9),
                            Cluster(1, 1, "A100-80GB", memory_bytes=3 * 10**9)))
    work = Workload(batch_size=1, memory_headroom=0.0)
    fast_inter, slow_inter = 5e10, 1e10
    builders = [_linear(1.0, inter=fast_inter), _linear(3.0, inter=slow_inter)]
    sol = solve_mixed(builders, cluster, work)
    assert [(s.first, s.last, s.devices) for s in sol.stages] == [(0, 2, ((0,),)),
                                                                   (3, 3, ((1,),))]
    hop = 5e-6 + (1 << 20) / slow_inter  # the slower side's bandwidth
    assert sol.predicted.p2p_s == pytest.approx((hop,))
    assert sol.predicted.latency_s == pytest.approx(3e-3 + 3e-3 + hop)
    assert group_link(Link(1e-6, 5e10), Link(4e-6, 9e10)) == Link(4e-6, 5e10)
    assert solve_mixed_reference(builders, cluster, work).solver.objective_ticks == \
        sol.solver.objective_ticks == to_ticks(3e-3) * 2 + to_ticks(hop)


def test_pipeline_may_visit_the_groups_in_either_order():
    # layer 0 holds 2 GB, the others 1 GB; the group listed first has room for one light
    # layer only, so the pipeline starts on the group listed second
    cluster = MixedCluster((Cluster(1, 1, "A100-80GB", memory_bytes=15 * 10**8),
                            Cluster(1, 1, "H100", memory_bytes=4 * 10**9)))
    work = Workload(batch_size=1, memory_headroom=0.0)
    builders = [_linear(3.0, first_mem=2 * 10**9), _linear(1.0, first_mem=2 * 10**9)]
    sol = solve_mixed(builders, cluster, work)
    assert [(s.first, s.last, s.devices) for s in sol.stages] == [(0, 2, ((1,),)),
                                                                   (3, 3, ((0,),))]


def test_replicas_span_groups_with_the_same_share_of_each():
    # 2 replicas, each one device of each group: ids group after group, replica by replica
    cluster = MixedCluster((Cluster(1, 2, "H100", memory_bytes=3 * 10**9),
                            Cluster(1, 2, "A100-80GB", memory_bytes=3 * 10**9)))
    work = Workload(batch_size=2, memory_headroom=0.0, objective="throughput")
    sol = solve_mixed([_linear(1.0), _linear(3.0)], cluster, work, pins={"dp": 2})
    assert sol.dp == 2
    assert [s.devices for s in sol.stages] == [((0,), (1,)), ((2,), (3,))]
    _check_structure(sol, cluster)


def test_mixed_pins_that_contradict_name_every_factor():
    cluster = Cluster.parse("1x2xH100+1x4xA100-80GB")
    with pytest.raises(PlanError, match="tp 8 divides the node of no group.*dp × pp × tp"):
        solve_mixed([_linear(1.0)] * 2, cluster, Workload(batch_size=1),
                    pins={"tp": 8, "pp": 2})


def test_group_order_and_replica_choices_are_all_combos():
    cluster = Cluster.parse("1x2xH100+1x2xA100-80GB+1x2xL4")
    combos, _ = _build([_linear(1.0)] * 3, cluster, Workload(batch_size=2), None, None)
    # dp 1: m in {1, 2}, dp 2: m 1; 3! orders each
    assert len(combos) == 3 * math.factorial(3)
    path = [(0, 1, 1, 0), (2, 3, 1, 2)]
    combo = next(c for c in combos if c.dp == 1 and c.m == 1)
    hop = combo.ghop[(0, 2)][1]
    assert _path_value(combo, path, "latency") == 4 * to_ticks(2e-3) + hop


# --------------------------------------------------------------------------- plan files


def _mixed_plan():
    from planner.plan import Plan

    cluster = Cluster.parse("1x2xH100+1x4xA100-80GB")
    builders = [_linear(1.0, L=6), _linear(2.0, L=6)]
    work = Workload(batch_size=2, memory_headroom=0.0, objective="throughput")
    sol = solve_mixed(builders, cluster, work, pins={"dp": 2, "pp": 2})
    tables = tuple(b(sol.microbatch_size, sol.microbatches) for b in builders)
    return Plan.from_solution(sol, tables[0], cluster, work, model_name="toy", fingerprint="f",
                              group_tables=tables), sol


def test_a_mixed_plan_records_its_groups_and_round_trips(tmp_path):
    from planner.plan import Plan

    plan, sol = _mixed_plan()
    d = plan.to_dict()
    shape = ("nodes", "devices_per_node", "device")
    assert {k: v for k, v in d["cluster"].items() if k != "groups"} == \
        {"num_devices": 6, "nodes": 2, "devices_per_node": 2, "device": "H100-SXM-80GB"}
    assert [tuple(g[k] for k in shape) for g in d["cluster"]["groups"]] == \
        [(1, 2, "H100-SXM-80GB"), (1, 4, "A100-80GB")]
    # 2 replicas x 2 stages: one device of each group per replica, ids group after group
    assert [s.devices for s in sol.stages] == [((0,), (1,)), ((2,), (3,))]
    assert [s["group"] for s in d["stages"]] == [0, 1]
    # each group's table as the solver saw it: the A100 group's layers take twice as long
    assert d["cluster"]["groups"][0]["costs"] == [layer["costs"] for layer in d["layers"]]
    assert [c["1"]["compute_s"] for c in d["cluster"]["groups"][1]["costs"]] == \
        [2 * c["1"]["compute_s"] for c in d["cluster"]["groups"][0]["costs"]]
    assert plan.cost_table(group=1).costs[0][1].compute_s == 2e-3 * sol.microbatch_size
    plan.save(tmp_path / "p.json")
    loaded = Plan.load(tmp_path / "p.json")
    assert loaded.cluster == plan.cluster and loaded.to_dict() == d


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["cluster"].update(num_devices=8),
     r"cluster.num_devices 8 != 6, the devices of cluster.groups"),
    (lambda d: d["cluster"].update(nodes=3), "cluster.nodes 3 != 2"),
    (lambda d: d["cluster"].update(groups=d["cluster"]["groups"][:1], num_devices=2, nodes=1),
     "cluster.groups lists 1 group"),
    (lambda d: d["cluster"].update(device="A100-80GB"), "the first group's"),
    (lambda d: d["cluster"]["groups"][1].update(device="B9000"), "B9000"),
    (lambda d: d["stages"][0].update(tp=2, devices=[[1, 2], [4, 5]]),
     r"stages\[0\].devices\[0\] \[1, 2\] spans 2 group\(s\) and 2 nodes"),
    (lambda d: d["stages"][1].update(group=0),
     r"stages\[1\].group is 0 but its devices are in group\(s\) \[1\]"),
    (lambda d: d["stages"][1].update(group=2), r"stages\[1\].group is 2; cluster.groups has 2"),
    (lambda d: d["cluster"]["groups"][1].pop("costs"), "record a cost table and the others"),
    (lambda d: d["cluster"]["groups"][1]["costs"].pop(), r"groups\[1\].costs has 5 entries"),
    (lambda d: d["cluster"]["groups"][0]["costs"][0]["1"].update(compute_s=1.0),
     "differ from layers"),
    (lambda d: d["cluster"]["groups"][1]["costs"][5].pop("1"),
     r"stages\[1\].tp is 1 but cluster.groups\[1\].costs\[5\] has no \"1\""),
])
def test_malformed_groups_in_plan_files_are_named(tmp_path, edit, message):
    from planner.plan import Plan, PlanFormatError

    d = _mixed_plan()[0].to_dict()
    edit(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanFormatError, match=message):
        Plan.load(path)


# --------------------------------------------------------------------------- the CLI


def _check_mixed_plan_file(path, work):
    """A mixed plan file as a reader sees it: each stage's group holds its devices, its
    memory fits that group's device, the independent validator agrees with the groups'
    recorded tables, and no group alone (the ``alone:`` baselines) beats it."""
    from planner.plan import Plan
    from planner.report import baseline_ratios
    from planner.validate import check_plan

    plan = Plan.load(path)
    cluster = MixedCluster(tuple(Cluster(g.nodes, g.devices_per_node, g.device)
                                 for g in plan.cluster.groups))
    tables = [plan.cost_table(group=g) for g in range(len(cluster.groups))]
    assert check_plan(plan, tables, cluster, work) == []
    for s in plan.stages:
        assert {cluster.group_of(d) for r in s.devices for d in r} == {s.group}
        group = cluster.groups[s.group]
        cap = group.device_spec.memory_bytes * (1 - work.memory_headroom)
        assert s.predicted.memory_bytes <= cap
    ratios = baseline_ratios(plan)
    assert set(ratios) == {f"alone:{g.spec_string}" for g in cluster.groups}
    assert all(r is None or r >= 1 - 1e-12 for r in ratios.values())
    return plan


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_plan_model_plans_a_mixed_cluster_end_to_end(capsys, tmp_path, phase):
    from tests.bad_input.cli_helpers import HF_LLAMA, call

    out = tmp_path / "p.json"
    code, stdout, err = call([*HF_LLAMA, "--cluster", "1x2xH100+1x4xA100-80GB", "--batch", "4",
                              "--seq", "64", "--phase", phase, "--out", out], capsys)
    assert code == 0, err
    assert "gpu" in stdout and "mixed cluster: this plan is" in stdout
    work = Workload(batch_size=4, seq_len=64, phase=phase)
    plan = _check_mixed_plan_file(out, work)
    assert [(g.nodes, g.devices_per_node, g.device) for g in plan.cluster.groups] == \
        [(1, 2, "H100-SXM-80GB"), (1, 4, "A100-80GB")]
    assert (plan.predicted.ttft_s is not None) == (phase == "decode")
    code, shown, _ = call(["show", out], capsys)
    stage_table = shown.split("stages (")[1].split("pipeline")[0]
    assert code == 0 and f"│ {'H100' if plan.stages[0].group == 0 else 'A100'} " in stage_table
    code, explained, _ = call(["explain", out], capsys)
    assert code == 0 and "stage 0: layers 0.." in explained
    assert "the best plan on each group alone" in explained


def test_70b_prefill_on_h100_and_a100_nodes_beats_each_group_alone(tmp_path):
    """llama-3-70b prefill, batch 8, on one H100 node and two A100 nodes (traced on meta):
    planner.plan uses both groups and is faster than the best plan on either alone."""
    import torch

    import planner
    from planner.models.loader import load_model

    lm = load_model("llama-3-70b", batch_size=8, seq_len=2048, dtype=torch.bfloat16,
                    device="meta")
    work = Workload(batch_size=8, seq_len=2048)
    plan = planner.plan(lm.model, "1x8xH100+2x8xA100-80GB", work, args=lm.args,
                        kwargs=lm.kwargs, alternatives=1)
    plan.save(tmp_path / "p.json")
    plan = _check_mixed_plan_file(tmp_path / "p.json", work)
    assert plan.solver.status == "OPTIMAL"
    assert {s.group for s in plan.stages} == {0, 1}
    ratios = [r for r in plan.baselines.values()]
    assert min(b.latency_s for b in ratios if b.feasible) > plan.predicted.latency_s * 1.01


def test_training_and_target_on_a_mixed_cluster_are_refused_with_what_to_do(capsys, tmp_path):
    from tests.bad_input.cli_helpers import HF_LLAMA, refused

    out = tmp_path / "p.json"
    refused([*HF_LLAMA, "--cluster", "1x2xH100+1x4xA100-80GB", "--phase", "train",
             "--out", out], capsys, "train plans on a mixed cluster", "not supported yet",
            "--cluster 2xH100-SXM-80GB", out_file=out)
    refused([*HF_LLAMA, "--cluster", "1x2xH100+1x4xA100-80GB", "--target", "vllm",
             "--out", out], capsys, "engines take no mixed cluster", out_file=out)
    refused([*HF_LLAMA, "--cluster", "1x2xcpu+1x4xcpu", "--profile", "--out", out], capsys,
            "2xcpu+4xcpu mixes node groups; drop --profile", out_file=out)
    refused([*HF_LLAMA, "--cluster", "2xcpu+", "--batch", "1"], capsys,
            "nothing empty between them")


def test_plan_run_launch_and_export_refuse_a_plan_for_a_mixed_cluster(capsys, tmp_path):
    from tests.bad_input.cli_helpers import refused

    plan, _ = _mixed_plan()
    path = tmp_path / "p.json"
    plan.save(path)
    for command in (["run", path, "--check"], ["launch", path, "--out", tmp_path / "l"],
                    ["export", path, "--to", "vllm"]):
        verb = "export" if command[0] == "export" else "run"
        refused(command, capsys, f"plan {command[0]} does not {verb} plans for mixed clusters "
                "yet", "node groups 1x2xH100-SXM-80GB+1x4xA100-80GB", f"to {verb} it")
    assert not (tmp_path / "l").exists()


def test_mixed_search_starts_from_the_best_group_alone_and_keeps_it_when_time_runs_out():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from solver_scaling import ARCHS, synthetic_builder

    from planner.hetero import best_subsets

    cluster = Cluster.parse("1x8xH100+1x8xA100-80GB")
    work = Workload(batch_size=8, seq_len=2048)
    builders = [synthetic_builder(ARCHS["llama-3-8b"], g, work) for g in cluster.groups]
    alone = best_subsets(builders, cluster, work)
    sol = solve_mixed(builders, cluster, work, time_limit_s=3.0)
    best_alone = min(a.solver.objective_ticks for a in alone if a is not None)
    assert sol.solver.objective_ticks <= best_alone
    assert sol.solver.bound <= sol.solver.objective
    assert (sol.solver.status == "OPTIMAL") == (sol.solver.bound == sol.solver.objective)


def test_planner_plan_refuses_training_on_a_mixed_cluster():
    import torch

    import planner
    from planner.hetero import mixed_request_error

    with pytest.raises(SpecError, match=r"train plans on a mixed cluster \(2xcpu\+4xcpu\) are "
                                        r"not supported yet.*--cluster 2xcpu"):
        planner.plan(torch.nn.Linear(4, 4), "1x2xcpu+1x4xcpu", Workload(batch_size=1,
                     phase="train"), args=(torch.zeros(1, 4),))
    assert mixed_request_error(Cluster.parse("8xH100+8xA100-80GB"), "decode") is None

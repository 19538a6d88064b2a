"""The plans a user would write by hand, priced on the solver's own cost table.

- ``even_tp_node``: tp = devices per node, one stage per node, layers split evenly
  (the Megatron-LM / vLLM default);
- ``pure_tp``: one stage, the largest tp the model and node allow;
- ``pure_pp``: tp 1, as many stages as devices (at most one layer each), split evenly;
- ``pure_dp``: tp 1, one stage, as many replicas as divide the batch and fit the devices.

Each takes its best microbatch count. When no count fits in memory the baseline is
infeasible and says how much memory per device it would need.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cluster import Cluster, Workload
from planner.cost_table import CostTableBuilder
from planner.solver import predict

__all__ = ["Baseline", "baselines", "even_split"]

GiB = 2**30


@dataclass(frozen=True)
class Baseline:
    """Predicted figures of one hand-written plan (``None`` figures when infeasible)."""

    name: str
    feasible: bool
    dp: int
    pp: int
    tp: int
    microbatches: int
    latency_s: float | None
    throughput_samples_per_s: float | None
    peak_memory_bytes: int
    needs_memory_bytes: int | None = None
    reason: str = ""


def even_split(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """``pp`` contiguous ranges whose sizes differ by at most one, larger ones first."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for i in range(pp):
        size = base + (1 if i < extra else 0)
        ranges.append((start, start + size - 1))
        start += size
    return ranges


def _evaluate(name, builder, cluster, workload, dp, pp, tp) -> Baseline:
    batch = workload.batch_size
    cap = int(cluster.device_spec.memory_bytes * (1.0 - workload.memory_headroom))
    best, lightest = None, None
    per_replica = batch // dp
    for m in (d for d in range(1, per_replica + 1) if per_replica % d == 0):
        table = builder(per_replica // m, m)
        if any(tp not in c for c in table.costs):
            return Baseline(name, False, dp, pp, tp, m, None, None, 0,
                            reason=f"the model does not allow tp {tp}")
        layers = [(a, b, tp) for a, b in even_split(table.num_layers, pp)]
        _stages, pred = predict(table, layers, dp, batch, cluster.devices_per_node)
        value = pred.latency_s if workload.objective == "latency" else pred.period_s
        if pred.peak_memory_bytes <= cap:
            if best is None or value < best[0]:
                best = (value, m, pred)
        elif lightest is None or pred.peak_memory_bytes < lightest[1].peak_memory_bytes:
            lightest = (m, pred)
    if best is not None:
        _, m, pred = best
        return Baseline(name, True, dp, pp, tp, m, pred.latency_s,
                        pred.throughput_samples_per_s, pred.peak_memory_bytes)
    m, pred = lightest
    needs = int(pred.peak_memory_bytes / (1.0 - workload.memory_headroom))
    return Baseline(name, False, dp, pp, tp, m, pred.latency_s, pred.throughput_samples_per_s,
                    pred.peak_memory_bytes, needs,
                    reason=f"infeasible (needs {needs / GiB:.1f} GiB per device)")


def baselines(builder: CostTableBuilder, cluster: Cluster, workload: Workload) -> dict[str, Baseline]:
    """The four baselines of the module docstring, by name.

    Args:
        builder: the cost-table builder the solver used.
        cluster: nodes, devices per node, device memory.
        workload: batch size, objective, headroom.
    """
    probe = builder(workload.batch_size, 1)
    L, per_node, total = probe.num_layers, cluster.devices_per_node, cluster.num_devices
    allowed = [t for t in probe.tp_degrees if per_node % t == 0
               and all(t in c for c in probe.costs)] or [1]
    node_tp = per_node if per_node in allowed else max(allowed)
    dp_max = max(d for d in range(1, workload.batch_size + 1)
                 if workload.batch_size % d == 0 and d <= total)
    plans = {
        "even_tp_node": (1, min(cluster.nodes, L), node_tp),
        "pure_tp": (1, 1, max(allowed)),
        "pure_pp": (1, min(L, total), 1),
        "pure_dp": (dp_max, 1, 1),
    }
    return {name: _evaluate(name, builder, cluster, workload, dp, pp, tp)
            for name, (dp, pp, tp) in plans.items()}

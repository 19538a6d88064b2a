"""Rendering a Plan for people: stage table, memory bars, pipeline timeline, baselines.

Everything printed is read from the Plan (the numbers the cost model produced once and the
solver optimised); nothing is recomputed here.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from planner.plan import Plan
from planner.units import fmt_bytes, fmt_seconds

__all__ = ["render_plan", "render_explain", "baseline_ratios", "mixed_line"]

_BAR = 20
_TIMELINE = 64


def _objective(plan: Plan, latency_s: float | None, throughput: float | None) -> float | None:
    """The figure the plan minimised: latency, or time per sample for throughput."""
    if plan.workload.objective == "latency":
        return latency_s
    return 1.0 / throughput if throughput else None


def baseline_ratios(plan: Plan) -> dict[str, float | None]:
    """Baseline objective / plan objective (> 1 means the plan is better); None if infeasible."""
    mine = _objective(plan, plan.predicted.latency_s, plan.predicted.throughput_samples_per_s)
    out = {}
    for name, b in plan.baselines.items():
        theirs = _objective(plan, b.latency_s, b.throughput_samples_per_s) if b.feasible else None
        out[name] = theirs / mine if theirs is not None and mine else None
    return out


def _memory_bar(used: int, capacity: int) -> str:
    filled = min(_BAR, round(_BAR * used / capacity)) if capacity else 0
    return "█" * filled + "·" * (_BAR - filled) + f" {100 * used / capacity:5.1f}%"


def _timeline(plan: Plan) -> list[str]:
    """GPipe fill / steady / drain, one row per stage, time scaled to the terminal (none for
    interleaved 1F1B, whose rows would be device groups running several stages)."""
    if plan.parallelism.virtual_stages > 1:
        return []
    m = plan.parallelism.microbatches
    times = [s.predicted.compute_s + s.predicted.comm_s for s in plan.stages]
    slot = max(times) if times else 0.0
    total = sum(times) + (m - 1) * slot
    if total <= 0:
        return []
    scale = _TIMELINE / total
    rows = []
    for i, t in enumerate(times):
        start = sum(times[:i])
        line = [" "] * _TIMELINE
        for k in range(m):
            a = int((start + k * slot) * scale)
            b = max(a + 1, int((start + k * slot + t) * scale))
            for x in range(a, min(b, _TIMELINE)):
                line[x] = "▇" if k % 2 == 0 else "▆"
        rows.append(f"stage {i:<3}|{''.join(line)}|")
    rows.append(f"{'':10}0{'':{_TIMELINE - 12}}{fmt_seconds(total):>12}")
    return rows


def render_plan(plan: Plan, console: Console) -> None:
    """Print the plan: summary, stages, memory, timeline, baselines, solver."""
    par, w, c = plan.parallelism, plan.workload, plan.cluster
    capacity = _capacity(plan)
    console.print(
        f"[bold]{plan.model.name}[/] on {_cluster_name(plan)} "
        f"({c.num_devices} devices) | {w.phase} batch {w.batch_size} seq {w.seq_len} {w.dtype} | "
        f"objective: {w.objective} | runtime: {w.runtime}"
    )
    groups = plan.stages[:par.pp]  # with virtual stages, stage i runs on group i mod pp
    used = par.dp * sum(s.tp for s in groups)
    console.print(
        f"[bold green]plan:[/] dp {par.dp} x pp {par.pp} x tp {'/'.join(str(s.tp) for s in groups)}"
        f" = {used} of {c.num_devices} devices, {par.microbatches} microbatch(es) of {par.microbatch_size}"
        f", sequence parallel {'on' if par.sequence_parallel else 'off'}"
    )
    train = w.phase == "train"
    if train:
        console.print(_training_line(plan), highlight=False)
    table = Table(title="stages (per microbatch, per device)" + (
        "; forward + backward (+ recompute), memory at the microbatches in flight" if train
        else ""))
    columns = ["stage", "layers", "#", "tp", "devices (replica 0)", "compute", "tp comm",
               "memory", "memory / usable capacity"]
    if train:
        columns[7:7] = ["recompute", "in flight", "tail"]
    mixed = bool(c.groups)
    if mixed:
        columns[5:5] = ["gpu"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("layers", "devices (replica 0)",
                                                        "memory / usable capacity",
                                                        "gpu") else "right",
                         no_wrap=col in ("memory / usable capacity", "gpu"))
    for i, s in enumerate(plan.stages):
        first, last = s.layers
        names = f"{plan.layers[first].name} .. {plan.layers[last].name}" if last > first else plan.layers[first].name
        kv = f" (kv x{s.kv_heads_replicated})" if s.kv_heads_replicated > 1 else ""
        cells = [str(i), names, str(last - first + 1), f"{s.tp}{kv}",
                 _device_list(s.devices[0]), fmt_seconds(s.predicted.compute_s),
                 fmt_seconds(s.predicted.comm_s), fmt_bytes(s.predicted.memory_bytes),
                 _memory_bar(s.predicted.memory_bytes, _capacity(plan, s.group))]
        if train:
            t = plan.extra.get("training", {})
            flight = t.get("in_flight", [])
            tail = t.get("stage_tail_s", [])
            cells[7:7] = [s.recompute, str(flight[i]) if i < len(flight) else "-",
                          fmt_seconds(tail[i]) if i < len(tail) else "-"]
        if mixed:
            cells[5:5] = [gpu_labels(plan)[s.group]]
        table.add_row(*cells)
    console.print(table)
    _render_sharding(plan, console)
    rows = _timeline(plan)
    if rows:
        console.print("[bold]pipeline timeline[/] (one replica; fill, steady state, drain):")
    elif plan.parallelism.virtual_stages > 1:
        console.print(f"interleaved 1F1B: each of the {plan.parallelism.pp} device groups runs "
                      f"{plan.parallelism.virtual_stages} stages (stage i on group i mod "
                      f"{plan.parallelism.pp}); the step time is docs/training.md's "
                      "interleaved formula", highlight=False)
    for row in rows:
        console.print(row, highlight=False)
    p = plan.predicted
    usable = " / ".join(f"{g.device} {fmt_bytes(_capacity(plan, i))}"
                        for i, g in enumerate(c.groups)) if mixed else fmt_bytes(capacity)
    console.print(
        f"[bold]predicted:[/] latency {fmt_seconds(p.latency_s)}, throughput "
        f"{p.throughput_samples_per_s:.2f} samples/s, peak memory {fmt_bytes(p.peak_memory_bytes)} "
        f"per device (usable {usable}); numbers are {plan.provenance}"
    )
    if w.phase == "decode":
        console.print(_decode_line(plan), highlight=False)
    if train:
        t = plan.extra.get("training", {})
        mfu = f", MFU {p.mfu:.1%}" if p.mfu is not None else ""
        tokens = f"{t['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in t else ""
        console.print(f"[bold]train step:[/] {fmt_seconds(p.latency_s)} per optimizer step, "
                      f"{tokens}{mfu}", highlight=False)
    if plan.baselines:
        bt = Table(title=f"baselines ({w.objective}: ratio = baseline / this plan)")
        for col in ("baseline", "latency", "throughput", "ratio"):
            bt.add_column(col, justify="left" if col == "baseline" else "right")
        ratios = baseline_ratios(plan)
        for name, b in plan.baselines.items():
            if b.feasible:
                bt.add_row(name, fmt_seconds(b.latency_s), f"{b.throughput_samples_per_s:.2f}/s",
                           f"{ratios[name]:.2f}x")
            else:
                need = f"needs {fmt_bytes(b.needs_memory_bytes)}/device" if b.needs_memory_bytes else ""
                bt.add_row(name, "infeasible", need, "-")
        console.print(bt)
        if mixed:
            console.print(mixed_line(plan), highlight=False)
    s = plan.solver
    console.print(
        f"[bold]solver:[/] {s.name} {s.status}, objective {fmt_seconds(s.objective)}, bound "
        f"{fmt_seconds(s.bound)}, gap {s.gap:.2%}, {s.wall_s:.2f} s"
    )


def mixed_line(plan: Plan) -> str:
    """A mixed plan against the best plan of one group alone (its ``alone:`` baselines)."""
    ratios = {k: v for k, v in baseline_ratios(plan).items() if k.startswith("alone:")}
    feasible = {k: v for k, v in ratios.items() if v is not None}
    if not feasible:
        return "mixed cluster: no group alone fits this model; only the mixed plan does"
    name = min(feasible, key=feasible.get)
    ratio = feasible[name]
    gain = (f"{ratio:.2f}x faster than" if ratio > 1 + 1e-9 else "as fast as")
    return (f"mixed cluster: this plan is {gain} the best plan on one group alone "
            f"({name.removeprefix('alone:')}; {plan.workload.objective})")


def gpu_labels(plan: Plan) -> list[str]:
    """Each group's device as ``plan show`` names it in the stage table: the catalogue
    name's first part (``H100`` for ``H100-SXM-80GB``) when that tells the groups apart, so
    the table fits the terminal; the full name otherwise (``plan explain`` gives it)."""
    short = [g.device.split("-")[0] for g in plan.cluster.groups]
    full = [g.device for g in plan.cluster.groups]
    return short if len(set(short)) == len(set(full)) else full


def _cluster_name(plan: Plan) -> str:
    c = plan.cluster
    if c.groups:
        return "+".join(f"{g.nodes}x{g.devices_per_node}x{g.device}" for g in c.groups)
    return f"{c.nodes}x{c.devices_per_node}x{c.device}"


def _training_line(plan: Plan) -> str:
    """A train plan's data-parallel sharding, schedule and optimizer."""
    par = plan.parallelism
    what = {0: "replicated (DDP)", 1: "optimizer states sharded (ZeRO-1)",
            2: "optimizer states and gradients sharded (ZeRO-2)",
            3: "parameters, gradients and optimizer states sharded (ZeRO-3/FSDP)"}[par.zero]
    t = plan.extra.get("training", {})
    link = f", dp collectives {t['dp_link']}-node" if par.dp > 1 and "dp_link" in t else ""
    return (f"training: zero {par.zero} over dp {par.dp}: {what}; schedule {par.schedule}"
            f"{f' x {par.virtual_stages} virtual stages' if par.virtual_stages > 1 else ''}; "
            f"optimizer {t.get('optimizer', 'adamw')}{link}")


def _decode_line(plan: Plan) -> str:
    """A decode plan's generation figures: TTFT (its prompt's prefill on the plan's
    stages), TPOT (one round of every microbatch) and the KV cache each device holds."""
    p, w = plan.predicted, plan.workload
    ttft = (f"TTFT {fmt_seconds(p.ttft_s)} ({w.seq_len}-token prompts)"
            if p.ttft_s is not None else "TTFT not priced")
    tpot = f"TPOT {fmt_seconds(p.tpot_s)}/token" if p.tpot_s is not None else "TPOT not priced"
    kv = " / ".join(fmt_bytes(s.kv_cache_bytes) for s in plan.stages)
    return f"decode: {ttft}, {tpot}; KV cache per device by stage: {kv}"


def _render_sharding(plan: Plan, console: Console) -> None:
    """Each tp > 1 stage's strategy: per layer template, the sharded parameters (their
    placement) and the collectives one layer runs per microbatch."""
    for i, s in enumerate(plan.stages):
        if s.sharding is None:
            continue
        console.print(f"[bold]tensor parallelism, stage {i}[/] (tp {s.tp}; per layer, per "
                      "microbatch):", highlight=False)
        for t in s.sharding.templates:
            layers = (plan.layers[t.layers[0]].name if len(t.layers) == 1 else
                      f"{plan.layers[t.layers[0]].name} .. {plan.layers[t.layers[-1]].name} "
                      f"({len(t.layers)} layers)")
            kinds: dict[tuple[str, int], int] = {}
            for c in t.collectives:
                kinds[(c.kind, c.bytes)] = kinds.get((c.kind, c.bytes), 0) + 1
            comm = ", ".join(f"{n} {k} of {fmt_bytes(b)}" for (k, b), n in kinds.items()) or \
                "no collective"
            params = ", ".join(f"{name} {p}" for name, p in sorted(t.params.items())) or \
                "every parameter replicated"
            console.print(f"  {layers}: {t.candidate}; {comm}; {params}", highlight=False)
        for c in s.sharding.boundary:
            console.print(f"  stage output: {c.kind} of {fmt_bytes(c.bytes)}", highlight=False)


def render_explain(plan: Plan, console: Console) -> None:
    """The best plan of each other (dp, pp, tp) family and why it lost."""
    alts = plan.extra.get("alternatives", [])
    par = plan.parallelism
    console.print(
        f"[bold]chosen:[/] dp {par.dp} x pp {par.pp} x tp {'/'.join(str(s.tp) for s in plan.stages)}, "
        f"objective {fmt_seconds(plan.solver.objective)} ({plan.solver.status})"
    )
    for i, s in enumerate(plan.stages if plan.cluster.groups else ()):
        g = plan.cluster.groups[s.group]
        first, last = s.layers
        console.print(f"stage {i}: layers {first}..{last} at tp {s.tp} on {g.device} (group "
                      f"{s.group}, {g.nodes}x{g.devices_per_node}), devices of replica 0: "
                      f"{_device_list(s.devices[0])}", highlight=False)
    for tp, why in plan.extra.get("tp_excluded", {}).items():
        console.print(f"tp {tp} is not offered: {why}", highlight=False)
    if plan.workload.phase == "train":
        _explain_training(plan, console)
        return
    if not alts:
        console.print("this plan file carries no alternatives (made with --alternatives 0)")
        return
    table = Table(title="the best plan on each group alone" if plan.cluster.groups else
                  "next-best plans by (dp, pp, tp) family")
    for col in ("dp", "pp", "tp", "m", "latency", "throughput", "vs best", "why it lost"):
        table.add_column(col, justify="left" if col == "why it lost" else "right")
    for a in alts:
        if a["feasible"]:
            table.add_row(str(a["dp"]), str(a["pp"]), str(a["tp"]), str(a["microbatches"]),
                          fmt_seconds(a["latency_s"]), f"{a['throughput_samples_per_s']:.2f}/s",
                          f"{a['ratio']:.2f}x", a["why"])
        else:
            table.add_row(str(a["dp"]), str(a["pp"]), str(a["tp"]), "-", "-", "-", "-", a["why"])
    console.print(table)


def _explain_training(plan: Plan, console: Console) -> None:
    """Why recompute and ZeRO-3 were or were not chosen: the best plan with each other
    recompute option on every stage and with the other side of ZeRO-3, its step time and
    peak memory (or why nothing fits), against the chosen plan."""
    alts = plan.extra.get("training_alternatives", [])
    par, p = plan.parallelism, plan.predicted
    recompute = "/".join(s.recompute for s in plan.stages)
    console.print(f"chosen: zero {par.zero}, recompute {recompute}, step "
                  f"{fmt_seconds(p.latency_s)}, peak memory {fmt_bytes(p.peak_memory_bytes)} "
                  f"of {fmt_bytes(_capacity(plan))} usable", highlight=False)
    if par.pp > 1 and par.schedule != "interleaved":
        console.print(f"schedule {par.schedule}; interleaved 1F1B is searched only when asked: "
                      "re-plan with --schedule interleaved to compare (docs/training.md, "
                      "\"Interleaved 1F1B\")", highlight=False)
    if not alts:
        console.print("this plan file carries no alternatives (made with --alternatives 0)")
        return
    table = Table(title="recompute and ZeRO: the best plan with the other choice")
    for col in ("alternative", "plan", "step", "vs chosen", "peak memory", "why"):
        table.add_column(col, justify="left" if col in ("alternative", "plan", "why") else "right")
    for a in alts:
        if not a.get("feasible"):
            table.add_row(a["change"], "-", "-", "-", "-",
                          f"does not fit or cannot be planned: {a.get('reason', '')}")
            continue
        ratio = a["step_s"] / p.latency_s if p.latency_s else float("nan")
        v = a.get("virtual_stages", 1)
        shape = (f"dp {a['dp']} x pp {a['pp']}{f' x v {v}' if v > 1 else ''} x tp "
                 f"{'/'.join(map(str, a['tp']))}, zero {a['zero']}, m {a['microbatches']}")
        why = ("slower: " if ratio > 1 + 1e-9 else "ties: " if ratio >= 1 - 1e-9 else
               "faster (time-limited search): ") + _memory_why(a, p.peak_memory_bytes)
        table.add_row(a["change"], shape, fmt_seconds(a["step_s"]), f"{ratio:.3f}x",
                      fmt_bytes(a["peak_memory_bytes"]), why)
    console.print(table)


def _memory_why(alt: dict, chosen_peak: int) -> str:
    diff = alt["peak_memory_bytes"] - chosen_peak
    return (f"{fmt_bytes(abs(diff))} {'more' if diff > 0 else 'less'} memory per device"
            if diff else "the same memory per device")


def _capacity(plan: Plan, group: int | None = None) -> int:
    """Usable memory per device: of the cluster's device, or of a mixed cluster's group."""
    from cost_models.devices import lookup

    headroom = plan.extra.get("workload_full", {}).get("memory_headroom", 0.1)
    device = plan.cluster.groups[group].device if plan.cluster.groups and group is not None \
        else plan.cluster.device
    return int(lookup(device).memory_bytes * (1 - headroom))


def _device_list(ids) -> str:
    ids = list(ids)
    if len(ids) > 2 and ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))

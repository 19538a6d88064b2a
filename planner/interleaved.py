"""Interleaved 1F1B plans: ``pp`` device groups holding ``v`` chunks each, searched exactly
over periodic splits (docs/training.md, "Interleaved 1F1B").

The family: the layers divide into ``v`` rounds (``cost_models.training.round_bounds``,
equal counts, the first rounds one layer shorter when ``v`` does not divide), and every
round is split among the device groups the same way: group ``i`` holds the layers at
offsets ``[s_i, s_{i+1})`` of each round (the last group up to the round's end), so chunk
``r * pp + i`` is group ``i``'s part of round ``r`` and the model's stage order is the
chunk order. A *pattern* is ``[(s_i, tp, recompute_i)]`` per group, ``s_0 = 0``, with one
tp for every group (``codegen.train`` interleaves only pipelines of one tp; 1F1B and GPipe
run stages of different tp).

Per group: ``E_i`` = its chunks' forward + backward (+ recompute) per microbatch; its
memory = workspace + its chunks' model states + the in-flight chunk-microbatches'
activations (``cost_models.training.in_flight`` with ``v``); its tail = the dp
collectives and AdamW update of all its chunks' parameters. Per link (group ``i`` to
``i + 1``, and the last group back to the first, which carries the ``v - 1`` round
changes): the p2p of its hops. The step is ``cost_models.training.interleaved_step_s``,
in integer ticks ``ceil(((m v - 1) max + sum) / v) + T`` (non-decreasing in the sum, the
max and the tail, so a Pareto dynamic programme over ``(group, offset, devices used)`` is
exact: ``best_pattern``). ``planner.reference_solver`` enumerates every pattern instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from cost_models import training as tm
from planner.cost_table import to_ticks
from planner.reference_solver import _front3

__all__ = ["Arc", "chunks_of", "pattern_value", "best_pattern", "stage_counts", "runs"]


def runs(m: int, pp: int) -> bool:
    """Whether torch's ``ScheduleInterleaved1F1B`` runs ``m`` microbatches on ``pp`` groups:
    it runs them in ``max(1, m // pp)`` rounds of equal size."""
    rounds = max(1, m // pp)
    return pp >= 2 and m % rounds == 0


def stage_counts(combo) -> list[int]:
    """The group counts an interleaved combo can have: at least 2, at most the shortest
    round's layers (a chunk holds a layer at least) and what the replica's devices allow,
    where the runtime's schedule runs the combo's microbatches."""
    top = min(tm.shortest_round(combo.num_layers, combo.v), combo.s_max // min(combo.tps))
    pps = [combo.pp] if combo.pp is not None else range(2, top + 1)
    return [pp for pp in pps if 2 <= pp <= top and runs(combo.m, pp)]


def _arrays(combo, t: int) -> list:
    """Per recompute mode with every layer at ``(t, rc)``: (ticks, states, saved) arrays."""
    import numpy as np

    key = ("interleaved_arrays", t)
    if key not in combo.memo:
        table, L, rows = combo.table, combo.num_layers, []
        state = np.array([table.state[j][t] for j in range(L)], dtype=float)
        for rc in combo.rcs:
            if all((t, rc) in combo.ticks[j] for j in range(L)):
                rows.append((np.array([combo.ticks[j][(t, rc)] for j in range(L)], dtype=float),
                             state, np.array([table.saved[j][(t, rc)] for j in range(L)],
                                             dtype=float)))
        combo.memo[key] = rows
    return combo.memo[key]


def memory_floor(combo, pp: int, t: int) -> tuple[int, int] | None:
    """``(floor on max E, floor on sum E)`` of every ``pp``-group pattern at tp ``t``, or
    None when no pattern at ``t`` fits in memory.

    Group ``i`` holds its chunks' states plus ``f_i`` (its in-flight count) times their
    saved activations within ``cap - workspace``; with one recompute mode, its time is at
    most the fractional knapsack of the layers by time per byte within that memory
    (``K_i``, the best mode's). The groups' times add up to at least the layers' fastest
    sum ``F``, so ``sum_i min(max E, K_i) >= F``: the floor is the least such ``max E``
    (relaxed: any group may take any layer, tied copies ignored)."""
    import numpy as np

    key = ("interleaved_memory", pp, t)
    if key in combo.memo:
        return combo.memo[key]
    table, L = combo.table, combo.num_layers
    budget = combo.cap - table.forward.workspace(t)
    flights = np.array([combo.in_flight(i, pp) for i in range(pp)], dtype=float)[:, None]
    rows = _arrays(combo, t)
    best = np.zeros(pp)
    fastest = np.full(L, np.inf)
    at = np.arange(pp)
    for c, state, saved in rows:
        fastest = np.minimum(fastest, c)
        mu = state[None, :] + flights * saved[None, :]
        order = np.argsort(-(c[None, :] / np.maximum(mu, 1.0)), axis=1, kind="stable")
        mus = np.take_along_axis(mu, order, axis=1)
        cs = c[order]
        cum_mu, cum_c = np.cumsum(mus, axis=1), np.cumsum(cs, axis=1)
        whole = (cum_mu <= budget).sum(axis=1)  # layers that fit whole, best ratio first
        last = np.maximum(whole - 1, 0)
        cover = np.where(whole > 0, cum_c[at, last], 0.0)
        room = budget - np.where(whole > 0, cum_mu[at, last], 0.0)
        nxt = np.minimum(whole, L - 1)
        frac = np.clip(room / np.maximum(mus[at, nxt], 1.0), 0.0, 1.0)
        cover = cover + np.where(whole < L, frac * cs[at, nxt], 0.0)
        best = np.maximum(best, cover)
    if not rows or not np.isfinite(fastest).all() or budget <= 0:
        combo.memo[key] = None
        return None
    need = float(fastest.sum())
    caps = np.sort(best)
    if caps.sum() < need * (1 - 1e-12):
        combo.memo[key] = None
        return None
    # least B with sum_i min(B, K_i) >= need: walk the sorted caps
    below, floor = 0.0, need
    for k, cap_k in enumerate(caps):
        rest = pp - k  # groups whose cap is at least cap_k
        b = (need - below) / rest
        if b <= cap_k:
            floor = b
            break
        below += cap_k
    out = (int(math.floor(floor * (1 - 1e-12))), int(need))
    combo.memo[key] = out
    return out


def chunks_of(bounds: list[int], start: int, end: int | None) -> list[tuple[int, int]]:
    """A group's ``(first, last)`` layers in each round: offsets ``[start, end)`` of every
    round, or up to the round's end when ``end`` is None (the last group)."""
    return [(a + start, (a + end if end is not None else b) - 1)
            for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class Arc:
    """One group's chunks at one tp and recompute: its integer figures."""

    chunks: tuple[tuple[int, int], ...]
    tp: int
    rc: str
    ticks: int  # E_i: forward + backward (+ recompute) of one microbatch, all chunks
    tail: int
    memory: int


class _Sums:
    """Prefix sums of a combo's per-layer figures, so that a chunk costs O(1)."""

    def __init__(self, combo) -> None:
        table, L = combo.table, combo.num_layers
        self.ticks, self.missing, self.saved = {}, {}, {}
        for t in combo.tps:
            for rc in combo.rcs:
                acc, gaps, sv = [0], [0], [0]
                for j in range(L):
                    tick = combo.ticks[j].get((t, rc))
                    acc.append(acc[-1] + (tick or 0))
                    gaps.append(gaps[-1] + (tick is None))
                    sv.append(sv[-1] + table.saved[j].get((t, rc), 0))
                self.ticks[(t, rc)], self.missing[(t, rc)], self.saved[(t, rc)] = acc, gaps, sv
        self.params, self.state = {}, {}
        for t in combo.tps:
            pa, st = [0], [0]
            for j in range(L):
                pa.append(pa[-1] + table.params[j].get(t, 0))
                st.append(st[-1] + table.state[j].get(t, 0))
            self.params[t], self.state[t] = pa, st
        fastest, cheapest = [0], [0]  # each layer at its fastest / least tp * time
        for j in range(L):
            row = combo.ticks[j]
            fastest.append(fastest[-1] + (min(row.values()) if row else 0))
            cheapest.append(cheapest[-1] + (min(t * x for (t, _), x in row.items())
                                            if row else 0))
        self.fastest, self.cheapest = fastest, cheapest
        self.borrowers = [j for j in range(L) if any(
            table.forward.borrowed_bytes(j, 0, t) for t in combo.tps)] if L else []


def _sums(combo) -> _Sums:
    if "interleaved_sums" not in combo.memo:
        combo.memo["interleaved_sums"] = _Sums(combo)
    return combo.memo["interleaved_sums"]


def _arc(combo, bounds, i: int, pp: int, start: int, end: int | None, t: int, rc: str):
    """The arc of group ``i`` (of ``pp``), or None when a layer lacks ``(t, rc)`` or it
    does not fit in memory at its in-flight count."""
    chunks = chunks_of(bounds, start, end)
    table, sums = combo.table, _sums(combo)
    key = (t, rc)
    ticks_, gaps, saved_ = sums.ticks[key], sums.missing[key], sums.saved[key]
    params_, state_ = sums.params[t], sums.state[t]
    ticks, nbytes, static, saved = 0, 0, table.forward.workspace(t), 0
    for a, b in chunks:
        if gaps[b + 1] - gaps[a]:
            return None
        ticks += ticks_[b + 1] - ticks_[a]
        nbytes += params_[b + 1] - params_[a]
        static += state_[b + 1] - state_[a]
        saved += saved_[b + 1] - saved_[a]
        for j in sums.borrowers:
            if a <= j <= b:
                nbytes += table.forward.borrowed_bytes(j, a, t)
                static += table.borrowed_state(j, a, t)
    memory = static + combo.in_flight(i, pp) * saved
    if memory > combo.cap:
        return None
    return Arc(tuple(chunks), t, rc, ticks, to_ticks(table.tail_of_bytes(nbytes)), memory)


def _hop(combo, bounds, offset: int, inter: bool) -> int:
    """The link into the group whose chunks start at ``offset`` of each round."""
    hops = combo.hop_inter if inter else combo.hop_intra
    return sum(hops[a + offset - 1] for a in bounds[:-1])


def _wrap(combo, bounds, size: int, per_node: int) -> int:
    """The link from the last group back to the first: the ``v - 1`` round changes."""
    hops = combo.hop_inter if size > per_node else combo.hop_intra
    return sum(hops[b - 1] for b in bounds[1:-1])


def _value(total: int, worst: int, tail: int, m: int, v: int) -> int:
    return -(-((m * v - 1) * worst + total) // v) + tail


def pattern_value(combo, pattern, per_node: int) -> int | None:
    """Integer step time (ticks) of a pattern ``[(start, tp, recompute)]`` (one entry per
    group, ``start`` its offset in each round, the first 0), or None when it breaks a
    constraint (offsets, placement, memory, degrees, replica size)."""
    pp, v = len(pattern), combo.v
    bounds = tm.round_bounds(combo.num_layers, v)
    shortest = tm.shortest_round(combo.num_layers, v)
    starts = [s for s, _, _ in pattern]
    if len({t for _, t, _ in pattern}) > 1:  # the runtime interleaves one tp only
        return None
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)) \
            or starts[-1] >= shortest or not runs(combo.m, pp):
        return None
    values, links, tails, used = [], [], [], 0
    for i, (start, t, rc) in enumerate(pattern):
        if used % per_node + t > per_node:
            return None
        end = starts[i + 1] if i + 1 < pp else None
        arc = _arc(combo, bounds, i, pp, start, end, t, rc)
        if arc is None:
            return None
        values.append(arc.ticks)
        tails.append(arc.tail)
        used += t
        if i + 1 < pp:
            links.append(_hop(combo, bounds, end, used % per_node == 0))
    if used not in combo.sizes or (combo.pp is not None and pp != combo.pp):
        return None
    links.append(_wrap(combo, bounds, used, per_node))
    every = values + links
    return _value(sum(every), max(every), max(tails), combo.m, v)


def best_pattern(combo, pp: int, per_node: int, limit: int | None = None,
                 deadline: float | None = None):
    """``(value, pattern)`` of the best ``pp``-group pattern of the combo with value at
    most ``limit``, None, or ``"timeout"`` when ``time.perf_counter()`` passes ``deadline``
    (checked once per state). Forward over the round offsets with states ``(group, offset,
    devices used, tp)``; a label whose partial value already exceeds ``limit`` is dropped (the
    value only grows)."""
    m, v = combo.m, combo.v
    bounds = tm.round_bounds(combo.num_layers, v)
    shortest = tm.shortest_round(combo.num_layers, v)
    if not 2 <= pp <= shortest or not runs(m, pp):
        return None
    arcs: dict = {}

    def arc(i, start, end, t, rc):
        key = (i, start, end, t, rc)
        if key not in arcs:
            arcs[key] = _arc(combo, bounds, i, pp, start, end, t, rc)
        return arcs[key]

    from planner.training import _tail_floor

    sums, floor = _sums(combo), _tail_floor(combo)
    rounds = list(zip(bounds, bounds[1:], strict=False))

    def rest(prefix, end):  # offsets [end, round end) of every round
        return sum(prefix[b] - prefix[a + end] for a, b in rounds)

    def least(s, w, tl, end, after, left):
        """A floor on the final value of a label that has covered offsets below ``end``
        with ``after`` devices, ``left`` groups to go: the remaining layers at their
        fastest add to the sum and, spread over the groups and devices left, to the max."""
        if left:
            fast, cheap = rest(sums.fastest, end), rest(sums.cheapest, end)
            if combo.s_max <= after:
                return None
            w = max(w, -(-fast // left), -(-cheap // (combo.s_max - after)))
            s += fast
        return _value(s, w, max(tl, floor), m, v)

    # (offset, devices used, the groups' tp) -> labels, group i; one tp for every group
    layer: dict = {(0, 0, None): [(0, 0, 0, None)]}
    for i in range(pp):
        last = i + 1 == pp
        following: dict = {}
        for (start, used, tp), raw in sorted(layer.items(), key=lambda x: x[0][:2]):
            if deadline is not None and time.perf_counter() >= deadline:
                return "timeout"
            front = _front3(raw)
            ends = [None] if last else range(start + 1, shortest - (pp - i - 2))
            for t in combo.tps if tp is None else (tp,):
                if used % per_node + t > per_node or used + t > combo.s_max:
                    continue
                after = used + t
                for rc in combo.rcs:
                    for end in ends:
                        # a longer chunk only costs more time, tail and memory: stop at
                        # the first that does not fit or alone exceeds the limit
                        a = arc(i, start, end, t, rc)
                        if a is None or (limit is not None and _value(
                                a.ticks, a.ticks, max(a.tail, floor), m, v) > limit):
                            break
                        hop = 0 if last else _hop(combo, bounds, end, after % per_node == 0)
                        key = (end if end is not None else shortest, after, t)
                        step = (start, t, rc)
                        for s, w, tl, path in front:
                            label = (s + a.ticks + hop, max(w, a.ticks, hop), max(tl, a.tail),
                                     (step, path))
                            if limit is not None:
                                lb = least(*label[:3], key[0], after, pp - i - 1)
                                if lb is None or lb > limit:
                                    continue
                            following.setdefault(key, []).append(label)
        layer = following
    best = None
    for (_end, used, _tp), raw in layer.items():
        if used not in combo.sizes:
            continue
        wrap = _wrap(combo, bounds, used, per_node)
        for s, w, tl, path in _front3(raw):
            value = _value(s + wrap, max(w, wrap), tl, m, v)
            if (limit is None or value <= limit) and (best is None or value < best[0]):
                best = (value, path)
    if best is None:
        return None
    pattern = []
    path = best[1]
    while path is not None:
        step, path = path
        pattern.append(step)
    return best[0], pattern[::-1]


def pattern_chunks(combo, pattern) -> list[tuple[int, int, int, str, int]]:
    """The plan's stages of a pattern in chunk order: ``(first, last, tp, recompute,
    group)``."""
    pp = len(pattern)
    bounds = tm.round_bounds(combo.num_layers, combo.v)
    per_group = [chunks_of(bounds, s, pattern[i + 1][0] if i + 1 < pp else None)
                 for i, (s, _, _) in enumerate(pattern)]
    out = []
    for r in range(combo.v):
        for i, (_s, t, rc) in enumerate(pattern):
            a, b = per_group[i][r]
            out.append((a, b, t, rc, i))
    return out

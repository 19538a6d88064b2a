"""The parallel layout codegen needs from a plan: dp, stages (layers, tp, devices), microbatches.

One dataclass holds the degrees and validates them in one place; ``from_plan`` reads a
``planner.plan.Plan``. A rank's coordinates (stage, replica, tp rank) come from the
plan's device lists: rank ``d`` runs the stage whose ``devices[replica]`` contains ``d``.

>>> layout = ParallelLayout(dp=1, stages=(StageLayout((0, 2), 2, ((0, 1),)),
...                                       StageLayout((3, 5), 2, ((2, 3),))), microbatches=2)
>>> layout.world_size, layout.coords(3)
(4, RankCoords(stage=1, replica=0, tp_rank=1))
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StageLayout", "ParallelLayout", "RankCoords", "LayoutError"]


class LayoutError(ValueError):
    """Degrees that do not fit together or do not fit the world; spells out every factor."""


@dataclass(frozen=True)
class StageLayout:
    """One pipeline stage: inclusive layer range, tp degree, device ids per replica, and
    the plan's tensor-parallel strategy (``planner.sharding.StageSharding``; ``None`` at
    tp 1, or for a layout built without a plan: then each layer's greedy strategy)."""

    layers: tuple[int, int]
    tp: int
    devices: tuple[tuple[int, ...], ...]
    sharding: object | None = None


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits: its stage, its data-parallel replica, its index in the tp group."""

    stage: int
    replica: int
    tp_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    """dp × pp stages (each with its own tp) × microbatches, with device ids.

    Attributes:
        dp: data-parallel replicas.
        stages: per stage, layers, tp and devices (``devices[replica]`` has ``tp`` ids).
        microbatches: microbatches per replica per step.
        sequence_parallel: reduce-scatter + all-gather around the norms instead of the
            row-parallel all-reduce (stages with tp > 1).
        virtual_stages: stages per device group (interleaved 1F1B): ``stages`` has
            ``pp × virtual_stages`` entries and stage ``i`` runs on the devices of stage
            ``i mod pp`` (``pp`` = the physical stages, ``len(stages) // virtual_stages``).
    """

    dp: int
    stages: tuple[StageLayout, ...]
    microbatches: int = 1
    sequence_parallel: bool = False
    virtual_stages: int = 1

    @classmethod
    def from_plan(cls, plan) -> ParallelLayout:
        """The layout of a ``planner.plan.Plan``."""
        par = plan.parallelism
        stages = tuple(StageLayout(tuple(s.layers), s.tp, tuple(tuple(g) for g in s.devices),
                                   s.sharding) for s in plan.stages)
        return cls(par.dp, stages, par.microbatches, par.sequence_parallel,
                   getattr(par, "virtual_stages", 1))

    @classmethod
    def simple(cls, dp: int, stages: list[tuple[int, int, int]], microbatches: int = 1, *,
               sequence_parallel: bool = False, virtual_stages: int = 1) -> ParallelLayout:
        """Number devices replica-major, then stage, then tp rank: ``stages`` is
        ``[(first, last, tp), ...]``; with ``virtual_stages`` v, stage ``i`` of the
        ``pp × v`` runs on the devices of stage ``i mod pp``."""
        n = len(stages) // virtual_stages
        per_replica = sum(tp for _, _, tp in stages[:n])
        out, base = [], 0
        for i, (first, last, tp) in enumerate(stages):
            if i >= n:
                out.append(StageLayout((first, last), tp, out[i % n].devices))
                continue
            devices = tuple(tuple(r * per_replica + base + k for k in range(tp)) for r in range(dp))
            out.append(StageLayout((first, last), tp, devices))
            base += tp
        return cls(dp, tuple(out), microbatches, sequence_parallel, virtual_stages)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def physical_stages(self) -> tuple[StageLayout, ...]:
        """The first ``len(stages) // virtual_stages`` stages: one per device group."""
        return self.stages[:len(self.stages) // self.virtual_stages]

    def local_stages(self, rank: int) -> list[int]:
        """The stages ``rank`` runs, in order (several with virtual stages)."""
        n = len(self.physical_stages)
        return [i for i in range(len(self.stages)) if i % n == self.coords(rank).stage]

    @property
    def uniform_tp(self) -> bool:
        """Every stage has the same tp (the pipeline can pair tp rank k with tp rank k)."""
        return len({s.tp for s in self.stages}) <= 1

    def boundary_peers(self, rank: int) -> tuple[int | None, tuple[int, ...]]:
        """The rank that sends this rank its stage inputs (``None`` on stage 0) and the ranks
        it sends its stage outputs to (empty on the last stage).

        Stage outputs are replicated across the stage's tp group (after the row-parallel
        all-reduce), so rank ``j`` of the next stage receives them from rank
        ``j % tp_prev`` of this stage: with tp 2 -> 1, tp rank 0 sends and tp rank 1 only
        computes; with tp 1 -> 2, the single rank sends to both.
        """
        me = self.coords(rank)
        stage = self.stages[me.stage]
        recv_from = None
        if me.stage > 0:
            prev = self.stages[me.stage - 1]
            recv_from = prev.devices[me.replica][me.tp_rank % prev.tp]
        send_to: tuple[int, ...] = ()
        if me.stage + 1 < self.pp:
            nxt = self.stages[me.stage + 1].devices[me.replica]
            send_to = tuple(d for j, d in enumerate(nxt) if j % stage.tp == me.tp_rank)
        return recv_from, send_to

    @property
    def world_size(self) -> int:
        return self.dp * sum(s.tp for s in self.physical_stages)

    @property
    def stage_layers(self) -> list[tuple[int, int]]:
        return [s.layers for s in self.stages]

    def coords(self, rank: int) -> RankCoords:
        """Stage, replica and tp rank of global ``rank``.

        Raises:
            LayoutError: the rank appears in no stage.
        """
        for i, stage in enumerate(self.stages):
            for r, group in enumerate(stage.devices):
                if rank in group:
                    return RankCoords(i, r, group.index(rank))
        raise LayoutError(f"rank {rank} runs no stage of this plan (world size "
                          f"{self.world_size})")

    def validate(self, world_size: int | None = None) -> None:
        """Check the degrees against each other and the world size.

        Raises:
            LayoutError: naming every factor (``dp 2 × Σtp 4 = 8 ≠ world size 4``).
        """
        errors = []
        for i, s in enumerate(self.stages):
            if len(s.devices) != self.dp:
                errors.append(f"stage {i} lists {len(s.devices)} replicas for dp {self.dp}")
            if any(len(g) != s.tp for g in s.devices):
                errors.append(f"stage {i} has a replica whose device count is not tp {s.tp}")
        physical = self.physical_stages
        if self.virtual_stages < 1 or len(self.stages) % self.virtual_stages:
            errors.append(f"{len(self.stages)} stages are not pp × virtual_stages "
                          f"{self.virtual_stages}")
        for i, s in enumerate(self.stages[len(physical):], start=len(physical)):
            if s.devices != physical[i % len(physical)].devices:
                errors.append(f"stage {i} runs on {[list(g) for g in s.devices]} but a virtual "
                              f"stage runs on the devices of stage {i % len(physical)}")
        for r in range(self.dp if self.uniform_tp else 0):
            for k in range(self.stages[0].tp if self.stages else 0):
                chain = [s.devices[r][k] for s in physical if r < len(s.devices)
                         and k < len(s.devices[r])]
                if chain != sorted(chain):
                    errors.append(f"replica {r}, tp rank {k}: stage devices {chain} must increase "
                                  "with the stage index")
        ranks = [d for s in physical for g in s.devices for d in g]
        if len(ranks) != len(set(ranks)):
            errors.append(f"a device runs more than one stage or replica: {sorted(ranks)}")
        if world_size is not None and world_size != self.world_size:
            tps = " + ".join(str(s.tp) for s in physical)
            errors.append(f"dp {self.dp} × (tp per stage {tps}) = {self.world_size} ≠ world size "
                          f"{world_size}; launch with --nproc-per-node {self.world_size}")
        if errors:
            raise LayoutError("; ".join(errors))

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
    """One pipeline stage: inclusive layer range, tp degree, device ids per replica."""

    layers: tuple[int, int]
    tp: int
    devices: tuple[tuple[int, ...], ...]


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
        sequence_parallel: asked by the plan; not implemented by codegen (refused).
    """

    dp: int
    stages: tuple[StageLayout, ...]
    microbatches: int = 1
    sequence_parallel: bool = False

    @classmethod
    def from_plan(cls, plan) -> ParallelLayout:
        """The layout of a ``planner.plan.Plan``."""
        par = plan.parallelism
        stages = tuple(StageLayout(tuple(s.layers), s.tp, tuple(tuple(g) for g in s.devices))
                       for s in plan.stages)
        return cls(par.dp, stages, par.microbatches, par.sequence_parallel)

    @classmethod
    def simple(cls, dp: int, stages: list[tuple[int, int, int]], microbatches: int = 1
               ) -> ParallelLayout:
        """Number devices replica-major, then stage, then tp rank: ``stages`` is
        ``[(first, last, tp), ...]``."""
        per_replica = sum(tp for _, _, tp in stages)
        out, base = [], 0
        for first, last, tp in stages:
            devices = tuple(tuple(r * per_replica + base + k for k in range(tp)) for r in range(dp))
            out.append(StageLayout((first, last), tp, devices))
            base += tp
        return cls(dp, tuple(out), microbatches)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def world_size(self) -> int:
        return self.dp * sum(s.tp for s in self.stages)

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
        if self.sequence_parallel:
            errors.append("sequence_parallel is true but codegen does not implement sequence "
                          "parallelism yet; re-plan with sequence parallelism off")
        for i, s in enumerate(self.stages):
            if len(s.devices) != self.dp:
                errors.append(f"stage {i} lists {len(s.devices)} replicas for dp {self.dp}")
            if any(len(g) != s.tp for g in s.devices):
                errors.append(f"stage {i} has a replica whose device count is not tp {s.tp}")
        if self.pp > 1 and len({s.tp for s in self.stages}) > 1:
            errors.append(f"stage tp degrees {[s.tp for s in self.stages]} differ; the pipeline "
                          "runtime pairs rank k of one stage with rank k of the next, so every "
                          "stage needs the same tp")
        for r in range(self.dp):
            for k in range(self.stages[0].tp if self.stages else 0):
                chain = [s.devices[r][k] for s in self.stages if r < len(s.devices)
                         and k < len(s.devices[r])]
                if chain != sorted(chain):
                    errors.append(f"replica {r}, tp rank {k}: stage devices {chain} must increase "
                                  "with the stage index")
        if world_size is not None and world_size != self.world_size:
            tps = " + ".join(str(s.tp) for s in self.stages)
            errors.append(f"dp {self.dp} × (tp per stage {tps}) = {self.world_size} ≠ world size "
                          f"{world_size}; launch with --nproc-per-node {self.world_size}")
        if errors:
            raise LayoutError("; ".join(errors))

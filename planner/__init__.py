"""fx-planner: automatic parallelism planning for PyTorch models.

>>> import planner
>>> planner.Cluster.parse("2x8xH100").num_devices
16
"""

from planner.api import plan
from planner.arch import ModelArch
from planner.cluster import DEFAULT_CLUSTER, Cluster, SpecError, Workload
from planner.cost_table import CostTable, LayerCost
from planner.layers import CrossingTensor, CutPoint, Layer, OpStats
from planner.models.loader import ModelLoadError
from planner.plan import Plan, PlanFormatError
from planner.reference_solver import solve_reference
from planner.solver import InfeasiblePlanError, PlanError, solve
from planner.tracing import TracedModel, TraceError, trace

#: The exceptions that mean "the input is wrong"; each message says what to change. The CLI
#: prints them as one ``error: ...`` paragraph and exits 2 (docs/architecture.md, Errors).
USER_ERRORS = (SpecError, ModelLoadError, TraceError, PlanError, PlanFormatError)


def parallelize(model, plan, args=(), kwargs=None, **options):
    """Inside a torchrun rank: this rank's part of ``model`` under ``plan`` (its pipeline
    stage, tensor-parallel shard and data-parallel slice), ready to call with the global
    batch. See ``codegen.runtime.parallelize`` for the options."""
    from codegen.runtime import parallelize as _parallelize

    return _parallelize(model, plan, args, kwargs, **options)


__all__ = [
    "trace",
    "parallelize",
    "plan",
    "Plan",
    "PlanError",
    "InfeasiblePlanError",
    "PlanFormatError",
    "solve",
    "solve_reference",
    "CostTable",
    "LayerCost",
    "TracedModel",
    "TraceError",
    "Layer",
    "CutPoint",
    "CrossingTensor",
    "OpStats",
    "ModelArch",
    "Cluster",
    "Workload",
    "SpecError",
    "ModelLoadError",
    "USER_ERRORS",
    "DEFAULT_CLUSTER",
]

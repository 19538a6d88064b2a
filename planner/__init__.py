"""fx-planner: automatic parallelism planning for PyTorch models.

>>> import planner
>>> planner.Cluster.parse("2x8xH100").num_devices
16
"""

from planner.arch import ModelArch
from planner.cluster import Cluster, SpecError, Workload
from planner.layers import CrossingTensor, CutPoint, Layer, OpStats
from planner.tracing import TracedModel, TraceError, trace

__all__ = [
    "trace",
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
]

"""The training step's cost and memory model: one module, used by the solver, the plan's
``predicted``, the baselines and ``plan show`` (formulas in docs/training.md).

Everything here prices plain numbers (a layer's forward seconds, parameter bytes, a
collective's bytes) with the package's existing models: the roofline (``work_time``) for
the optimizer's memory-bound update, ``layer_cost.comm_time`` (NCCL's algorithm choice on
GPUs, alpha-beta or measured fits elsewhere) for every data-parallel collective.

Per layer and microbatch (``layer_step_s``)::

    forward  = c + k                      c: forward kernels, k: its tp collectives
    backward = 2c + k                     2x the forward FLOPs by the roofline; the tp
                                          collectives of backward are forward's conjugates,
                                          the same bytes
    recompute: none +0, selective +a (the attention core's forward), full +c +k
    ZeRO-3: + 2 all-gathers of the layer's parameter shard over dp (forward, backward)

Where the layer's forward + backward was measured on the device (the profiler's
``TrainTiming``, scaled to the tp rank like a measured forward), that time ``f`` replaces
the kernels' ``3c``: ``f + 2k + recompute + gathers``, with ``c`` the (measured) forward.

Per stage and step, after the pipeline has drained (``stage_tail_s``): the gradient
all-reduce (ZeRO 0/1) or reduce-scatter (2/3) over dp, the parameter all-gather that
ZeRO 1/2 need after the sharded update, and the AdamW update of the local shard. The
runtime runs these collectives after backward, so none of them is assumed to overlap
compute.

>>> state_bytes_per_param("bfloat16")
(2, 2, 12)
>>> model_state_bytes(1000, "bfloat16", zero=3, dp=4)   # (2 + 2 + 12) * 1000 / 4
4000
>>> in_flight("1f1b", stage=0, pp=4, microbatches=8), in_flight("1f1b", 3, 4, 8)
(4, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cost_models.devices import DeviceSpec
from cost_models.roofline import Efficiencies, OpWork, work_time

__all__ = [
    "ZERO_LEVELS",
    "TRAIN_SCHEDULES",
    "RECOMPUTE",
    "state_bytes_per_param",
    "model_state_bytes",
    "layer_step_s",
    "saved_activation_bytes",
    "optimizer_s",
    "dp_collectives",
    "stage_tail_s",
    "in_flight",
    "pipeline_step_s",
    "interleaved_step_s",
    "round_bounds",
    "shortest_round",
    "model_flops_per_step",
]

ZERO_LEVELS = (0, 1, 2, 3)
TRAIN_SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "selective", "full")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: AdamW per parameter: flops of the update (m, v, bias corrections, decay, the step).
ADAMW_FLOPS_PER_PARAM = 12


def state_bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """``(parameter, gradient, optimizer state)`` bytes per parameter under AdamW.

    Mixed precision (bf16/fp16): 2-byte parameters and gradients, and an fp32 master copy
    with m and v: 12 bytes. fp32 training: 4 + 4, and m + v: 8 bytes.
    """
    p = _DTYPE_BYTES[dtype]
    return (p, p, 12 if p < 4 else 8)


def model_state_bytes(params: int, dtype: str, zero: int, dp: int) -> int:
    """Bytes of parameters, gradients and optimizer states one device holds for ``params``
    parameters (its tensor-parallel shard): ZeRO-1 shards the optimizer states over ``dp``,
    ZeRO-2 the gradients too, ZeRO-3 the parameters too (ceil: a shard is whole elements)."""
    p, g, o = state_bytes_per_param(dtype)
    return (math.ceil(params * p / (dp if zero >= 3 else 1))
            + math.ceil(params * g / (dp if zero >= 2 else 1))
            + math.ceil(params * o / (dp if zero >= 1 else 1)))


def layer_step_s(forward_compute_s: float, forward_comm_s: float, recompute: str,
                 attention_s: float = 0.0, zero3_gather_s: float = 0.0,
                 forward_backward_s: float | None = None) -> float:
    """One microbatch through a layer, forward and backward (module docstring).

    Args:
        forward_compute_s: the forward's kernels on one rank (``layer_cost.compute_s``).
        forward_comm_s: the forward's tensor-parallel collectives (``layer_cost.comm_s``).
        recompute: ``none``, ``selective`` or ``full``.
        attention_s: the forward of the layer's attention core (selective recompute).
        zero3_gather_s: one all-gather of the layer's parameter shard over dp (ZeRO-3;
            paid in forward and again in backward).
        forward_backward_s: the forward and backward kernels as measured on the device;
            None: the roofline's ``3 * forward_compute_s``.
    """
    extra = {"none": 0.0, "selective": attention_s,
             "full": forward_compute_s + forward_comm_s}[recompute]
    kernels = 3 * forward_compute_s if forward_backward_s is None else forward_backward_s
    return kernels + 2 * forward_comm_s + extra + 2 * zero3_gather_s


def saved_activation_bytes(produced: int, layer_input: int, attention: int,
                           recompute: str) -> int:
    """Bytes one microbatch leaves saved for backward in a layer.

    Args:
        produced: every tensor the layer's forward produces (what autograd keeps).
        layer_input: the layer's input (all that full recompute keeps).
        attention: the tensors of the attention core (SDPA / the softmax-matmul region;
            what selective recompute does not keep).
        recompute: ``none``, ``selective`` or ``full``.
    """
    if recompute == "full":
        return layer_input
    if recompute == "selective":
        return max(produced - attention, layer_input)
    return produced


def optimizer_s(params: int, dtype: str, efficiencies: Efficiencies,
                runtime: str = "eager") -> float:
    """AdamW update of ``params`` parameters (one device's shard) by the roofline: read the
    fp32 master (or the fp32 parameter), the gradient, m and v; write master, m, v and,
    under mixed precision, the low-precision parameter copy."""
    if params <= 0:
        return 0.0
    p, g, o = state_bytes_per_param(dtype)
    master = 4 if p < 4 else 0
    read = params * (g + o + (0 if master else p))
    written = params * (o + p)
    work = {"elementwise": OpWork(1, ADAMW_FLOPS_PER_PARAM * params, read, written)}
    return work_time(work, efficiencies, "float32", runtime)


def dp_collectives(param_bytes: int, dtype: str, zero: int) -> list[tuple[str, int]]:
    """The data-parallel collectives of one step after backward, ``[(kind, bytes)]``, for a
    stage holding ``param_bytes`` (its tp shard, in the training dtype) per device.

    ZeRO 0: all-reduce of the gradients; 1: all-reduce, then all-gather of the updated
    parameters; 2: reduce-scatter, then all-gather; 3: reduce-scatter (parameters are
    gathered per microbatch instead, ``layer_step_s``)."""
    grads = param_bytes  # gradients have the parameters' dtype and size
    first = ("all_reduce" if zero <= 1 else "reduce_scatter", grads)
    return [first] if zero in (0, 3) else [first, ("all_gather", param_bytes)]


def stage_tail_s(param_bytes: int, dtype: str, zero: int, dp: int, device: DeviceSpec,
                 efficiencies: Efficiencies, *, link: str, runtime: str = "eager",
                 calibration=None) -> float:
    """A stage's work after the pipeline drains: its dp collectives and its AdamW update.

    Args:
        param_bytes: the stage's parameter bytes per device at its tp (training dtype).
        zero: ZeRO level; dp: data-parallel degree (no collective at 1).
        link: ``intra`` when every dp peer is on the same node, else ``inter``.
    """
    from cost_models.layer_cost import comm_time  # layer_cost imports this module's users

    params = param_bytes // _DTYPE_BYTES[dtype]
    shard = math.ceil(params / dp) if zero >= 1 else params
    total = optimizer_s(shard, dtype, efficiencies, runtime)
    if dp > 1 and param_bytes > 0:
        total += sum(comm_time(kind, nbytes, dp, device, link=link, calibration=calibration)
                     for kind, nbytes in dp_collectives(param_bytes, dtype, zero))
    return total


def in_flight(schedule: str, stage: int, pp: int, microbatches: int,
              virtual_stages: int = 1) -> int:
    """Microbatches whose activations stage ``stage`` (0-based, of ``pp``) holds at its peak.

    GPipe runs every forward before any backward: ``m``. 1F1B: ``min(pp - stage, m)``.
    Interleaved 1F1B with ``v`` chunks per device (Megatron-LM's warm-up): a device holds
    ``min((pp - stage - 1) * 2 + (v - 1) * pp + 1, m * v)`` chunk-microbatches; divided by
    ``v`` that is per chunk (rounded up).
    """
    m = microbatches
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(pp - stage, m)
    v = virtual_stages
    chunks = min((pp - stage - 1) * 2 + (v - 1) * pp + 1, m * v)
    return -(-chunks // v)


def pipeline_step_s(stage_s: Sequence[float], hops_s: Sequence[float], tails_s: Sequence[float],
                    microbatches: int) -> float:
    """Step time of one replica: the forward-backward pipeline of ``m`` microbatches (the
    exact flow-shop makespan the inference solver uses, ``sum E + (m - 1) max E`` over
    stage times and p2p hops, each hop both directions), then the slowest stage's tail.
    For uniform stages this is ``(m + pp - 1)`` slots of one stage: the GPipe/1F1B bubble."""
    values = list(stage_s) + list(hops_s)
    return sum(values) + (microbatches - 1) * max(values) + max(tails_s, default=0.0)


def interleaved_step_s(device_s: Sequence[float], links_s: Sequence[float],
                       tails_s: Sequence[float], microbatches: int, virtual_stages: int) -> float:
    """Step time of one replica under interleaved 1F1B with ``v`` chunks per device group.

    ``device_s[i]``: device group ``i``'s forward + backward of one microbatch through all
    its chunks; ``links_s``: each link's p2p per microbatch (all its hops, both
    directions; the link from the last group back to the first included). The bottleneck
    works ``m`` microbatches; the fill and drain cost one *chunk* of every other group,
    ``1/v`` of its time (Narayanan et al. 2021: the bubble shrinks by ``v``)::

        step = (m - 1/v) max E + (sum E) / v + T

    ``v = 1`` is ``pipeline_step_s``'s flow shop; uniform groups of ``t`` give
    Megatron-LM's ``m t + (pp - 1) t / v``.

    >>> interleaved_step_s([4.0, 4.0], [], [0.0], microbatches=8, virtual_stages=2)
    34.0
    """
    values = list(device_s) + list(links_s)
    v = virtual_stages
    return (microbatches - 1 / v) * max(values) + sum(values) / v + max(tails_s, default=0.0)


def round_bounds(num_layers: int, virtual_stages: int) -> list[int]:
    """Where each round of an interleaved split starts (and, last, ``num_layers``): ``v``
    rounds of ``num_layers / v`` layers, the first ones one shorter when it does not
    divide. Each round is split among the pp device groups the same way.

    >>> round_bounds(10, 3)
    [0, 3, 6, 10]
    """
    v = virtual_stages
    return [r * num_layers // v for r in range(v)] + [num_layers]


def shortest_round(num_layers: int, virtual_stages: int) -> int:
    """Layers in the shortest round of ``round_bounds`` (the first: ``num_layers // v``),
    the most groups a periodic split can have."""
    return num_layers // virtual_stages


def model_flops_per_step(forward_flops: float) -> float:
    """Model FLOPs of a training step: forward plus a backward of twice its FLOPs, no
    recompute (the MFU convention)."""
    return 3.0 * forward_flops

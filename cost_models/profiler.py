"""The on-device profiler: measured time and peak memory of every layer of a traced model.

``profile_model`` cuts the traced graph into one small GraphModule per layer (the layer's
nodes; values from other layers become placeholders, parameters stay attributes), feeds
each the tensors a full run produced, and times it: ``warmup`` calls, then ``repeats``
timed calls with a fixed intra-op thread count, taken as rounds of ``ROUND_CALLS``
consecutive calls. The layer's time (``LayerProfile.time_s``) is the lowest round
median: on a shared host (a VM whose vCPU is descheduled for tens of milliseconds at a
time) a whole round runs slow, so the median of all calls moves by tens of percent between
runs while the best round stays within a few percent; noise only ever adds time. The
median and the 10th-90th percentile range of all calls are kept as the spread. For the
breakdown (and the roofline calibration) an ``fx.Interpreter`` subclass times every node
of the full graph, around the op call only, ``node_repeats`` times; a node's time is its
fastest call.

Peak memory is *measured*, not derived from shapes: one call of each layer runs under
``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
of the c10 CPU (or CUDA) allocator; the running sum's maximum is the layer's peak of
newly allocated bytes (its temporaries and outputs, including buffers inside ATen kernels
that no graph node shows). On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.

With ``train=True`` every layer is also timed forward + backward (``TrainTiming``, what
a training step runs per layer and microbatch): the same GraphModule and inputs, its
floating inputs and its parameters requiring grad, the forward under autograd and then
``torch.autograd.grad`` of its differentiable outputs (a fixed random gradient per output)
with respect to both, in the same interleaved rounds and with the same statistics as the
forward. It costs a backward per call, so it is measured only when asked.

Results are cached on disk, one JSON file per (layer signature, device fingerprint):
the signature hashes the layer's ops, shapes, dtypes and wiring (not node names, so the
identical blocks of a transformer share one measurement), the fingerprint the CPU/GPU
model, torch version and thread count. Forward + backward timings are stored under a
key of their own, so inference profiles written before (or without) them stay valid. A
second run is a pure cache read.

>>> # profile = profile_model(traced, args=(ids,), progress=lambda done, total, name, hit: ...)
"""

from __future__ import annotations

import operator
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from cost_models.cache import (
    cache_dir,
    device_fingerprint,
    fingerprint_key,
    read_record,
    write_record,
)
from cost_models.roofline import OpSample

if TYPE_CHECKING:
    from cost_models.types import TracedModelLike

__all__ = [
    "NodeTiming",
    "TrainTiming",
    "LayerProfile",
    "ModelProfile",
    "ProgressHook",
    "profile_model",
    "profile_models",
    "layer_signatures",
    "measure_peak_bytes",
    "best_round",
    "ROUND_CALLS",
]

_SCHEMA = "fx-planner/profile/v2"
_TRAIN_SCHEMA = "fx-planner/profile-train/v1"

# Consecutive calls per timing round; the layer's time is the lowest round median.
ROUND_CALLS = 5

# progress(done, total, layer_name, from_cache)
ProgressHook = Callable[[int, int, str, bool], None]


@dataclass(frozen=True)
class NodeTiming:
    """One node's time inside a full run, with the work ``planner.op_stats`` gives it.

    Attributes:
        median_s: median over the interpreter runs.
        best_s: fastest of them (the undisturbed time the roofline is fitted to).
    """

    name: str
    op: str
    op_class: str
    flops: float
    bytes: float
    median_s: float
    best_s: float


@dataclass(frozen=True)
class TrainTiming:
    """Measured forward + backward of one layer at the traced shape (one microbatch of a
    training step): the forward under autograd, then the gradients of its parameters and
    of its floating inputs. Same statistics as ``LayerProfile``.

    Attributes:
        median_s, p10_s, p90_s: of all timed calls.
        best_s: lowest median of ``ROUND_CALLS`` consecutive calls (``time_s``).
        repeats: timed calls.
    """

    median_s: float
    p10_s: float
    p90_s: float
    best_s: float
    repeats: int

    @property
    def time_s(self) -> float:
        """Forward + backward for the cost model: the best-round time."""
        return self.best_s


@dataclass(frozen=True)
class LayerProfile:
    """Measured cost of one layer at the traced shape.

    Attributes:
        index, name: the layer.
        signature: hash of its ops, shapes and wiring (the cache key with the device).
        median_s: median time of one call over all timed calls.
        p10_s, p90_s: 10th and 90th percentile of the timed calls.
        best_s: lowest median of ``ROUND_CALLS`` consecutive calls (``time_s``).
        repeats: timed calls.
        peak_alloc_bytes: largest total of bytes allocated during one call above what
            existed before it (temporaries and outputs).
        input_bytes: bytes of the tensors the layer receives from earlier layers.
        nodes: per-node breakdown from the interpreter run.
        cached: read from the cache rather than measured in this run.
        train: forward + backward timing (``profile_models(train=True)``), else None.
    """

    index: int
    name: str
    signature: str
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int
    best_s: float
    peak_alloc_bytes: int
    input_bytes: int
    nodes: tuple[NodeTiming, ...] = ()
    cached: bool = False
    train: TrainTiming | None = None

    @property
    def time_s(self) -> float:
        """The layer's time for the cost model: its undisturbed (best-round) time."""
        return self.best_s

    @property
    def spread(self) -> float:
        """(p90 − p10) / median."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s else 0.0


@dataclass(frozen=True)
class ModelProfile:
    """Every layer's measurement, and the device they were taken on."""

    device: str
    fingerprint: dict
    layers: tuple[LayerProfile, ...]

    @property
    def total_s(self) -> float:
        return sum(layer.time_s for layer in self.layers)

    @property
    def cache_hits(self) -> int:
        return sum(layer.cached for layer in self.layers)

    def op_samples(self) -> list[OpSample]:
        """Every timed node as a roofline calibration sample (``calibrate_device``)."""
        return [
            OpSample(n.op_class, n.flops, n.bytes, n.best_s)
            for layer in self.layers
            for n in layer.nodes
            if n.best_s > 0
        ]


# --------------------------------------------------------------------------- signatures


def _meta_desc(value) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, (list, tuple)):
        return [_meta_desc(v) for v in value]
    return type(value).__name__


def _arg_desc(arg, local: dict[str, int]) -> Any:
    if isinstance(arg, fx.Node):
        if arg.name in local:
            return f"%{local[arg.name]}"
        return ["in", _meta_desc(arg.meta.get("val"))]
    if isinstance(arg, (list, tuple)):
        return [_arg_desc(a, local) for a in arg]
    if isinstance(arg, dict):
        return {k: _arg_desc(v, local) for k, v in sorted(arg.items())}
    return repr(arg)


def _layer_nodes(traced: TracedModelLike) -> list[list[fx.Node]]:
    nodes: list[list[fx.Node]] = [[] for _ in traced.layers]
    for node in traced.graph_module.graph.nodes:
        j = traced.layer_of_node.get(node.name)
        if j is not None and j < len(nodes):
            nodes[j].append(node)
    return nodes


def layer_signatures(traced: TracedModelLike) -> list[str]:
    """A hash per layer of its ops, argument shapes/dtypes and internal wiring."""
    gm = traced.graph_module
    out = []
    for nodes in _layer_nodes(traced):
        local = {n.name: i for i, n in enumerate(nodes)}
        desc = []
        for n in nodes:
            if n.op == "get_attr":
                desc.append(["param", _meta_desc(operator.attrgetter(n.target)(gm))])
                continue
            target = n.target if n.op != "call_module" else type(gm.get_submodule(n.target)).__name__
            desc.append([n.op, str(target), _meta_desc(n.meta.get("val")),
                         _arg_desc(n.args, local), _arg_desc(n.kwargs, local)])  # fmt: skip
        out.append(fingerprint_key(desc))
    return out


# --------------------------------------------------------------------------- running


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Placeholder values for ``gm`` given the model's ``args``/``kwargs``."""
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((args, kwargs), in_spec))
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    return values


class _NodeTimer(fx.Interpreter):
    """Runs the graph, timing each op call (not the interpreter's own bookkeeping) and
    keeping the values that cross layers."""

    def __init__(self, gm: fx.GraphModule, keep: set[str], sync: Callable[[], None]):
        super().__init__(gm)
        self.keep = keep
        self.kept: dict[str, Any] = {}
        self.times: dict[str, float] = {}
        self._sync = sync

    def _timed(self, fn, *args, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self._sync()
        self.times[self._current] = time.perf_counter() - t0
        return out

    def run_node(self, n: fx.Node) -> Any:
        self._current = n.name
        out = super().run_node(n)
        if n.name in self.keep:
            self.kept[n.name] = out
        return out

    def call_function(self, target, args, kwargs):
        return self._timed(target, *args, **kwargs)

    def call_method(self, target, args, kwargs):
        self_obj, *rest = args
        return self._timed(getattr(self_obj, target), *rest, **kwargs)

    def call_module(self, target, args, kwargs):
        return self._timed(self.fetch_attr(target), *args, **kwargs)


def _layer_module(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> tuple[fx.GraphModule, list[str]]:
    """A GraphModule running ``nodes`` alone; returns it and the names of the outside
    values it takes as placeholders, in order."""
    members = {n.name for n in nodes}
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs: list[str] = []

    def lookup(src: fx.Node) -> fx.Node:
        if src.name not in env:
            if src.op == "get_attr":  # parameters stay attributes, never inputs
                env[src.name] = graph.get_attr(src.target)
            else:
                env[src.name] = graph.placeholder(f"in_{len(inputs)}")
                inputs.append(src.name)
        return env[src.name]

    outputs = []
    for n in nodes:
        if n.op == "output":
            outputs.extend(a for a in n.all_input_nodes)
            continue
        if n.op == "placeholder":
            lookup(n)
            continue
        for src in n.all_input_nodes:
            if src.name not in members or src.name not in env:
                if src.name not in members:
                    lookup(src)
        env[n.name] = graph.node_copy(n, lambda a: env[a.name] if a.name in env else lookup(a))
        if any(u.name not in members or u.op == "output" for u in n.users):
            outputs.append(n)
    graph.output(tuple(env[o.name] if o.name in env else lookup(o) for o in outputs))
    return fx.GraphModule(gm, graph), inputs


def _sync_for(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def _tensor_bytes(values) -> int:
    seen, total = set(), 0
    for v in values:
        for t in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def measure_peak_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes newly allocated during ``fn()`` (its temporaries and outputs).

    CPU: the running sum of the allocator events ``torch.profiler`` records with
    ``profile_memory=True``. CUDA: ``torch.cuda.max_memory_allocated`` above the start.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            running += e.nbytes()
            peak = max(peak, running)
    return int(peak)


def best_round(times: np.ndarray, round_calls: int = ROUND_CALLS) -> float:
    """Lowest median of ``round_calls`` consecutive timings (all of them if fewer)."""
    if len(times) < round_calls:
        return float(np.median(times))
    rounds = len(times) // round_calls
    return float(min(np.median(times[i * round_calls:(i + 1) * round_calls]) for i in range(rounds)))


# --------------------------------------------------------------------------- cache


def _record_path(root: Path, fingerprint: dict, signature: str, settings: dict) -> Path:
    return root / "profile" / fingerprint_key(fingerprint, settings) / f"{signature}.json"


def _to_record(p: LayerProfile) -> dict:
    d = asdict(p)
    d.pop("cached")
    d.pop("train")  # stored under its own key (``_train_settings``)
    return d


def _train_settings(settings: dict) -> dict:
    """The cache key of forward + backward timings: the forward's settings and what is
    measured, so the two never read each other's records."""
    return {**settings, "schema": _TRAIN_SCHEMA, "measure": "forward+backward"}


def _from_record(d: dict, index: int, name: str) -> LayerProfile:
    nodes = tuple(NodeTiming(**n) for n in d.pop("nodes"))
    d.update(index=index, name=name)
    return LayerProfile(**d, nodes=nodes, cached=True)


# --------------------------------------------------------------------------- entry point


def profile_model(
    traced: TracedModelLike,
    args: tuple = (),
    kwargs: dict | None = None,
    **options,
) -> ModelProfile:
    """Measure every layer of ``traced`` on ``device`` (cached on disk).

    Args:
        traced: from ``planner.trace`` (its graph module must hold real weights, not meta).
        args, kwargs: the example inputs the model was traced with.
        **options: those of ``profile_models``.

    Returns:
        The model's profile, layers in order.
    """
    return profile_models([(traced, args, kwargs)], **options)[0]


def profile_models(
    items: Sequence[tuple[TracedModelLike, tuple, dict | None]],
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 50,
    node_repeats: int = 5,
    min_time_s: float | None = None,
    threads: int | None = None,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: ProgressHook | None = None,
    train: bool = False,
) -> list[ModelProfile]:
    """Measure every layer of several traced models, their timing rounds interleaved.

    Each round times ``ROUND_CALLS`` calls of every layer not yet measured, in turn, and
    (for the first ``node_repeats`` rounds) one interpreter run of each model for the
    per-node breakdown. Interleaving spreads every layer's rounds over the whole
    measurement, so a slow spell of the host (seconds long on a shared VM) hits all
    layers alike and each still gets undisturbed rounds.

    Args:
        items: ``(traced, args, kwargs)`` per model; each graph module must hold real
            weights (not meta) and the example inputs it was traced with.
        device: ``"cpu"`` or ``"cuda"``; models and inputs must already live there.
        warmup: untimed calls per layer before timing.
        repeats: timed calls per layer, in rounds of ``ROUND_CALLS``.
        node_repeats: interpreter runs per model for the per-node breakdown.
        min_time_s: keep adding rounds until the measurement has lasted this long.
            Default: 2 s on CPU (longer than the slow spells seen on a shared VM), 0 on
            CUDA.
        threads: intra-op threads, set for the run and part of the cache key. Default on
            CPU: 1 (each rank of a ``Nxcpu`` cluster runs one thread, and on a shared host
            a multi-threaded op stalls whenever one of its threads is descheduled);
            elsewhere ``torch.get_num_threads()``.
        cache: cache directory (default ``$FX_PLANNER_CACHE`` or ``./.fx-planner-cache``).
        use_cache: read cached layers (measurements are written either way).
        progress: called as ``progress(done, total, layer_name, from_cache)``; ``done``
            counts layers (measured layers advance with the rounds).
        train: also time every layer forward + backward (``LayerProfile.train``), in the
            same rounds; cached under a key of its own.

    Returns:
        One profile per item, layers in order.
    """
    if min_time_s is None:
        min_time_s = 2.0 if device == "cpu" else 0.0
    threads = threads or (1 if device == "cpu" else torch.get_num_threads())
    fingerprint = device_fingerprint(device, threads)
    settings = {"warmup": warmup, "repeats": repeats, "min_time_s": min_time_s,
                "schema": _SCHEMA}  # fmt: skip
    root = cache_dir(cache)
    models = []
    for traced, args, kwargs in items:
        if getattr(traced, "folded", False):
            raise ValueError(
                f"{traced.name} was traced folded (a few blocks copied); profile a model traced "
                "with real weights and fold_blocks=False"
            )
        models.append(_ModelRun(traced, tuple(args), dict(kwargs or {}), layer_signatures(traced),
                                train=train))
    train_settings = _train_settings(settings)
    total = sum(len(m.traced.layers) for m in models)
    done = 0
    for m in models:
        if not use_cache:
            continue
        for j, layer in enumerate(m.traced.layers):
            data = read_record(_record_path(root, fingerprint, m.signatures[j], settings), _SCHEMA,
                               fingerprint)  # fmt: skip
            if data is None:
                continue
            try:
                m.results[j] = _from_record(data, j, layer.name)
            except (TypeError, KeyError) as e:
                warnings.warn(f"ignoring malformed cached profile of {layer.name}: {e}",
                              stacklevel=2)  # fmt: skip
                continue
            if train:
                data = read_record(_record_path(root, fingerprint, m.signatures[j],
                                                train_settings), _TRAIN_SCHEMA, fingerprint)
                try:
                    m.trains[j] = TrainTiming(**data) if data is not None else None
                except TypeError as e:
                    warnings.warn(f"ignoring malformed cached training profile of "
                                  f"{layer.name}: {e}", stacklevel=2)
                if m.trains.get(j) is None:
                    m.trains.pop(j, None)
                    continue
            done += 1
            if progress:
                progress(done, total, layer.name, True)
    pending = [m for m in models if len(m.results) < len(m.traced.layers)
               or (train and len(m.trains) < len(m.traced.layers))]
    if pending:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            fresh, fresh_train = _measure(pending, device, warmup, repeats, node_repeats,
                                          min_time_s, progress, done, total)
        finally:
            torch.set_num_threads(prev_threads)
        for p in fresh:
            write_record(_record_path(root, fingerprint, p.signature, settings), _SCHEMA,
                         _to_record(p), fingerprint)  # fmt: skip
        for signature, timing in fresh_train:
            write_record(_record_path(root, fingerprint, signature, train_settings),
                         _TRAIN_SCHEMA, asdict(timing), fingerprint)
    return [
        ModelProfile(device, fingerprint, tuple(
            replace(m.results[j], train=m.trains[j]) if train else m.results[j]
            for j in range(len(m.traced.layers))))
        for m in models
    ]


@dataclass
class _ModelRun:
    traced: TracedModelLike
    args: tuple
    kwargs: dict
    signatures: list[str]
    results: dict[int, LayerProfile] = field(default_factory=dict)
    node_runs: list[dict[str, float]] = field(default_factory=list)
    train: bool = False  # forward + backward timings asked for
    trains: dict[int, TrainTiming] = field(default_factory=dict)


@dataclass
class _Job:
    """One layer (the first of its signature in its model) being timed: its forward, or
    (``call`` set) its forward + backward."""

    run: _ModelRun
    index: int
    nodes: list[fx.Node]  # the layer's nodes in the full graph (for the per-node breakdown)
    module: fx.GraphModule
    values: list
    times: list[float] = field(default_factory=list)
    call: Callable[[], Any] | None = None  # forward + backward; None: the forward

    def __call__(self) -> Any:
        return self.call() if self.call is not None else self.module(*self.values)


def _forward_backward(module: fx.GraphModule, values: list) -> Callable[[], Any]:
    """A call of ``module`` forward and backward on ``values``: floating inputs and the
    parameters are what the gradients are taken with respect to; each differentiable
    output gets a fixed random gradient (drawn once, seed 0). A layer none of whose
    outputs depends on them (a mask, positions) runs its forward alone."""
    inputs = [v.detach().requires_grad_(True)
              if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]
    params = [p for p in module.parameters() if p.is_floating_point()]
    wrt = [v for v in inputs if isinstance(v, torch.Tensor) and v.requires_grad] + params

    def differentiable():
        return [o for o in pytree.tree_leaves(module(*inputs))
                if isinstance(o, torch.Tensor) and o.requires_grad]

    with torch.enable_grad():
        shapes = [(o.shape, o.dtype, o.device) for o in differentiable()]
    if not shapes:
        return lambda: module(*inputs)
    gen = torch.Generator(device=shapes[0][2]).manual_seed(0)
    grads = [torch.randn(shape, dtype=dtype, device=dev, generator=gen)
             for shape, dtype, dev in shapes]

    def call():
        with torch.enable_grad():
            return torch.autograd.grad(differentiable(), wrt, grads, allow_unused=True)

    return call


def _timing(times: np.ndarray) -> dict:
    return {"median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90)), "best_s": best_round(times),
            "repeats": len(times)}


def _measure(models: list[_ModelRun], device, warmup, repeats, node_repeats, min_time_s,
             progress, done, total) -> tuple[list[LayerProfile], list[tuple[str, TrainTiming]]]:
    """Time the uncached layers of ``models`` (forward, and forward + backward where
    asked); returns the fresh measurements (one per signature per model) after filling
    each model's ``results`` and ``trains``."""
    sync = _sync_for(device)
    jobs: list[_Job] = []
    train_jobs: list[_Job] = []
    timers: list[tuple[_ModelRun, fx.GraphModule, list]] = []
    params_grad: dict[int, tuple[torch.Tensor, bool]] = {}  # restored at the end
    try:
        with torch.no_grad():
            for m in models:
                gm = m.traced.graph_module
                per_layer = _layer_nodes(m.traced)
                n = len(m.traced.layers)
                todo = [j for j in range(n) if j not in m.results]
                todo_train = [j for j in range(n) if m.train and j not in m.trains]
                modules = {j: _layer_module(gm, per_layer[j]) for j in {*todo, *todo_train}}
                keep = {name for _, inputs in modules.values() for name in inputs}
                flat = _flat_inputs(gm, m.args, m.kwargs)
                timer = _NodeTimer(gm, keep, sync)
                timer.run(*flat, enable_io_processing=False)  # the values crossing layers
                if todo:
                    timers.append((m, gm, flat))
                for js, out, train in ((todo, jobs, False), (todo_train, train_jobs, True)):
                    seen: set[str] = set()
                    for j in js:
                        if m.signatures[j] in seen:
                            continue
                        seen.add(m.signatures[j])
                        module, inputs = modules[j]
                        values = [timer.kept[name] for name in inputs]
                        job = _Job(m, j, per_layer[j], module, values)
                        if train:
                            for p in module.parameters():
                                if p.is_floating_point():
                                    params_grad.setdefault(id(p), (p, p.requires_grad))
                                    p.requires_grad_(True)
                            job.call = _forward_backward(module, values)
                        out.append(job)
            everything = jobs + train_jobs
            for job in everything:
                for _ in range(warmup):
                    job()
            sync()
            rounds = max(-(-repeats // ROUND_CALLS), node_repeats, 1)
            start = time.perf_counter()
            r = 0
            while r < rounds or time.perf_counter() - start < min_time_s:
                if r < max(node_repeats, 1):
                    for m, gm, flat in timers:
                        timer = _NodeTimer(gm, set(), sync)
                        timer.run(*flat, enable_io_processing=False)
                        m.node_runs.append(timer.times)
                for job in everything:
                    for _ in range(ROUND_CALLS):
                        t0 = time.perf_counter()
                        job()
                        sync()
                        job.times.append(time.perf_counter() - t0)
                r += 1
                if progress and r <= rounds:  # every model here has a layer to time
                    last = everything[-1]
                    name = last.run.traced.layers[last.index].name
                    progress(done + (total - done) * r // rounds, total, name, False)

            fresh: list[LayerProfile] = []
            by_key: dict[tuple[int, str], LayerProfile] = {}
            for job in jobs:
                m, j = job.run, job.index
                ir = getattr(m.traced, "graph", None)
                p = LayerProfile(
                    index=j, name=m.traced.layers[j].name, signature=m.signatures[j],
                    **_timing(np.asarray(job.times)),
                    peak_alloc_bytes=measure_peak_bytes(job, device),
                    input_bytes=_tensor_bytes(job.values),
                    nodes=tuple(
                        _node_timing(n, ir, [run[n.name] for run in m.node_runs if n.name in run])
                        for n in job.nodes
                        if n.op.startswith("call_")
                    ),
                )  # fmt: skip
                fresh.append(p)
                by_key[(id(m), m.signatures[j])] = p
            fresh_train: list[tuple[str, TrainTiming]] = []
            train_by_key: dict[tuple[int, str], TrainTiming] = {}
            for job in train_jobs:
                m, j = job.run, job.index
                timing = TrainTiming(**_timing(np.asarray(job.times)))
                fresh_train.append((m.signatures[j], timing))
                train_by_key[(id(m), m.signatures[j])] = timing
    finally:
        for p, flag in params_grad.values():
            p.requires_grad_(flag)
    for m in models:
        for j, layer in enumerate(m.traced.layers):
            if m.train and j not in m.trains:
                m.trains[j] = train_by_key[(id(m), m.signatures[j])]
            if j in m.results:
                continue
            p = by_key[(id(m), m.signatures[j])]
            m.results[j] = p if p.index == j else replace(
                p, index=j, name=layer.name, cached=True)  # an identical block, timed once
    return fresh, fresh_train


def _node_timing(node: fx.Node, ir, times: list[float]) -> NodeTiming:
    attrs = ir.nodes[node.name] if ir is not None and node.name in ir.nodes else {}
    return NodeTiming(
        name=node.name,
        op=str(attrs.get("name", node.target)),
        op_class=attrs.get("op_class", "other"),
        flops=float(attrs.get("flops", 0)),
        bytes=float(attrs.get("bytes_read", 0) + attrs.get("bytes_written", 0)),
        median_s=float(np.median(times)) if times else 0.0,
        best_s=float(min(times)) if times else 0.0,
    )



"""The ``plan`` command.

Usage:
    plan llama-3-70b --cluster 2x8xH100 --batch 8 --seq 2048 --json
    plan hf:llama --set num_hidden_layers=2 --set hidden_size=64 --cluster 4xcpu
    plan path/to/model.py:make_model --cluster 8xH100
    plan devices
"""

from __future__ import annotations

import argparse
import difflib
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import replace

from rich.console import Console
from rich.table import Table

__all__ = ["main"]

_SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}


def _subcommand(name: str):
    def register(fn):
        _SUBCOMMANDS[name] = fn
        return fn

    return register


class _UsageError(Exception):
    pass


_NO_HELP = "\x00"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: ``(default: 8xH100)``, ``(default: off)``
    for flags, ``(default: none)`` for options that are unset unless given."""

    def _get_help_string(self, action):
        help = "" if action.help in (None, _NO_HELP) else action.help
        if not action.option_strings or "default" in help or action.default is argparse.SUPPRESS:
            return help
        if action.default is False:
            shown = "off"
        elif action.default is None or action.default == []:
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{help} (default: {shown})".strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if kwargs.get("help") is None and args and str(args[0]).startswith("-"):
            kwargs["help"] = _NO_HELP  # the formatter replaces it with the default
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):  # exit 2 with one paragraph, as every other error
        print(f"error: {message} (`{self.prog} --help` lists the options and their defaults)",
              file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _count(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _model_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="plan",
        description="Plan how to split MODEL across a cluster (dp x pp x tp), provably optimal "
        "under the cost model. Subcommands: " + ", ".join(sorted(_SUBCOMMANDS)) + ".",
    )
    p.add_argument("model", metavar="MODEL",
                   help="preset (gpt2, llama-3-70b, ...), hf:<model_type>, file.py:factory or module:factory")
    from cost_models.runtime import RUNTIMES
    from planner.cluster import DEFAULT_CLUSTER, OBJECTIVES, PHASES

    p.add_argument("--cluster", default=DEFAULT_CLUSTER,
                   help="8xH100, 2x8xA100-80GB, 4xcpu, or a cluster JSON file")
    p.add_argument("--batch", type=int, default=1, help="global batch size (sequences)")
    p.add_argument("--seq", type=int, default=None,
                   help="sequence length (default: min(2048, the model's positions))")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: float32 on cpu clusters, else bfloat16)")
    p.add_argument("--phase", default="prefill", choices=list(PHASES),
                   help="prefill (a full-sequence forward), decode (one token, KV cache) or "
                        "train (one optimizer step over the global --batch; docs/training.md)")
    p.add_argument("--objective", default="latency", choices=list(OBJECTIVES),
                   help="latency of one batch or steady-state throughput")
    p.add_argument("--context", type=int, default=None, help="KV-cache length for decode (default: --seq)")
    p.add_argument("--runtime", default=None, choices=list(RUNTIMES),
                   help="how the step runs, which the cost model prices: eager, compiled "
                        "(torch.compile) or cudagraphs (compiled and captured; no CPU launch "
                        "per kernel) (default: cudagraphs for decode and eager for prefill on "
                        "GPU clusters, eager on cpu clusters)")
    p.add_argument("--tp", type=_positive_int, default=None,
                   help="pin the tensor-parallel degree of every stage (default: chosen by the solver)")
    p.add_argument("--pp", type=_positive_int, default=None,
                   help="pin the number of pipeline stages (default: chosen by the solver)")
    p.add_argument("--dp", type=_positive_int, default=None,
                   help="pin the number of data-parallel replicas (default: chosen by the solver)")
    p.add_argument("--microbatches", type=_positive_int, default=None,
                   help="pin the microbatch count (default: chosen by the solver)")
    from cost_models.training import RECOMPUTE, TRAIN_SCHEDULES, ZERO_LEVELS
    from planner.cluster import OPTIMIZERS

    p.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                   help="train: the optimizer a step runs (its states are in the memory model)")
    p.add_argument("--zero", type=int, default=None, choices=list(ZERO_LEVELS),
                   help="train: pin the ZeRO level over dp (0 DDP, 1 optimizer states, "
                        "2 + gradients, 3 + parameters/FSDP; default: chosen by the solver)")
    p.add_argument("--schedule", default=None, choices=list(TRAIN_SCHEDULES),
                   help="train: pin the pipeline schedule (default: 1f1b, which dominates gpipe)")
    p.add_argument("--virtual-stages", type=_positive_int, default=None,
                   help="train: stages per device group (interleaved 1F1B)")
    p.add_argument("--recompute", default=None, choices=list(RECOMPUTE),
                   help="train: pin activation recomputation on every stage (default: chosen "
                        "per stage by the solver)")
    p.add_argument("--sp", default="auto", choices=["auto", "on", "off"],
                   help="sequence parallelism: auto searches both (prefill), on/off forces it")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free")
    from planner.engines import TARGETS

    p.add_argument("--target", default=None, choices=list(TARGETS),
                   help="search only the plans this engine can express (one tp for every "
                   "stage, its head split, its sequence parallelism and layer split), and "
                   "report what the unrestricted plan would gain")
    p.add_argument("--solver", default="cp-sat", choices=["cp-sat", "reference"],
                   help="cp-sat or the exact dynamic-programming reference")
    p.add_argument("--time-limit", type=_positive_float, default=60.0,
                   help="solver time limit, seconds")
    p.add_argument("--alternatives", type=_count, default=6,
                   help="other (dp, pp, tp) families to solve for `plan explain` (0: none)")
    p.add_argument("--profile", action="store_true",
                   help="measure layer times on this machine's device (with --phase train: "
                   "forward and forward + backward) and use them where they apply")
    p.add_argument("--layers-only", action="store_true",
                   help="print the traced layer table and stop (no cost model, no solver)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for presets and hf: models; repeat for several")
    p.add_argument("--device", default="meta", choices=["meta", "cpu"],
                   help="where to build the model for tracing (meta allocates no weights)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write the plan file (fx-planner/plan/v2 JSON), atomically; missing "
                        "folders are created (default: none, the plan is only printed)")
    p.add_argument("--force", action="store_true",
                   help="let --out overwrite an existing file that is not a plan")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `plan ... --json | head` ends quietly
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SUBCOMMANDS:
        return _run_guarded(lambda: _SUBCOMMANDS[argv[0]](argv[1:]))
    if argv and _looks_like_a_subcommand(argv[0]):
        close = difflib.get_close_matches(argv[0], list(_SUBCOMMANDS), n=1)[0]
        _print_error(_UsageError(
            f"{argv[0]!r} is neither a subcommand nor a model. Did you mean "
            f"`plan {close}`? Subcommands: {', '.join(sorted(_SUBCOMMANDS))}."))
        return 2
    args = _model_parser().parse_args(argv)
    return _run_guarded(lambda: _plan_model(args))


def _looks_like_a_subcommand(word: str) -> bool:
    from planner.models.presets import PRESETS

    if word.startswith("-") or ":" in word or word in PRESETS:
        return False
    return bool(difflib.get_close_matches(word, list(_SUBCOMMANDS), n=1, cutoff=0.75))


def _run_guarded(fn: Callable[[], int]) -> int:
    """Turn the errors a user can fix into one paragraph on stderr and exit code 2.

    They are ``planner.USER_ERRORS`` (bad model, trace, cluster/workload, pins, plan file),
    the CLI's own usage errors, and ``OSError`` (a file that cannot be read or written).
    Anything else is a bug and keeps its traceback.
    """
    from planner import USER_ERRORS

    try:
        return fn()
    except (*USER_ERRORS, _UsageError, OSError) as e:
        _print_error(e)
        return 2


def _print_error(e: BaseException) -> None:
    from rich.markup import escape

    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    text = " ".join(text.split())  # one paragraph, whatever the message's own line breaks
    Console(stderr=True, emoji=False).print(f"[bold red]error:[/] {escape(text)}",
                                            highlight=False, soft_wrap=True)


def _refuse_groups(plan, command: str, verb: str = "run") -> None:
    """A plan for a mixed cluster (``cluster.groups``) is refused by the commands that
    start or export ranks: they lay ranks out on nodes of one size and one device type."""
    if plan.cluster.groups:
        groups = "+".join(f"{g.nodes}x{g.devices_per_node}x{g.device}"
                          for g in plan.cluster.groups)
        raise _UsageError(f"{command} does not {verb} plans for mixed clusters yet: this "
                          f"plan's cluster has node groups {groups}, and {command} lays ranks "
                          f"out on nodes of one size and device type. Plan for one group (e.g. "
                          f"--cluster {groups.split('+')[0]}) to {verb} it")


def _console() -> Console:
    """A console at least 120 columns wide, so tables stay readable when piped."""
    width = Console().width
    return Console(width=max(width, 120), emoji=False)  # `hf:llama:...` is not an emoji


def _plan_model(args: argparse.Namespace) -> int:
    from planner.api import decode_step_for, plan_traced
    from planner.cluster import Cluster, Workload
    from planner.models.loader import load_model, parse_set
    from planner.tracing import trace

    cluster = Cluster.parse(args.cluster)
    if cluster.is_mixed:
        from planner.hetero import mixed_request_error

        if (why := mixed_request_error(cluster, args.phase)) is not None:
            raise _UsageError(why)
        if args.target is not None:
            raise _UsageError(f"--target {args.target} lays a plan out on one device type; "
                              f"engines take no mixed cluster ({cluster.spec_string}): drop "
                              f"--target, or plan for one group (e.g. --cluster "
                              f"{cluster.groups[0].spec_string})")
    overrides = parse_set(args.set)
    cpu = cluster.groups[0].device == "cpu"  # a mixed cluster's groups share one backend
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    workload = Workload(batch_size=args.batch, seq_len=args.seq if args.seq is not None else 2048,
                        dtype=dtype, phase=args.phase, objective=args.objective,
                        context_len=args.context, memory_headroom=args.headroom,
                        runtime=args.runtime, optimizer=args.optimizer).with_runtime(cluster)
    if args.out is not None and args.layers_only:
        raise _UsageError("--out writes a plan and --layers-only stops before planning: drop one")
    if args.target is not None:
        from planner.engines import TRAINING_TARGETS, training_error

        if (args.target in TRAINING_TARGETS) != (args.phase == "train"):
            raise _UsageError(str(training_error(args.target, args.phase, "this request",
                                                 request=True)))
        if args.solver == "reference":
            raise _UsageError("--target searches with the cp-sat solver (one proof per "
                              "restricted family); drop --solver reference")
    out = _check_out_file(args.out, args.force)  # before the slow part, so it fails fast
    loaded = load_model(args.model, overrides, batch_size=args.batch, seq_len=args.seq,
                        dtype=workload.torch_dtype, device=args.device,
                        context_len=args.context if args.phase == "decode" else None)
    if args.seq is None:  # the model's default length (e.g. GPT-2's 1024 positions)
        workload = replace(workload, seq_len=_example_seq_len(loaded, workload.seq_len))
    traced = trace(loaded.model, loaded.args, loaded.kwargs, name=loaded.name, arch=loaded.arch)
    if args.layers_only:
        if args.json:
            print(json.dumps({"model": traced.to_dict(), "cluster": cluster.to_dict(),
                              "workload": workload.to_dict()}, indent=2))
        else:
            _print_layer_table(traced, cluster)
        return 0
    if args.profile and cluster.is_mixed:
        raise _UsageError(f"--profile measures this machine's cpu as the one device of a "
                          f"cluster, but {cluster.spec_string} mixes node groups; drop --profile "
                          f"or plan for an Nxcpu cluster")
    if args.profile and cluster.device != "cpu":
        raise _UsageError(f"--profile measures this machine's cpu, but the cluster's devices are "
                          f"{cluster.device}; drop --profile or plan for an Nxcpu cluster")
    profile = _profile_here(args, overrides, workload) if args.profile else None
    pins = {k: v for k, v in (("tp", args.tp), ("pp", args.pp), ("dp", args.dp),
                                ("microbatches", args.microbatches)) if v is not None}
    training = {k: v for k, v in (("zero", args.zero), ("schedule", args.schedule),
                                  ("virtual_stages", args.virtual_stages),
                                  ("recompute", args.recompute)) if v is not None}
    if training and workload.phase != "train":
        flags = ", ".join("--" + k.replace("_", "-") for k in training)
        raise _UsageError(f"{flags} describe a training step; add --phase train or drop them")
    if args.optimizer != "adamw" and workload.phase != "train":
        raise _UsageError("--optimizer describes a training step; add --phase train or drop it")
    pins.update(training)
    source = {"model": args.model, "overrides": overrides}
    decode_traced = None
    if workload.phase == "decode":
        with _status(args, "tracing the decode step"):
            decode_traced = decode_step_for(loaded.model, traced, workload, cluster)
    sp = {"auto": None, "on": True, "off": False}[args.sp]
    with _status(args, "solving"):
        plan = plan_traced(traced, cluster, workload, pins=pins, solver=args.solver,
                           profile=profile, alternatives=args.alternatives,
                           time_limit_s=args.time_limit, source=source,
                           sequence_parallel=sp, decode_traced=decode_traced,
                           target=args.target)
        if args.target is not None:  # what the restriction costs: the unrestricted optimum
            free = plan_traced(traced, cluster, workload, pins=pins, solver=args.solver,
                               profile=profile, alternatives=0, time_limit_s=args.time_limit,
                               source=source, sequence_parallel=sp,
                               decode_traced=decode_traced)
            plan = replace(plan, extra={**plan.extra, "target": _target_record(plan, free,
                                                                               args.target)})
    replaced = out is not None and out.exists()
    if out is not None:
        plan.save(out)  # atomic: a temporary file in the same folder, then renamed
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        from planner.report import render_plan

        render_plan(plan, _console())
        if args.target is not None:
            _console().print(_target_line(plan.extra["target"]), highlight=False)
        if out is not None:
            what = "replacing the plan that was there; " if replaced else ""
            _console().print(f"plan written to {out} ({what}show it again with `plan show {out}`)")
    return 0


def _target_record(plan, free, target: str) -> dict:
    """``plan.extra["target"]``: the engine, and the unrestricted plan next to this one."""
    def family(p) -> dict:
        return {"dp": p.parallelism.dp, "pp": p.parallelism.pp,
                "tp": [s.tp for s in p.stages], "sequence_parallel":
                p.parallelism.sequence_parallel, "objective": p.solver.objective,
                "status": p.solver.status}

    return {"name": target, "restricted": family(plan), "unrestricted": family(free),
            "ratio": plan.solver.objective / free.solver.objective}


def _target_line(record: dict) -> str:
    from planner.units import fmt_seconds

    mine, free = record["restricted"], record["unrestricted"]

    def shape(f: dict) -> str:
        tps = sorted(set(f["tp"]))
        tp = "/".join(map(str, f["tp"])) if len(tps) > 1 else str(tps[0])
        return (f"dp {f['dp']} x pp {f['pp']} x tp {tp}"
                + (", sequence parallel" if f["sequence_parallel"] else ""))

    gain = ("the restriction costs nothing here" if record["ratio"] <= 1 else
            f"without the restriction the objective would be {record['ratio']:.3f}x smaller")
    return (f"target {record['name']}: this plan ({shape(mine)}, {fmt_seconds(mine['objective'])}"
            f", {mine['status']}) is the best {record['name']} can express; the unrestricted "
            f"optimum is {shape(free)}, {fmt_seconds(free['objective'])} ({free['status']}): "
            f"{gain}")


def _check_out_file(out: str | None, force: bool):
    """The ``--out`` plan file, checked before anything slow runs: not empty, not a
    directory or a special file, in a place that can be written (missing folders are created
    when the plan is saved), and not an existing file that is not a plan unless ``--force``.
    """
    import os
    from pathlib import Path

    from planner.plan import is_plan_file

    if out is None:
        return None
    if not out.strip():
        raise _UsageError("--out is empty; give the plan file to write, e.g. --out plan.json")
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir():
        raise _UsageError(f"--out {out} is a directory; --out names the plan file to write, "
                          f"e.g. --out {path / 'plan.json'}")
    if path.exists() and not path.is_file():
        raise _UsageError(f"--out {out} exists and is not a regular file; choose another name")
    if path.is_file() and not force and not is_plan_file(path):
        raise _UsageError(f"--out {out} exists and is not a plan file; pass --force to "
                          "overwrite it, or choose another name")
    _check_writable(out, path.absolute().parent, "write")
    return path


def _check_out_dir(out: str) -> None:
    """``plan compile --out``: a directory, existing or creatable here; never a file."""
    from pathlib import Path

    if not out.strip():
        raise _UsageError("--out is empty; give the directory to write the sources into, "
                          "e.g. --out build/")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise _UsageError(f"--out {out} is an existing file; `plan compile` writes one source "
                          "file per stage into a directory: give a directory name, e.g. "
                          f"--out {path.with_suffix('')}_build/")
    _check_writable(out, path.absolute(), "create")


def _check_writable(out: str, folder, verb: str) -> None:
    """``folder`` (a ``Path``), or the nearest of its ancestors that exists (the missing
    ones are created when writing), is a directory this process can create entries in."""
    import os
    import tempfile

    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _UsageError(f"cannot {verb} --out {out}: {ancestor} is not a directory")
    try:  # the only reliable test of "can I write here" (permissions, read-only mounts, root)
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".plan-out-probe-"))
    except OSError as e:
        raise _UsageError(f"cannot write --out {out}: creating a file in {ancestor} failed "
                          f"({e.strerror or e}); choose a folder you can write to") from None


def _example_seq_len(loaded, default: int) -> int:
    shapes = [t.shape for t in list(loaded.args) + list(loaded.kwargs.values()) if hasattr(t, "shape")]
    return int(shapes[0][1]) if shapes and len(shapes[0]) >= 2 else default


class _status:
    """A spinner on stderr while something slow runs (tables go to stdout untouched)."""

    def __init__(self, args, what: str) -> None:
        self.enabled = not getattr(args, "json", False) and sys.stderr.isatty()
        self.what = what

    def __enter__(self):
        if self.enabled:
            self.ctx = Console(stderr=True).status(self.what + "...")
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.ctx.__exit__(*exc)
        return False


def _profile_here(args, overrides, workload):
    """Profile the model on this machine at the workload's microbatch-1 shape (cpu); a
    train workload also times every layer forward + backward."""
    from planner.models.loader import load_model
    from planner.tracing import trace

    loaded = load_model(args.model, overrides, batch_size=args.batch, seq_len=args.seq,
                        dtype=workload.torch_dtype, device="cpu")
    traced = trace(loaded.model, loaded.args, loaded.kwargs, name=loaded.name, arch=loaded.arch)
    return _run_profile(traced, loaded, train=workload.phase == "train")


def _run_profile(traced, loaded, min_time_s: float | None = None, train: bool = False):
    from rich.progress import Progress

    from cost_models.profiler import profile_model

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("profiling layers", total=len(traced.layers))

        def progress(done, total, name, cached):
            bar.update(task, completed=done, description=f"profiling {name}{' (cached)' if cached else ''}")

        return profile_model(traced, loaded.args, loaded.kwargs, progress=progress,
                             min_time_s=min_time_s, train=train)  # fmt: skip


def _print_layer_table(traced, cluster) -> None:
    from planner.units import fmt_bytes, fmt_count, fmt_flops

    console = _console()
    table = Table(title=f"{traced.name}: {len(traced.layers)} layers "
                  f"({traced.tracer}{', folded' if traced.folded else ''}), fingerprint {traced.fingerprint}")
    for col in ("#", "layer", "ops", "params", "FLOPs", "activations", "cut bytes", "crossing"):
        table.add_column(col, justify="right" if col not in ("layer", "crossing") else "left")
    for layer in traced.layers:
        cut = traced.cuts[layer.index] if layer.index < len(traced.cuts) else None
        ops = sum(s.count for c, s in layer.op_stats.items() if c != "view")
        roles = sorted({t.role for t in cut.tensors}) if cut else []
        table.add_row(str(layer.index), layer.name, str(ops), fmt_bytes(layer.param_bytes),
                      fmt_flops(layer.flops), fmt_bytes(layer.activation_bytes),
                      fmt_bytes(cut.bytes) if cut else "-", ", ".join(roles))
    console.print(table)
    console.print(
        f"parameters: {fmt_count(traced.num_params)} ({fmt_bytes(traced.param_bytes)} in {traced.dtype}), "
        f"forward FLOPs: {fmt_flops(traced.flops)}, inputs {traced.input_shapes}; "
        f"cluster {cluster.spec_string} ({cluster.num_devices} devices)"
    )


@_subcommand("devices")
def _devices(argv: list[str]) -> int:
    from cost_models.devices import DEVICES
    from planner.units import fmt_bytes

    p = _Parser(prog="plan devices", description="The device catalogue.")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        print(json.dumps({name: {k: v for k, v in vars(d).items()} for name, d in DEVICES.items()}, indent=2))
        return 0
    table = Table(title="device catalogue")
    for col in ("device", "bf16 TFLOP/s", "fp32 TFLOP/s", "memory", "mem BW", "intra-node BW", "inter-node BW"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for d in DEVICES.values():
        table.add_row(d.name, f"{d.peak_flops.get('bfloat16', 0) / 1e12:.1f}",
                      f"{d.peak_flops.get('float32', 0) / 1e12:.1f}", fmt_bytes(d.memory_bytes),
                      f"{d.memory_bandwidth / 1e9:.0f} GB/s", f"{d.intra_node_bandwidth / 1e9:.0f} GB/s",
                      f"{d.inter_node_bandwidth / 1e9:.0f} GB/s")
    _console().print(table)
    return 0


@_subcommand("run")
def _run(argv: list[str]) -> int:
    import math

    from codegen.check import RunInterrupted, run_check
    from planner.plan import Plan

    p = _Parser(prog="plan run", description="Launch a plan with torchrun on this machine "
                "(gloo on CPU, nccl on GPUs), run it and the unsharded model on the same "
                "inputs, and print the error and the measured times next to the prediction.")
    p.add_argument("plan_file")
    p.add_argument("--check", action="store_true",
                   help="exit non-zero if any output differs from the unsharded model beyond --tol")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs error allowed (float32)")
    p.add_argument("--model", default=None, help="MODEL the plan was made for (default: the "
                   "one recorded in the plan file)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=600, help="wall-clock limit for the job, s")
    p.add_argument("--collective-timeout", type=float, default=60,
                   help="seconds a collective may wait before the job fails")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed steps after the first (checked) one: median and best reported")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="decode plans: prompt tokens (default: the plan's context minus "
                   "--new-tokens)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="decode plans: greedy tokens to generate after the prompt (default 16)")
    p.add_argument("--steps", type=int, default=None,
                   help="train plans: AdamW steps, each loss compared with single-process "
                   "training of the same model on the same batches (default 3)")
    p.add_argument("--json", action="store_true",
                   help="print the report (error or tokens, measured and predicted times, "
                   "per stage and end to end) as one JSON object")
    p.add_argument("--nnodes", type=_positive_int, default=1,
                   help="machines the plan runs on; each runs `plan run` with the same plan, "
                   "--nnodes and --rdzv-endpoint, and starts the ranks of one node")
    p.add_argument("--node-rank", type=_count, default=0,
                   help="this machine's node, 0..nnodes-1 (node 0 hosts the rendezvous)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="where the nodes' torchrun agents meet (torchrun's c10d rendezvous): "
                   "node 0's address and a free port; needed with --nnodes > 1")
    p.add_argument("--rdzv-id", default=None,
                   help="run id shared by the nodes of one job (default: from the plan's "
                   "fingerprint)")
    args = p.parse_args(argv)
    # --nnodes/--node-rank/--rdzv-endpoint agree, before the plan is read
    if args.node_rank >= args.nnodes:
        raise _UsageError(f"--node-rank {args.node_rank} is not a node of --nnodes "
                          f"{args.nnodes}: node ranks are 0..{args.nnodes - 1}")
    if args.nnodes > 1 and args.rdzv_endpoint is None:
        raise _UsageError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, where the "
                          "nodes meet: node 0's address and a free port, the same on every node")
    if args.rdzv_endpoint is None and (args.node_rank or args.rdzv_id):
        raise _UsageError("--node-rank and --rdzv-id belong to a multi-node run: add "
                          "--nnodes N --rdzv-endpoint HOST:PORT, or drop them")
    if args.rdzv_endpoint is not None:
        from codegen.launch import LaunchError, parse_endpoint

        try:
            parse_endpoint(args.rdzv_endpoint)
        except LaunchError as e:
            raise _UsageError(str(e)) from None
    if args.repeats < 0:
        raise _UsageError(f"--repeats must be >= 0, got {args.repeats}")
    if not args.tol >= 0:  # also refuses nan
        raise _UsageError(f"--tol must be a max abs error >= 0, got {args.tol}")
    for flag, value in (("--timeout", args.timeout), ("--collective-timeout", args.collective_timeout)):
        if not 0 < value < math.inf:
            raise _UsageError(f"{flag} must be a number of seconds > 0, got {value}")
    try:
        plan = Plan.load(args.plan_file)
        _refuse_groups(plan, "plan run")
        new_tokens, steps = _run_lengths(args, plan)
        if plan.workload.phase == "decode":
            from codegen.check import generation_lengths

            try:
                generation_lengths(plan, args.prompt_len, new_tokens)
            except ValueError as e:
                raise _UsageError(str(e)) from None
        model, overrides = _planned_model(args, plan)
        if args.rdzv_endpoint is not None:
            from codegen.launch import LaunchError, node_layout

            try:
                node_layout(plan.parallelism.dp * sum(s.tp for s in plan.stages[:plan.parallelism.pp]),
                            nodes=plan.cluster.nodes,
                            devices_per_node=plan.cluster.devices_per_node, nnodes=args.nnodes)
            except LaunchError as e:
                raise _UsageError(str(e)) from None
        _check_runnable_here(plan, model, overrides, nnodes=args.nnodes)
        status = run_check(args.plan_file, model, overrides,
                           tol=args.tol if args.check else math.inf, timeout_s=args.timeout,
                           collective_timeout_s=args.collective_timeout, repeats=args.repeats,
                           check_first=False, error_prefix="error: ",
                           prompt_len=args.prompt_len, new_tokens=new_tokens, steps=steps,
                           json_output=args.json, nnodes=args.nnodes, node_rank=args.node_rank,
                           rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    except RunInterrupted as e:  # every rank process has been ended
        print(f"error: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted; no rank process was running (the job had not started or "
              "had ended), none is left", file=sys.stderr)
        return 130
    return status  # on failure run_check has printed which rank failed and why, and the log


def _run_lengths(args, plan) -> tuple[int, int]:
    """``--new-tokens`` (decode plans) and ``--steps`` (train plans), each refused on a plan
    of another phase."""
    phase = plan.workload.phase
    if args.steps is not None and phase != "train":
        raise _UsageError(f"--steps runs optimizer steps of a train plan; {args.plan_file} is "
                          f"a {phase} plan. Drop --steps, or make a train plan with "
                          "`plan MODEL --phase train --out plan.json`")
    if args.new_tokens is not None and phase != "decode":
        raise _UsageError(f"--new-tokens generates with a decode plan; {args.plan_file} is a "
                          f"{phase} plan" + (": use --steps K for a train plan's optimizer "
                                             "steps" if phase == "train" else
                                             "; drop --new-tokens"))
    if args.steps is not None and args.steps < 1:
        raise _UsageError(f"--steps must be >= 1, got {args.steps}")
    return (16 if args.new_tokens is None else args.new_tokens,
            3 if args.steps is None else args.steps)


def _planned_model(args, plan) -> tuple[str, dict]:
    """MODEL and --set overrides: from the command line, else as recorded in the plan file."""
    from planner.models.loader import parse_set

    source = plan.extra.get("source") or {}
    model = args.model or source.get("model")
    if not model:
        raise _UsageError(f"{args.plan_file} does not record its model (it was made with the "
                          "Python API); pass --model MODEL and the --set overrides used")
    overrides = parse_set(args.set) if args.set is not None else source.get("overrides", {})
    return model, overrides


def _check_runnable_here(plan, model: str, overrides: dict, nnodes: int = 1) -> None:
    """Refuse, before any rank starts, a plan that cannot run here: the wrong device or
    dtype, an invalid plan, a model that does not trace to its fingerprint, or a job larger
    than this machine's available memory (``codegen.check.preflight``)."""
    import os

    import torch

    from codegen.check import RunRefused, preflight

    ranks = plan.parallelism.dp * sum(s.tp for s in plan.stages[:plan.parallelism.pp])
    if plan.cluster.device != "cpu" and not torch.cuda.is_available():
        raise _UsageError(
            f"this plan is for {plan.cluster.num_devices} {plan.cluster.device} devices and this "
            "machine has no GPU. `plan run` launches on this machine: make a plan for "
            f"--cluster {ranks}xcpu to run it here, or run it on the GPU nodes."
        )
    if plan.workload.dtype != "float32" and not torch.cuda.is_available():
        raise _UsageError(
            f"the plan is for {plan.workload.dtype}; the CPU check compares float32 outputs: "
            "re-plan with --dtype float32"
        )
    try:
        preflight(plan, model, overrides, nnodes=nnodes)
    except RunRefused as e:
        raise _UsageError(str(e)) from None
    cores = os.cpu_count() or 1
    ranks //= nnodes  # this machine's share
    if plan.cluster.device == "cpu" and ranks > cores:
        print(f"note: {ranks} ranks share {cores} cores here, so the measured times are "
              "slower than one core per rank would give", file=sys.stderr)


@_subcommand("launch")
def _launch_scripts(argv: list[str]) -> int:
    from codegen.launch import DEFAULT_PORT, LaunchError, launch_files, parse_endpoint, write_launch
    from planner.plan import Plan

    p = _Parser(prog="plan launch", description="Write the scripts that run a plan on its "
                "nodes: node<R>.sh (one torchrun agent per node, c10d rendezvous), "
                "slurm.sbatch (the same under SLURM: sbatch DIR/slurm.sbatch) and a copy of "
                "the plan.")
    p.add_argument("plan_file")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to create (refused if it exists and is not empty)")
    p.add_argument("--rdzv-endpoint", default=f"node0:{DEFAULT_PORT}", metavar="HOST:PORT",
                   help="where the agents meet; the scripts read $RDZV_ENDPOINT first")
    p.add_argument("--rdzv-id", default=None,
                   help="run id of the job (default: from the plan's fingerprint)")
    p.add_argument("--model", default=None, help="MODEL (default: recorded in the plan file)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="config overrides (default: those recorded in the plan file)")
    p.add_argument("--collective-timeout", type=_positive_float, default=60,
                   help="seconds a collective may wait before the job fails")
    p.add_argument("--join-timeout", type=_positive_float, default=600,
                   help="seconds an agent waits for the other nodes at the rendezvous")
    args = p.parse_args(argv)
    if not args.out.strip():
        raise _UsageError("--out is empty; give the folder to create, e.g. --out launch/")
    try:
        parse_endpoint(args.rdzv_endpoint)
    except LaunchError as e:
        raise _UsageError(str(e)) from None
    plan = Plan.load(args.plan_file)
    _refuse_groups(plan, "plan launch")
    model, overrides = _planned_model(args, plan)
    run_id = args.rdzv_id or f"fx-planner-{plan.model.fingerprint[:12]}"
    try:
        files = launch_files(plan, model, overrides, args.out, endpoint=args.rdzv_endpoint,
                             run_id=run_id, collective_timeout_s=args.collective_timeout,
                             join_timeout_s=args.join_timeout)
        paths = write_launch(args.out, files)
    except LaunchError as e:
        raise _UsageError(str(e)) from None
    for path in paths:
        print(path)
    return 0


@_subcommand("export")
def _export(argv: list[str]) -> int:
    from planner.engines import TARGETS, ExportError, export_plan
    from planner.plan import Plan

    p = _Parser(prog="plan export", description="Print what deploys a plan's parallelism: "
                "an inference plan's command line for a serving engine (vllm, sglang, "
                "tensorrt-llm), a train plan's configuration for a training framework "
                "(torchtitan's TOML keys, megatron's arguments, deepspeed's JSON).")
    p.add_argument("plan_file")
    p.add_argument("--to", required=True, choices=list(TARGETS), help="the engine")
    args = p.parse_args(argv)
    plan = Plan.load(args.plan_file)
    _refuse_groups(plan, "plan export", "export")
    try:
        text = export_plan(plan, args.to, what=args.plan_file)
    except ExportError as e:
        raise _UsageError(str(e)) from None
    sys.stdout.write(text)
    return 0


@_subcommand("compile")
def _compile(argv: list[str]) -> int:
    from codegen.emit import compile_plan
    from planner.cluster import DTYPES
    from planner.models.loader import load_model
    from planner.plan import Plan, check_fingerprint
    from planner.tracing import trace

    p = _Parser(prog="plan compile", description="Write readable per-stage Python source of a "
                "plan, with every all-reduce and send/recv visible.")
    p.add_argument("plan_file")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created if missing; an existing file is refused)")
    p.add_argument("--model", default=None, help="MODEL (default: recorded in the plan file)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="config overrides (default: those recorded in the plan file)")
    args = p.parse_args(argv)
    _check_out_dir(args.out)
    plan = Plan.load(args.plan_file)
    model, overrides = _planned_model(args, plan)
    w = plan.workload
    full = load_model(model, overrides, batch_size=w.batch_size, seq_len=w.seq_len,
                      dtype=DTYPES[w.dtype], device="meta")
    check_fingerprint(plan, trace(full.model, full.args, full.kwargs, name=full.name,
                                  fold_blocks=False))
    micro = load_model(model, overrides, batch_size=plan.parallelism.microbatch_size,
                       seq_len=w.seq_len, dtype=DTYPES[w.dtype], device="meta")
    traced = trace(micro.model, micro.args, micro.kwargs, name=micro.name, fold_blocks=False)
    paths = compile_plan(traced, plan, args.out)
    for path in paths:
        print(path)
    return 0


@_subcommand("show")
def _show(argv: list[str]) -> int:
    from planner.plan import Plan
    from planner.report import render_plan

    p = _Parser(prog="plan show", description="Print a plan file as tables.")
    p.add_argument("plan_file")
    p.add_argument("--json", action="store_true", help="print the validated plan as JSON")
    args = p.parse_args(argv)
    plan = Plan.load(args.plan_file)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        render_plan(plan, _console())
    return 0


@_subcommand("explain")
def _explain(argv: list[str]) -> int:
    from planner.plan import Plan
    from planner.report import render_explain

    p = _Parser(prog="plan explain", description="The next-best plans and why they lost.")
    p.add_argument("plan_file")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    plan = Plan.load(args.plan_file)
    if args.json:
        print(json.dumps(plan.extra.get("alternatives", []), indent=2))
    else:
        render_explain(plan, _console())
    return 0


@_subcommand("profile")
def _profile(argv: list[str]) -> int:
    from cost_models.devices import lookup
    from cost_models.layer_cost import layer_cost
    from cost_models.roofline import TracedShape
    from planner.cluster import Workload
    from planner.models.loader import load_model, parse_set
    from planner.tracing import trace
    from planner.units import fmt_bytes, fmt_seconds

    p = _Parser(prog="plan profile",
                description="Measure every layer of MODEL on this machine (cached), next to the "
                            "cost model's prediction.")
    p.add_argument("model", metavar="MODEL",
                   help="preset, hf:<model_type>, file.py:factory or module:factory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for presets and hf: models; repeat for several")
    p.add_argument("--batch", type=int, default=1, help="batch size of the measured inputs")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the measured inputs")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                   help="keep timing rounds for at least this long (default 2 s on cpu: a "
                        "shared VM has slow spells of seconds)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.min_time is not None and not 0 <= args.min_time < float("inf"):  # nan too
        raise _UsageError(f"--min-time must be >= 0 seconds, got {args.min_time}")
    workload = Workload(batch_size=args.batch, seq_len=args.seq, dtype=args.dtype)
    loaded = load_model(args.model, parse_set(args.set), batch_size=args.batch, seq_len=args.seq,
                        dtype=workload.torch_dtype, device="cpu")
    traced = trace(loaded.model, loaded.args, loaded.kwargs, name=loaded.name, arch=loaded.arch)
    profile = _run_profile(traced, loaded, args.min_time)
    spec = lookup("cpu")
    shape = TracedShape(args.batch, _example_seq_len(loaded, args.seq), workload.dtype_bytes)
    rows = []
    for layer, measured in zip(traced.layers, profile.layers):
        predicted = layer_cost(layer, traced.arch, 1, workload, spec, args.batch, traced=shape)
        rows.append({
            "layer": layer.name, "time_s": measured.time_s, "median_s": measured.median_s,
            "p10_s": measured.p10_s,
            "p90_s": measured.p90_s, "peak_alloc_bytes": measured.peak_alloc_bytes,
            "predicted_s": predicted.compute_s, "cached": measured.cached,
        })
    if args.json:
        print(json.dumps({"device": profile.device, "fingerprint": profile.fingerprint,
                          "layers": rows}, indent=2, default=str))
        return 0
    table = Table(title=f"{traced.name} on {profile.device}: {profile.cache_hits}/{len(rows)} "
                        "layers from the cache")
    for col in ("layer", "time", "median", "p10", "p90", "peak alloc", "predicted", "error",
                "cached"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in rows:
        error = (r["predicted_s"] - r["time_s"]) / r["time_s"] if r["time_s"] else 0.0
        table.add_row(r["layer"], fmt_seconds(r["time_s"]), fmt_seconds(r["median_s"]),
                      fmt_seconds(r["p10_s"]),
                      fmt_seconds(r["p90_s"]), fmt_bytes(r["peak_alloc_bytes"]),
                      fmt_seconds(r["predicted_s"]), f"{error:+.0%}", "yes" if r["cached"] else "")
    _console().print(table)
    return 0


@_subcommand("calibrate")
def _calibrate(argv: list[str]) -> int:
    from cost_models.collectives import calibrate
    from planner.cluster import Cluster

    p = _Parser(prog="plan calibrate",
                description="Measure all-reduce, all-gather, reduce-scatter and send/recv on the "
                            "live backend of this machine and store alpha/beta fits.")
    p.add_argument("--cluster", required=True, help="Nxcpu: N gloo ranks on this machine")
    p.add_argument("--reps", type=_positive_int, default=40,
                   help="timed chains of back-to-back calls per message size")
    p.add_argument("--repeats", type=_positive_int, default=150,
                   help="timed calls per calibration layer")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cluster = Cluster.parse(args.cluster)
    if cluster.device != "cpu" or cluster.nodes != 1:
        raise _UsageError(
            f"plan calibrate measures the backend of this machine; {cluster.spec_string} is not "
            "here. Use --cluster Nxcpu (gloo ranks on this machine), or run it under torchrun on "
            "the GPU nodes themselves."
        )
    if cluster.num_devices < 2:
        raise _UsageError("calibration needs at least 2 ranks: use --cluster 2xcpu or more")
    from rich.progress import Progress

    from planner.calibration import calibrate_this_device

    with Progress(console=Console(stderr=True), transient=True, disable=args.json) as bar:
        task = bar.add_task("profiling the calibration set", total=1)

        def progress(done, total, what):
            bar.update(task, total=total, completed=done, description=f"roofline: {what}")

        eff = calibrate_this_device(repeats=args.repeats, progress=progress,
                                    host_ranks=cluster.num_devices)
        bar.update(task, description=f"collectives on {cluster.num_devices} gloo ranks")
        result = calibrate(cluster.num_devices, "gloo", reps=args.reps)
    if args.json:
        print(json.dumps({"roofline": {"peak_flops": eff.peak_flops,
                                       "memory_bandwidth": eff.memory_bandwidth,
                                       "layer_scale": eff.layer_scale,
                                       "matmul_rows": {str(r): f for r, f
                                                       in eff.matmul_rows.items()},
                                       "matmul_rows_shared": {
                                           str(r): f for r, f in eff.matmul_rows_shared.items()}},
                          "collectives": result.to_dict()}, indent=2))
        return 0
    _console().print(
        f"roofline of this cpu: measured peak {eff.peak_flops['float32'] / 1e9:.1f} GFLOP/s, "
        f"copy bandwidth {eff.memory_bandwidth / 1e9:.1f} GB/s, layer scale {eff.layer_scale:.3f}"
    )
    if eff.matmul_rows:
        _console().print("GEMMs of few rows on weights from memory, measured / fitted: " + ", ".join(
            f"{r} row{'s' if r > 1 else ''} x{f:.2f}" for r, f in sorted(eff.matmul_rows.items())))
    if eff.matmul_rows_shared:
        _console().print(f"the same with the other {cluster.num_devices - 1} rank(s) of this host "
                         "streaming at once: " + ", ".join(
                             f"{r} row{'s' if r > 1 else ''} x{f:.2f}"
                             for r, f in sorted(eff.matmul_rows_shared.items())))
    table = Table(title=f"gloo on {cluster.num_devices} ranks, p{result.percentile:g} per call "
                        f"of {args.reps} chains of {result.chain} back-to-back calls per size")
    for col in ("collective", "ranks", "alpha (latency)", "bus bandwidth", "sizes fitted"):
        table.add_column(col, justify="left" if col == "collective" else "right")
    for f in result.fits:
        table.add_row(f.kind, str(f.group_size), f"{f.alpha_s * 1e6:.1f} us",
                      f"{1 / f.beta_s_per_byte / 1e9:.3f} GB/s",
                      f"{min(f.sizes)}..{max(f.sizes)} B" if f.sizes else "-")
    _console().print(table)
    _console().print("stored; plans for cpu clusters use these fits from now on")
    return 0


@_subcommand("bench")
def _bench(argv: list[str]) -> int:
    from pathlib import Path

    from planner.bench import (
        DEFAULT_SUITE,
        compare,
        golden_diff,
        golden_record,
        load_cases,
        run_case,
    )

    p = _Parser(prog="plan bench", description="Plan-quality regression suite: fails when a "
                "case's objective worsens by > 0.5%, loses OPTIMAL, or exceeds its time budget.")
    p.add_argument("--suite", default=str(DEFAULT_SUITE), help="folder with cases.json, golden.json")
    p.add_argument("--update-golden", action="store_true",
                   help="accept this run as the new golden file (prints what moved)")
    p.add_argument("--only", default=None, help="run cases whose name contains this text")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    suite = Path(args.suite)
    if not suite.is_dir():
        raise _UsageError(f"--suite {suite} is not a directory; give the folder that holds "
                          f"cases.json and golden.json (default: {DEFAULT_SUITE})")
    try:
        cases = [c for c in load_cases(suite) if not args.only or args.only in c.name]
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise _UsageError(f"{suite / 'cases.json'} is not a valid suite ({type(e).__name__}: "
                          f"{e}); see benchmarks/plan_quality/cases.json for the format") from None
    if not cases:
        raise _UsageError(f"no case of {suite}/cases.json matches --only {args.only!r}")
    golden_path = suite / "golden.json"
    try:
        golden = json.loads(golden_path.read_text()) if golden_path.is_file() else {}
    except ValueError as e:
        raise _UsageError(f"{golden_path} is not valid JSON ({e}); restore it from git or "
                          "rewrite it with --update-golden") from None
    if not isinstance(golden, dict):
        raise _UsageError(f"{golden_path} holds {type(golden).__name__}, not the object of "
                          "case records; restore it from git or rewrite it with --update-golden")
    results = []
    with _status(args, "solving the suite") as status:
        for case in cases:
            if status.enabled:
                status.ctx.update(f"solving {case.name}...")
            results.append(run_case(case))
    if args.update_golden:
        diff = golden_diff(results, golden)
        merged = {**golden, **golden_record(results)}
        golden_path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
        print("\n".join(diff) if diff else "golden unchanged")
        print(f"wrote {golden_path} ({len(merged)} cases)")
        return 0
    rows = compare(results, golden, cases)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title=f"plan quality: {sum(r['ok'] for r in rows)}/{len(rows)} cases pass")
        for col in ("case", "objective", "golden", "change", "status", "solve", "budget", "verdict"):
            table.add_column(col, justify="left" if col in ("case", "verdict") else "right")
        for r in rows:
            table.add_row(r["name"], f"{r['objective']:.6g} s",
                          f"{r['golden']:.6g} s" if r["golden"] is not None else "-",
                          f"{r['change']:+.3%}" if r["change"] is not None else "-", r["status"],
                          f"{r['wall_s']:.2f} s", f"{r['budget_s']:g} s",
                          "ok" if r["ok"] else "[red]" + "; ".join(r["problems"]) + "[/]")
        _console().print(table)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

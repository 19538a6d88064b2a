"""The ``plan`` command.

Usage:
    plan llama-3-70b --cluster 2x8xH100 --batch 8 --seq 2048 --json
    plan hf:llama --set num_hidden_layers=2 --set hidden_size=64 --cluster 4xcpu
    plan path/to/model.py:make_model --cluster 8xH100
    plan devices
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # exit 2 with usage, as argparse does, but testable
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _model_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="plan",
        description="Plan how to split MODEL across a cluster (dp x pp x tp), provably optimal "
        "under the cost model. Subcommands: " + ", ".join(sorted(_SUBCOMMANDS)) + ".",
    )
    p.add_argument("model", metavar="MODEL",
                   help="preset (gpt2, llama-3-70b, ...), hf:<model_type>, file.py:factory or module:factory")
    p.add_argument("--cluster", default="8xH100", help="8xH100, 2x8xA100-80GB, 4xcpu, or a JSON file")
    p.add_argument("--batch", type=int, default=1, help="global batch size (sequences)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: min(2048, model max))")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16")
    p.add_argument("--phase", default="prefill", choices=["prefill", "decode"])
    p.add_argument("--objective", default="latency", choices=["latency", "throughput"])
    p.add_argument("--context", type=int, default=None, help="KV-cache length for decode (default: --seq)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for presets and hf: models; repeat for several")
    p.add_argument("--device", default="meta", choices=["meta", "cpu"],
                   help="where to build the model for tracing (meta allocates no weights)")
    p.add_argument("--out", default=None, help="write the result as JSON to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `plan ... --json | head` ends quietly
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _SUBCOMMANDS:
        return _run_guarded(lambda: _SUBCOMMANDS[argv[0]](argv[1:]))
    args = _model_parser().parse_args(argv)
    return _run_guarded(lambda: _plan_model(args))


def _run_guarded(fn: Callable[[], int]) -> int:
    """Turn the errors a user can fix into one paragraph on stderr and exit code 2."""
    from planner.cluster import SpecError
    from planner.models.loader import ModelLoadError
    from planner.tracing import TraceError

    try:
        return fn()
    except (ModelLoadError, TraceError, SpecError, _UsageError, FileNotFoundError) as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2


def _console() -> Console:
    """A console at least 120 columns wide, so tables stay readable when piped."""
    width = Console().width
    return Console(width=max(width, 120))


def _plan_model(args: argparse.Namespace) -> int:
    from planner.cluster import Cluster, Workload
    from planner.models.loader import load_model, parse_set
    from planner.tracing import trace

    cluster = Cluster.parse(args.cluster)
    workload = Workload(batch_size=args.batch, seq_len=args.seq or 2048, dtype=args.dtype,
                        phase=args.phase, objective=args.objective, context_len=args.context)
    loaded = load_model(args.model, parse_set(args.set), batch_size=args.batch, seq_len=args.seq,
                        dtype=workload.torch_dtype, device=args.device)
    traced = trace(loaded.model, loaded.args, loaded.kwargs, name=loaded.name, arch=loaded.arch)
    result = {"model": traced.to_dict(), "cluster": cluster.to_dict(), "workload": workload.to_dict()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_layer_table(traced, cluster)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())

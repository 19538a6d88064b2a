"""Launching a plan on several nodes: torchrun's c10d rendezvous, one agent per node.

A plan numbers its devices node by node (``id = node × devices_per_node + local``), and
torchrun numbers the ranks of a multi-node job agent by agent (``rank = group_rank ×
nproc_per_node + local_rank``). So when every node starts ``devices_per_node`` ranks, the
ranks of one node are exactly the device ids of one node of the plan, and a tensor-parallel
group (which the plan keeps inside a node) stays on one machine. Under the c10d rendezvous
the agents' order (``group_rank``) is decided when they meet, not by ``--node-rank``
(torchrun ignores it for c10d): which machine runs which node of the plan may differ from
run to run, each machine always runs one whole node.

``plan run plan.json --nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` runs one node's
agent (``codegen.check.run_check``); ``plan launch plan.json --out DIR`` writes
``write_launch`` 's scripts:

>>> node_layout(4, nodes=2, devices_per_node=2, nnodes=2)
NodeLayout(nnodes=2, nproc_per_node=2)
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NodeLayout", "LaunchError", "node_layout", "parse_endpoint", "rendezvous_args",
           "write_launch", "launch_files"]

DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """The plan cannot be launched on these nodes; the message says what to change."""


@dataclass(frozen=True)
class NodeLayout:
    """How many torchrun agents (nodes) and ranks per agent a multi-node run starts."""

    nnodes: int
    nproc_per_node: int


def node_layout(world_size: int, *, nodes: int, devices_per_node: int, nnodes: int) -> NodeLayout:
    """The agents of a plan whose ranks are ``0..world_size-1`` on a cluster of ``nodes`` ×
    ``devices_per_node``, run on ``nnodes`` machines.

    Raises:
        LaunchError: the ranks do not fill ``nnodes`` whole nodes of the plan.
    """
    if world_size % devices_per_node:
        raise LaunchError(
            f"the plan runs {world_size} ranks and its nodes have {devices_per_node} devices "
            f"each, so its last node would be partly used; a multi-node run starts "
            f"{devices_per_node} ranks on every node. Re-plan so that dp × (the stages' tp) "
            f"is a multiple of {devices_per_node} (e.g. pin --dp or --tp), or run it on one "
            "machine without --nnodes")
    used = world_size // devices_per_node
    if nnodes != used:
        raise LaunchError(
            f"--nnodes {nnodes}, but the plan's {world_size} ranks fill {used} node(s) of "
            f"{devices_per_node} devices (its cluster has {nodes}): pass --nnodes {used}")
    return NodeLayout(nnodes, devices_per_node)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6::addr]:PORT`` too) of the rendezvous.

    Raises:
        LaunchError: not of that form, or the port is not in 1..65535.
    """
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--rdzv-endpoint {text!r} is not HOST:PORT (a port in 1..65535); "
                          f"give the address of node 0 and a free port, e.g. "
                          f"node0.example:{DEFAULT_PORT} or 127.0.0.1:{DEFAULT_PORT}")
    return host, int(port)


def rendezvous_args(layout: NodeLayout, endpoint: str, run_id: str,
                    join_timeout_s: float) -> list[str]:
    """torchrun's options for one agent of a c10d rendezvous (every node passes the same)."""
    return [f"--nnodes={layout.nnodes}", f"--nproc-per-node={layout.nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=join_timeout={max(1, int(join_timeout_s))}", "--max-restarts=0"]


def launch_files(plan, model: str, overrides: dict, out: str | Path, *, endpoint: str,
                 run_id: str,
                 collective_timeout_s: float, join_timeout_s: float,
                 python: str | None = None) -> dict[str, str]:
    """The files ``plan launch`` writes into ``out``: ``node<R>.sh`` per node,
    ``slurm.sbatch`` (which finds the plan in ``out``, or ``$PLAN_DIR``) and ``plan.json``
    (a copy, so that the folder is all a node needs besides fx-planner)."""
    import json

    world = plan.parallelism.dp * sum(s.tp for s in plan.stages[:plan.parallelism.pp])
    layout = node_layout(world, nodes=plan.cluster.nodes,
                         devices_per_node=plan.cluster.devices_per_node,
                         nnodes=-(-world // plan.cluster.devices_per_node))
    python = python or sys.executable
    worker = ["-m", "codegen.rank", "--plan", "PLAN", "--model", model,
              "--timeout", f"{collective_timeout_s:g}", "--repeats", "0"]
    for key, value in overrides.items():
        worker += ["--set", f"{key}={json.dumps(value)}"]
    quoted = " ".join(shlex.quote(w) for w in worker).replace("PLAN", '"$HERE/plan.json"')
    head = ("#!/usr/bin/env bash\n"
            f"# Written by `plan launch` for {plan.model.name} on {_spec(plan.cluster)}: "
            f"dp {plan.parallelism.dp} x pp {plan.parallelism.pp} x tp "
            f"{'/'.join(str(s.tp) for s in plan.stages)}, {world} ranks on "
            f"{layout.nnodes} node(s) of {layout.nproc_per_node}.\n"
            "# The c10d rendezvous decides which machine runs which node of the plan; each\n"
            "# runs a whole node, so a tensor-parallel group stays on one machine.\n"
            "set -euo pipefail\n"
            'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
            f'PYTHON="${{PYTHON:-{python}}}"\n'
            f'RDZV_ENDPOINT="${{RDZV_ENDPOINT:-{endpoint}}}"\n')
    files = {"plan.json": json.dumps(plan.to_dict(), indent=2) + "\n"}
    for node in range(layout.nnodes):
        args = rendezvous_args(layout, "$RDZV_ENDPOINT", run_id, join_timeout_s)
        args.insert(2, f"--node-rank={node}")
        torchrun = " ".join(a if "$" in a else shlex.quote(a) for a in args)
        torchrun = torchrun.replace("--rdzv-endpoint=$RDZV_ENDPOINT",
                                    '--rdzv-endpoint="$RDZV_ENDPOINT"')
        files[f"node{node}.sh"] = (head + f"# node {node} of {layout.nnodes}\n"
                                   f'exec "$PYTHON" -m torch.distributed.run {torchrun} '
                                   f"{quoted}\n")
    gpus = "" if plan.cluster.device == "cpu" else \
        f"#SBATCH --gpus-per-node={layout.nproc_per_node}\n"
    args = rendezvous_args(layout, "$RDZV_ENDPOINT", run_id, join_timeout_s)
    args.insert(2, "--node-rank=$SLURM_NODEID")
    torchrun = " ".join(a if "$" in a else shlex.quote(a) for a in args)
    torchrun = torchrun.replace("--rdzv-endpoint=$RDZV_ENDPOINT", '--rdzv-endpoint="$RDZV_ENDPOINT"')
    port = parse_endpoint(endpoint)[1]
    files["slurm.sbatch"] = (
        "#!/usr/bin/env bash\n"
        f"#SBATCH --job-name={run_id}\n"
        f"#SBATCH --nodes={layout.nnodes}\n"
        "#SBATCH --ntasks-per-node=1\n"
        f"{gpus}"
        f"# {plan.model.name} on {_spec(plan.cluster)}: {world} ranks, one torchrun agent "
        "per node; node 0 of the allocation hosts the rendezvous.\n"
        "set -euo pipefail\n"
        f'export HERE="${{PLAN_DIR:-{Path(out).absolute()}}}"\n'
        f'export PYTHON="${{PYTHON:-{python}}}"\n'
        'FIRST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"\n'
        f'export RDZV_ENDPOINT="${{RDZV_ENDPOINT:-$FIRST:{port}}}"\n'
        f"srun --nodes={layout.nnodes} --ntasks-per-node=1 bash -c "
        + shlex.quote(f'exec "$PYTHON" -m torch.distributed.run {torchrun} {quoted}') + "\n")
    return files


def _spec(cluster) -> str:
    per_node = f"{cluster.devices_per_node}x{cluster.device}"
    return per_node if cluster.nodes == 1 else f"{cluster.nodes}x{per_node}"


def write_launch(out: str | Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` into the folder ``out`` all at once: into a temporary folder beside
    it, then renamed to ``out`` (which must not exist, or be empty). A failure leaves no
    part of them."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LaunchError(f"--out {out} exists and is not an empty folder; `plan launch` "
                          "writes a new folder: give a new name or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        for name, text in files.items():
            path = tmp / name
            path.write_text(text)
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
        tmp.chmod(0o755)
        os.replace(tmp, out)  # an empty folder is replaced; a file or a full one refused
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / name for name in files]

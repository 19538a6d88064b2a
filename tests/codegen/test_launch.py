"""Multi-node launch: `plan launch` scripts (parsed), and two `plan run` "nodes" on this
machine meeting at a loopback c10d rendezvous, `--check` passing."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main
from tests.bad_input.cli_helpers import refused

PLAN = [sys.executable, "-m", "planner.cli"]


@pytest.fixture(scope="module")
def two_node_plan(tmp_path_factory) -> Path:
    """llama-tiny on 2 nodes x 2 cpu devices: pp 2 x tp 2, so each stage is one node (the
    tp all-reduces stay in a node, the stage boundary's send/recv crosses nodes)."""
    path = tmp_path_factory.mktemp("launch") / "plan.json"
    assert main(["llama-tiny", "--cluster", "2x2xcpu", "--batch", "2", "--seq", "16",
                 "--tp", "2", "--pp", "2", "--alternatives", "0", "--out", str(path)]) == 0
    return path


def _torchrun_args(script: str) -> tuple[dict[str, str], list[str]]:
    """The torchrun options (``--key=value``) and the worker argv of a launch script."""
    line = next(x for x in script.splitlines() if "torch.distributed.run" in x)
    words = shlex.split(line.split("torch.distributed.run", 1)[1])
    cut = words.index("-m")
    options = dict(w[2:].split("=", 1) for w in words[:cut])
    return options, words[cut:]


def test_launch_writes_one_torchrun_script_per_node_and_a_slurm_script(two_node_plan, tmp_path,
                                                                        capsys):
    out = tmp_path / "launch"
    assert main(["launch", str(two_node_plan), "--out", str(out), "--rdzv-endpoint",
                 "10.0.0.1:29511"]) == 0
    plan = json.loads(two_node_plan.read_text())
    assert sorted(p.name for p in out.iterdir()) == ["node0.sh", "node1.sh", "plan.json",
                                                    "slurm.sbatch"]
    assert json.loads((out / "plan.json").read_text()) == plan
    nodes, per_node = plan["cluster"]["nodes"], plan["cluster"]["devices_per_node"]
    ids = []
    for node in range(nodes):
        script = (out / f"node{node}.sh").read_text()
        assert os.access(out / f"node{node}.sh", os.X_OK)
        options, worker = _torchrun_args(script)
        assert options == {"nnodes": str(nodes), "nproc-per-node": str(per_node),
                           "node-rank": str(node), "rdzv-backend": "c10d",
                           "rdzv-endpoint": "$RDZV_ENDPOINT",
                           "rdzv-id": "fx-planner-" + plan["model"]["fingerprint"][:12],
                           "rdzv-conf": "join_timeout=600", "max-restarts": "0"}
        assert 'RDZV_ENDPOINT="${RDZV_ENDPOINT:-10.0.0.1:29511}"' in script
        assert worker[:6] == ["-m", "codegen.rank", "--plan", "$HERE/plan.json", "--model",
                              "llama-tiny"]
        ids += range(node * per_node, (node + 1) * per_node)
    # every device id of the plan is started by exactly one node's agent
    assert sorted(ids) == sorted(d for s in plan["stages"] for g in s["devices"] for d in g)
    sbatch = (out / "slurm.sbatch").read_text()
    assert f"#SBATCH --nodes={nodes}\n#SBATCH --ntasks-per-node=1\n" in sbatch
    assert "--gpus-per-node" not in sbatch  # a cpu plan
    srun = shlex.split(next(x for x in sbatch.splitlines() if x.startswith("srun ")))
    assert srun[:5] == ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "bash", "-c"]
    options, _ = _torchrun_args(srun[5])
    assert (options["nnodes"], options["nproc-per-node"], options["node-rank"]) == (
        str(nodes), str(per_node), "$SLURM_NODEID")
    capsys.readouterr()
    # a second launch into the same folder is refused and changes nothing
    refused(["launch", str(two_node_plan), "--out", str(out)], capsys,
            "exists and is not an empty folder", out_file=out / "node0.sh")


def test_run_node_options_are_checked_before_anything_starts(two_node_plan, capsys):
    refused(["run", str(two_node_plan), "--nnodes", "2"], capsys, "needs --rdzv-endpoint")
    refused(["run", str(two_node_plan), "--nnodes", "2", "--node-rank", "2",
             "--rdzv-endpoint", "127.0.0.1:29500"], capsys, "node ranks are 0..1")
    refused(["run", str(two_node_plan), "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1"],
            capsys, "is not HOST:PORT")
    refused(["run", str(two_node_plan), "--nnodes", "3", "--rdzv-endpoint", "127.0.0.1:29500"],
            capsys, "fill 2 node(s)", "pass --nnodes 2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_run_the_plan_and_pass_the_check(two_node_plan):
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, COLUMNS="160")
    nodes = [subprocess.Popen([*PLAN, "run", str(two_node_plan), "--check", "--json",
                               "--repeats", "0", "--timeout", "240", "--nnodes", "2",
                               "--node-rank", str(r), "--rdzv-endpoint", endpoint],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:  # never leave a node running (each ends its own ranks on SIGTERM)
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=30)
    assert [p.returncode for p in nodes] == [0, 0], outs
    reports = [json.loads(out) for out, _ in outs if out.strip()]
    assert len(reports) == 1, outs  # printed where rank 0 ran
    report = reports[0]
    assert report["max_abs_err"] <= 1e-4
    assert [st["ranks"] for st in report["stages"]] == [[0, 1], [2, 3]]
    notes = [err for out, err in outs if not out.strip()]
    assert len(notes) == 1 and "ran ranks [2, 3] of the plan (stage(s) [1])" in notes[0], notes

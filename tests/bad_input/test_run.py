"""`plan run` safety: refused before launch (bad plan, wrong model, too big for this
machine), Ctrl-C stops every process of the job, rank failures in one paragraph.

Refusals run the CLI in-process with the launcher patched to fail the test if reached (no
rank may start); the memory refusal, the interrupt and the accuracy failure run the real
`plan` command as a subprocess (gloo, 2 CPU ranks, tiny models).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import codegen.check
from planner.cli import main

PLAN = [sys.executable, "-m", "planner.cli"]


def _make_plan(path: Path, *args: str) -> Path:
    assert main([*args, "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> Path:
    """llama-tiny, tp 2 on 2 cpu ranks (the all-reduces make the outputs differ from the
    unsharded model by float rounding, not bit-identical)."""
    path = tmp_path_factory.mktemp("run") / "tiny.json"
    return _make_plan(path, "llama-tiny", "--cluster", "2xcpu", "--batch", "2", "--seq", "16",
                      "--dtype", "float32", "--tp", "2", "--alternatives", "0")


@pytest.fixture()
def no_launch(monkeypatch):
    """Fail the test if `plan run` starts torchrun."""
    def launched(*a, **k):
        raise AssertionError("plan run launched ranks for a plan it should have refused")

    monkeypatch.setattr(codegen.check.subprocess, "Popen", launched)


def _refused(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    return " ".join(err.split())


def _edited(src: Path, dst: Path, edit) -> Path:
    data = json.loads(src.read_text())
    edit(data)
    dst.write_text(json.dumps(data))
    return dst


def test_edited_fingerprint_is_refused_before_any_rank(tiny_plan, tmp_path, capsys, no_launch):
    def edit(d):
        d["model"]["fingerprint"] = "0" * len(d["model"]["fingerprint"])

    err = _refused(capsys, ["run", str(_edited(tiny_plan, tmp_path / "p.json", edit)), "--check"])
    assert "fingerprint" in err and "re-plan" in err, err


def test_a_different_model_is_refused_before_any_rank(tiny_plan, capsys, no_launch):
    err = _refused(capsys, ["run", str(tiny_plan), "--model", "gpt-tiny", "--check"])
    assert "fingerprint" in err and "gpt-tiny" in err, err


def test_an_unknown_model_is_refused_before_any_rank(tiny_plan, capsys, no_launch):
    err = _refused(capsys, ["run", str(tiny_plan), "--model", "lama-tiny"])
    assert "unknown model 'lama-tiny'" in err, err


def test_other_overrides_are_refused_before_any_rank(tiny_plan, capsys, no_launch):
    err = _refused(capsys, ["run", str(tiny_plan), "--set", "num_hidden_layers=3"])
    assert "fingerprint" in err, err


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("seq_len", 0), ("batch_size", -2)])
def test_a_plan_with_an_empty_workload_is_refused_before_any_rank(tiny_plan, tmp_path, capsys,
                                                                  no_launch, key, value):
    def edit(d):
        d["workload"][key] = value

    err = _refused(capsys, ["run", str(_edited(tiny_plan, tmp_path / "p.json", edit))])
    assert f"batch_size is {value}" in err or key in err, err


def test_a_decode_plan_of_a_model_that_cannot_generate_is_refused_before_any_rank(
        tmp_path, capsys, no_launch):
    """OPT's attention asks its cache for one sequence length, which a per-sequence cache
    does not have: its decode step does not trace, and `plan run` says so before launch."""
    plan = _make_plan(tmp_path / "opt.json", "hf:opt", "--set", "hidden_size=64", "--set",
                      "ffn_dim=128", "--set", "num_hidden_layers=2", "--set",
                      "num_attention_heads=4", "--set", "vocab_size=256", "--cluster", "2xcpu",
                      "--phase", "decode", "--batch", "2", "--seq", "8", "--context", "24",
                      "--alternatives", "0")
    err = _refused(capsys, ["run", str(plan), "--check"])
    assert "hf:opt cannot generate" in err and "--phase prefill" in err, err


@pytest.mark.parametrize("flag", [["--tol", "-1"], ["--tol", "nan"], ["--timeout", "0"],
                                  ["--collective-timeout", "-5"]])
def test_bad_run_flags_are_refused(tiny_plan, capsys, no_launch, flag):
    err = _refused(capsys, ["run", str(tiny_plan), *flag])
    assert flag[0] in err, err


def test_preflight_counts_what_every_rank_builds(tiny_plan):
    from planner.models.loader import load_model
    from planner.plan import Plan

    plan = Plan.load(tiny_plan)
    need = codegen.check.preflight(plan, "llama-tiny", {}, available=1 << 50)
    lm = load_model("llama-tiny", batch_size=2, seq_len=16)
    full = sum(p.numel() * 4 for p in lm.model.parameters())
    assert need.ranks == 2 and need.model_bytes >= full
    assert need.total_bytes >= 2 * full + 2 * codegen.check.RANK_PROCESS_BYTES
    with pytest.raises(codegen.check.RunRefused, match="MemAvailable"):
        codegen.check.preflight(plan, "llama-tiny", {}, available=need.total_bytes)


def _job_processes(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line mentions ``marker``: torchrun and
    the ranks of a job whose plan file is ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state not in ("Z", "X"):
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_plan_too_big_for_this_machine_is_refused_in_seconds(tmp_path, capsys, monkeypatch):
    # The example: 4 ranks that each build llama-2-7b in float32 on this machine.
    available = codegen.check.available_memory_bytes()
    if available is not None and available * codegen.check.MEMORY_FRACTION > 160 * 2**30:
        pytest.skip("this machine could run the job (about 153 GiB): nothing to refuse")
    plan = _make_plan(tmp_path / "p7b.json", "llama-2-7b", "--cluster", "4xcpu", "--batch", "4",
                      "--seq", "32", "--alternatives", "0")
    start = time.monotonic()
    r = subprocess.run([*PLAN, "run", str(plan), "--check"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, TMPDIR=str(tmp_path)))
    elapsed = time.monotonic() - start
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr[-3000:]
    assert err.startswith("error: this job would need about"), err
    assert "MemAvailable" in err and "25.1 GiB each" in err and "num_hidden_layers" in err
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not list(tmp_path.glob("fx-planner-*")), "a job was started"
    assert elapsed < 60, elapsed  # imports and a meta build; no trace, no rank

    # A cluster file that claims 1 TB per cpu device: the guard counts this machine's
    # memory, not the plan's claims (in-process, with the launcher patched to fail).
    cluster = tmp_path / "big.json"
    cluster.write_text(json.dumps({"nodes": 1, "devices_per_node": 4, "device": "cpu",
                                   "memory_bytes": 10**12}))
    plan = _make_plan(tmp_path / "p7b-1tb.json", "llama-2-7b", "--cluster", str(cluster),
                      "--batch", "4", "--seq", "32", "--alternatives", "0")
    capsys.readouterr()
    monkeypatch.setattr(codegen.check.subprocess, "Popen", None)
    err = _refused(capsys, ["run", str(plan), "--check"])
    assert err.startswith("error: this job would need about") and "25.1 GiB each" in err, err


def _phases(tmp_path: Path) -> list[str]:
    """The phase each rank of the job under ``tmp_path`` last recorded."""
    phases = []
    for path in sorted(tmp_path.glob("fx-planner-check-*/rank[0-9].json")):
        try:
            phases.append(json.loads(path.read_text()).get("phase"))
        except (OSError, ValueError):  # being replaced right now
            phases.append(None)
    return phases


@pytest.mark.slow
def test_sigint_stops_every_process_of_the_job(tiny_plan, tmp_path):
    plan = tmp_path / "interrupted.json"  # a file name only this job's command lines contain
    plan.write_text(tiny_plan.read_text())
    # Rank 0 sleeps when its forward pass begins; rank 1 waits for it in an all-reduce. The
    # collective timeout is far away, so only the interrupt can end the job.
    env = dict(os.environ, FX_PLANNER_HANG_RANK="0", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([*PLAN, "run", str(plan), "--collective-timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None and _phases(tmp_path) != ["forward"] * 2:
            time.sleep(0.5)  # both ranks in their forward pass: mid-run
        assert proc.poll() is None, proc.communicate()
        assert _phases(tmp_path) == ["forward"] * 2
        job = _job_processes(str(plan))
        assert len(job) >= 4, job  # plan run, torchrun and 2 ranks
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-3000:]
        lines = [line for line in err.strip().splitlines() if not line.startswith("note:")]
        assert lines == ["error: interrupted by SIGINT; stopped torchrun and 2 rank processes, "
                         f"none left running (their logs: {lines[0].split('their logs: ')[-1]}"], err
        assert "Traceback" not in err
        assert _job_processes(str(plan)) == []
    finally:
        for pid in _job_processes(str(plan)):  # never leave a rank behind, even on failure
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_an_accuracy_failure_is_reported_as_one(tiny_plan, tmp_path):
    # tp 2 sums in another order than the unsharded model: an error of ~1e-7, far above 1e-30.
    r = subprocess.run([*PLAN, "run", str(tiny_plan), "--check", "--tol", "1e-30", "--repeats",
                        "0"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip()
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: plan run --check failed on accuracy: "
                                                   "max abs error"), err
    assert "tolerance 1e-30" in err and "a rank that hangs" not in err and "Traceback" not in err
    log = Path(err.rsplit("Full rank logs: ", 1)[1].strip())
    assert log.parent == tmp_path and "outputs differ beyond tolerance" in log.read_text()
    assert "max abs error vs the unsharded model" in r.stdout


_CHILD = """import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
time.sleep(600)
"""
_LAUNCHER = """import subprocess, sys, time
from pathlib import Path
here = Path(sys.argv[0]).parent
# Like torchrun: each rank in a session of its own, so the launcher's group misses them.
for _ in range(2):
    subprocess.Popen([sys.executable, str(here / "child.py")], start_new_session=True)
(here / "ready").write_text("")
time.sleep(600)
"""
_DRIVER = """import sys
from pathlib import Path
import codegen.check as c
c.STOP_GRACE_S = 1.0
here = Path(sys.argv[0]).parent
try:
    c._launch([sys.executable, str(here / "launcher.py")], 120, here / "job.log")
except c.RunInterrupted as e:
    print(e)
    sys.exit(130)
sys.exit(1)
"""


@pytest.mark.slow
def test_sigterm_ends_ranks_in_their_own_sessions_even_if_they_ignore_it(tmp_path):
    # A stand-in for torchrun whose two "ranks" run in sessions of their own and ignore
    # SIGTERM: the stop must find them through /proc and SIGKILL them after the grace period.
    for name, text in (("child.py", _CHILD), ("launcher.py", _LAUNCHER), ("driver.py", _DRIVER)):
        (tmp_path / name).write_text(text)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py")], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(root)))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                len(_job_processes(str(tmp_path / "child.py"))) < 2 and proc.poll() is None):
            time.sleep(0.2)
        assert len(_job_processes(str(tmp_path / "child.py"))) == 2, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-3000:]
        assert out.startswith("interrupted by SIGTERM; stopped torchrun and 2 rank processes, "
                              "none left running"), out
        assert _job_processes(str(tmp_path)) == []
    finally:
        for pid in _job_processes(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


_BIG_FACTORY = """import torch
import torch.nn as nn


class Big(nn.Module):  # 2 x 16384 x 16384 float32 weights: 2 GiB when built on cpu
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16384, 16384, bias=False) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def make():
    return Big().eval(), (torch.randn(2, 16384),)
"""


def test_a_factory_model_is_counted_without_allocating_its_weights(tmp_path):
    import importlib.util
    import resource

    import torch

    import planner

    path = tmp_path / "big_factory.py"
    path.write_text(_BIG_FACTORY)
    spec = importlib.util.spec_from_file_location("_test_big_factory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.device("meta"):
        model, args = module.make()
    plan = planner.plan(model, "2xcpu", args=args, alternatives=0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, a high-water mark
    with pytest.raises(codegen.check.RunRefused, match="MemAvailable") as refused:
        codegen.check.preflight(plan, f"{path}:make", {}, available=1 << 30)
    assert "(2.0 GiB each" in str(refused.value)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 512 << 10, f"the parent grew by {grown} KiB: it built the weights"

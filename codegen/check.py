"""Run a plan under torchrun and compare it with the unsharded model (``plan run --check``).

Usage (what ``run_check`` launches; torchrun is the launcher, nothing home-made)::

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m codegen.rank \\
        --plan plan.json --model llama-tiny --set num_hidden_layers=4 --tol 1e-4

Every rank builds the model from the same spec and seed, runs the eager model and its own
part of the plan on the same inputs, and rank 0 prints the max abs error, the measured time
per stage next to the plan's prediction, and exits non-zero beyond the tolerance.
``--cases cases.json --out DIR`` runs several (model, plan) cases in one job and writes one
JSON result per rank (what the tests use).

Failures: every process group (and every stage-boundary send/recv) waits at most
``--timeout`` seconds, torchrun stops the other ranks as soon as one exits non-zero, and
``run_check`` bounds the whole job by a wall time. Each rank records its state in
``--status-dir`` (running / error / ok, with the phase it was in), so ``run_check`` can
name the rank that died first (no Python error: killed, crashed) or raised first, instead
of the ranks that merely lost their peer. ``FX_PLANNER_FAIL_RANK=<r>`` (read here only,
for tests) makes rank ``r`` kill itself with SIGKILL when its forward pass begins;
``FX_PLANNER_HANG_RANK=<r>`` makes it sleep instead (alive, no progress): its peers' waits
time out, they raise, and torchrun stops it with SIGTERM; the message names the rank that
raised first and the ranks that were still running without an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

__all__ = ["run_check", "torchrun_command", "check_case", "main", "diagnose_failure"]

_TIMEOUT = datetime.timedelta(seconds=60)
FAIL_RANK_ENV = "FX_PLANNER_FAIL_RANK"
HANG_RANK_ENV = "FX_PLANNER_HANG_RANK"
_STATUS: dict = {}


def torchrun_command(nproc: int, worker_args: list[str]) -> list[str]:
    """The ``python -m torch.distributed.run`` command line for ``codegen.rank`` (which runs ``codegen.check.main``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "codegen.rank",
            *worker_args]


def run_check(plan_path: str | Path, model: str, overrides: dict | None = None, *,
              tol: float = 1e-4, seed: int = 0, timeout_s: float = 600,
              collective_timeout_s: float = 60, repeats: int = 5) -> int:
    """Launch ``plan_path`` with torchrun on this machine and check it against the model.

    Args:
        plan_path: a ``fx-planner/plan/v1`` file.
        model: the MODEL spec the plan was made for (``llama-tiny``, ``hf:gpt2``...).
        overrides: ``--set`` config overrides used when planning.
        tol: max abs error allowed (fp32).
        seed: weight and input seed (the same on every rank).
        timeout_s: wall-clock limit for the whole job; past it every rank is killed.
        collective_timeout_s: limit of every collective and stage-boundary send/recv.
        repeats: timed forward passes after the first (checked) one; the report gives the
            first call, the median and the best of them.

    Returns:
        0 when every output is within ``tol``; otherwise non-zero (torchrun's exit status,
        or 124 past ``timeout_s``), after printing to stderr one paragraph that names the
        rank that failed first and why.
    """
    from planner.plan import Plan

    plan = Plan.load(plan_path)
    nproc = plan.parallelism.dp * sum(s.tp for s in plan.stages)
    with tempfile.TemporaryDirectory(prefix="fx-planner-check-") as status_dir:
        args = ["--plan", str(plan_path), "--model", model, "--tol", str(tol), "--seed",
                str(seed), "--timeout", str(collective_timeout_s), "--status-dir", status_dir,
                "--repeats", str(repeats)]
        for key, value in (overrides or {}).items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        rc, stderr, seconds = _launch(torchrun_command(nproc, args), timeout_s)
        if rc != 0:
            status = _read_status(status_dir, nproc)
            print(diagnose_failure(rc, stderr, status, nproc, seconds=seconds,
                                   timeout_s=timeout_s, collective_timeout_s=collective_timeout_s,
                                   ended_at=time.time()), file=sys.stderr)
        return rc


def _launch(cmd: list[str], timeout_s: float) -> tuple[int, str, float]:
    """Run ``cmd`` in its own session, echo its stderr while keeping it; kill the whole
    session (torchrun and its workers) past ``timeout_s``. Returns (rc, stderr, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stderr:
            lines.append(line)
            sys.stderr.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = 124
    reader.join(timeout=5)
    return rc, "".join(lines), time.monotonic() - start


def _read_status(status_dir: str | Path, nproc: int) -> dict[int, dict]:
    status = {}
    for r in range(nproc):
        path = Path(status_dir, f"rank{r}.json")
        try:
            status[r] = json.loads(path.read_text())
        except (OSError, ValueError):
            status[r] = {"state": "not started"}
    return status


_FAILURE_RE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "..."


def diagnose_failure(rc: int, stderr: str, status: dict[int, dict], nproc: int, *,
                     seconds: float, timeout_s: float, collective_timeout_s: float,
                     ended_at: float | None = None) -> str:
    """One paragraph naming the rank that failed first and the cause.

    ``status`` is each rank's last record (``state``: running / error / ok, ``phase``,
    ``error``, ``t``); torchrun's failure summary in ``stderr`` gives exit codes. A rank that
    exited without recording a Python error (killed, crashed) is the cause; otherwise the
    rank whose error came first; the others are reported as consequences.
    """
    codes = {int(r): int(c) for r, c in _FAILURE_RE.findall(stderr)}

    def where(r: int) -> str:
        st = status.get(r, {})
        coords = st.get("coords")
        at = f"rank {r}"
        if coords:
            at += f" (stage {coords[0]}, replica {coords[1]}, tp rank {coords[2]})"
        return at

    # SIGTERM is how torchrun stops the survivors once one rank failed: those did not die on
    # their own. A rank that died otherwise without a Python error is the cause.
    quiet = [r for r in codes if status.get(r, {}).get("state") != "error"]
    stopped = sorted(r for r in quiet if codes[r] == -signal.SIGTERM)
    died = sorted(r for r in quiet if codes[r] != -signal.SIGTERM)
    raised = sorted((st["t"], r) for r, st in status.items() if st.get("state") == "error")
    if not died and not raised:
        died = stopped  # nothing else to blame
    if rc == 124:
        stuck = [r for r, st in status.items() if st.get("state") != "ok"]
        head = (f"plan run failed: the job exceeded its wall time of {timeout_s:.0f} s and was "
                f"killed; ranks {stuck} had not finished (phases: "
                + ", ".join(f"rank {r} in {status[r].get('phase', '?')}" for r in stuck) + ")")
    elif died:
        r = died[0]
        head = (f"plan run failed: {where(r)} died with {_exit_text(codes[r])} during "
                f"{status.get(r, {}).get('phase', 'start-up')} without raising a Python error")
        if len(died) > 1:
            head += f" (ranks {died[1:]} also exited without an error)"
    elif raised:
        r = raised[0][1]
        head = (f"plan run failed: {where(r)} raised first, during {status[r].get('phase')}: "
                f"{status[r]['error']}")
        if stopped:
            head += (f"; {', '.join(where(q) for q in stopped)} had raised nothing and "
                     f"{'was' if len(stopped) == 1 else 'were'} still running (phase "
                     f"{', '.join(status.get(q, {}).get('phase', '?') for q in stopped)}) "
                     f"until torchrun stopped {'it' if len(stopped) == 1 else 'them'}: a rank "
                     "that hangs shows up this way")
    elif codes:
        r = min(codes)
        head = f"plan run failed: {where(r)} exited with {_exit_text(codes[r])}"
    else:
        head = f"plan run failed: torchrun exited with status {rc} and named no rank"
    cause = died[0] if died and rc != 124 else (raised[0][1] if raised else None)
    others = [f"rank {r} then raised {_short(status[r]['error'])}" for _, r in raised
              if r != cause]
    tail = f"; {'; '.join(others)}" if others else ""
    after = ""
    if cause is not None and ended_at is not None and "t" in status.get(cause, {}):
        after = f", {ended_at - status[cause]['t']:.1f} s after rank {cause}'s last record"
    return (f"{head}{tail}. The job ended with status {rc} after {seconds:.1f} s{after} "
            f"(collective timeout {collective_timeout_s:.0f} s, wall limit {timeout_s:.0f} s).")


def check_case(model_spec: str, overrides: dict, plan, *, seed: int = 0,
               timeout: datetime.timedelta = _TIMEOUT, repeats: int = 0) -> dict:
    """Run one plan on this rank and measure it against the eager model (inside torchrun).

    Returns:
        This rank's result: coordinates, ``max_abs_err`` (last-stage ranks, else ``None``),
        ``all_reduces`` in its graph, ``sharded`` weights ``{name: [global numel, local
        numel, global shape, local shape]}``, ``seconds`` for the first (checked) step and
        ``repeat_seconds`` for ``repeats`` more, each started after a barrier.
    """
    from codegen.runtime import parallelize
    from codegen.tensor_parallel import count_collectives
    from planner.models import load_model

    w = plan.workload
    lm = load_model(model_spec, overrides, batch_size=w.batch_size, seq_len=w.seq_len, seed=seed)
    _set_status(phase="eager reference")
    with torch.no_grad():
        ref = [x for x in pytree.tree_leaves(lm.model(*lm.args, **lm.kwargs))
               if isinstance(x, torch.Tensor)]
    _set_status(phase="parallelize")
    local = parallelize(lm.model, plan, lm.args, lm.kwargs, timeout=timeout)
    _set_status(coords=[local.coords.stage, local.coords.replica, local.coords.tp_rank])
    dist.barrier(group=None)
    _set_status(phase="forward")
    if os.environ.get(FAIL_RANK_ENV) == str(dist.get_rank()):
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: die mid-run, as `kill -9` would
    if os.environ.get(HANG_RANK_ENV) == str(dist.get_rank()):
        time.sleep(24 * 3600)  # test hook: alive but making no progress (a deadlock, a hang)
    with torch.no_grad():
        start = time.perf_counter()
        out = local(*lm.args, **lm.kwargs)
        seconds = time.perf_counter() - start
        repeat_seconds = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            local(*lm.args, **lm.kwargs)
            repeat_seconds.append(time.perf_counter() - start)
    err = None
    if out is not None:
        lo, hi = local.rows(w.batch_size)
        err = max((o - r[lo:hi]).abs().max().item() for o, r in zip(out, ref, strict=True))
    module = local.module
    sharded = {name: [int(torch.Size(g).numel()), module.get_parameter(name).numel(),
                      list(g), list(loc)]
               for name, (g, loc) in local.tp_report.sharded.items()}
    return {"rank": dist.get_rank(), "stage": local.coords.stage,
            "replica": local.coords.replica, "tp_rank": local.coords.tp_rank,
            "max_abs_err": err, "all_reduces": count_collectives(module).get("all_reduce", 0),
            "collectives": count_collectives(module),
            "sharded": sharded, "seconds": seconds, "repeat_seconds": repeat_seconds}


def _set_status(**fields) -> None:
    """Record this rank's state in the status dir (atomically), if one was given."""
    _STATUS.update(fields, t=time.time())
    path = _STATUS.get("path")
    if path:
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps({k: v for k, v in _STATUS.items() if k != "path"}))
        os.replace(tmp, path)


def _init(timeout: datetime.timedelta) -> None:
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one torchrun rank."""
    p = argparse.ArgumentParser(prog="python -m codegen.rank")
    p.add_argument("--plan")
    p.add_argument("--model")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", help="JSON list of {model, overrides, plan} (tests)")
    p.add_argument("--out", help="directory for per-rank JSON results (with --cases)")
    p.add_argument("--timeout", type=float, default=_TIMEOUT.total_seconds(),
                   help="seconds any collective or send/recv may wait")
    p.add_argument("--status-dir", help="where each rank records its state (run_check)")
    p.add_argument("--repeats", type=int, default=0,
                   help="timed forward passes after the first (checked) one")
    a = p.parse_args(argv)
    timeout = datetime.timedelta(seconds=a.timeout)
    rank = int(os.environ.get("RANK", 0))
    if a.status_dir:
        _STATUS["path"] = str(Path(a.status_dir, f"rank{rank}.json"))
    _set_status(state="running", phase="init", pid=os.getpid())
    try:
        code = _main(a, rank, timeout)
    except BaseException as exc:
        first = (str(exc).splitlines() or [""])[0]
        _set_status(state="error", error=f"{type(exc).__name__}: {first}"[:400])
        raise
    if code:
        _set_status(state="error", error=f"outputs differ beyond tolerance {a.tol:.0e}")
    else:
        _set_status(state="ok", phase="done")
    return code


def _main(a, rank: int, timeout: datetime.timedelta) -> int:
    from planner.models.loader import parse_set
    from planner.plan import Plan

    _init(timeout)
    try:
        if a.cases:
            results = []
            for case in json.loads(Path(a.cases).read_text()):
                plan = Plan.from_dict(case["plan"])
                results.append(check_case(case["model"], case.get("overrides", {}), plan,
                                          seed=a.seed, timeout=timeout))
            Path(a.out, f"rank{rank}.json").write_text(json.dumps(results))
            return 0
        plan = Plan.load(a.plan)
        result = check_case(a.model, parse_set(a.set), plan, seed=a.seed, timeout=timeout,
                            repeats=a.repeats)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if rank != 0:
            return 0
        _set_status(phase="report")
        return _report(plan, gathered, a.tol)
    finally:
        dist.destroy_process_group()


def _step_times(ranks: list[dict]) -> list[float]:
    """Seconds of each repeated step over ``ranks``: a step ends when its slowest rank ends."""
    n = min(len(r["repeat_seconds"]) for r in ranks)
    return [max(r["repeat_seconds"][i] for r in ranks) for i in range(n)]


def _fmt_steps(steps: list[float]) -> tuple[str, str]:
    if not steps:
        return f"{'-':>10}", f"{'-':>10}"
    return f"{statistics.median(steps):10.4f}", f"{min(steps):10.4f}"


def _report(plan, results: list[dict], tol: float) -> int:
    errs = [r["max_abs_err"] for r in results if r["max_abs_err"] is not None]
    worst = max(errs)
    print(f"{'stage':>5} {'ranks':>10} {'first call s':>13} {'median s':>10} {'best s':>10} "
          f"{'predicted compute s':>20}")  # fmt: skip
    for i, stage in enumerate(plan.stages):
        ranks = [r for r in results if r["stage"] == i]
        first = max(r["seconds"] for r in ranks)
        median, best = _fmt_steps(_step_times(ranks))
        print(f"{i:>5} {','.join(str(r['rank']) for r in ranks):>10} {first:>13.4f} {median} "
              f"{best} {stage.predicted.compute_s:>20.6f}")  # fmt: skip
    steps = _step_times(results)
    first = max(r["seconds"] for r in results)
    if steps:
        measured = (f"best {min(steps):.4f} s, median {statistics.median(steps):.4f} s over "
                    f"{len(steps)} steps after a first call of {first:.4f} s")  # fmt: skip
    else:
        measured = f"{first:.4f} s (one step)"
    print(f"end to end: measured {measured}; plan predicts {plan.predicted.latency_s:.6f} s"
          f" (prediction is for {plan.cluster.device}; this run is on "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'})")
    print(f"max abs error vs the unsharded model: {worst:.3e} (tolerance {tol:.0e})")
    if worst > tol:
        print("FAILED: outputs differ beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

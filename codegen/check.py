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

Before launching, ``preflight`` checks in this process, on the ``meta`` device (no weights):
that the plan can run here (sizes, ranks, device ids), that the model traces to the plan's
fingerprint, and that the job fits this machine's available memory (``/proc/meminfo``,
never the plan's claimed device capacity): ``RunRefused`` otherwise, with the numbers.
SIGINT/SIGTERM/SIGHUP while the job runs stop torchrun and every rank (SIGTERM, then SIGKILL
after a grace period; ranks run in sessions of their own, so they are found through
``/proc``, not by process group) and raise ``RunInterrupted``. The job's stderr (every
rank's, and torchrun's) goes to a log file that the failure message names.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
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

__all__ = ["run_check", "torchrun_command", "check_case", "main", "diagnose_failure",
           "preflight", "job_memory", "available_memory_bytes", "JobMemory", "RunRefused",
           "RunInterrupted"]

_TIMEOUT = datetime.timedelta(seconds=60)
#: ``plan run --check --steps``: the largest relative difference of a step's loss.
TRAIN_LOSS_RTOL = 1e-4
#: The check's AdamW: eps 1e-6, not 1e-8. A parameter whose true gradient is exactly zero
#: (an attention key bias: softmax ignores a shift shared by every key) gets rounding noise
#: of ~1e-9 that depends on the summation order, which eps 1e-8 turns into ±lr steps: on
#: one process, two microbatches instead of one move gpt-tiny's key bias 4.5e-4 in three
#: steps (docs/training.md). With eps 1e-6 the same noise moves it 5e-6.
CHECK_TRAIN_EPS = 1e-6
FAIL_RANK_ENV = "FX_PLANNER_FAIL_RANK"
HANG_RANK_ENV = "FX_PLANNER_HANG_RANK"
_STATUS: dict = {}
# Resident memory of one rank process before its model: Python, torch, transformers, gloo
# (measured: about 400 MiB RSS after the imports and a tiny model), and of torchrun itself.
RANK_PROCESS_BYTES = 400 << 20
LAUNCHER_BYTES = 300 << 20
# Part of MemAvailable a job may plan to use; the rest is left to the OS and other work.
MEMORY_FRACTION = 0.9
STOP_GRACE_S = 10.0


class RunRefused(ValueError):
    """``plan run`` will not launch this plan here; the message says why and what to change."""


class RunInterrupted(Exception):
    """The job was stopped by a signal to this process; every rank process was ended.

    Attributes:
        signal_name: ``SIGINT``, ``SIGTERM`` or ``SIGHUP``.
        stopped: rank processes that were still alive and were ended.
    """

    def __init__(self, signal_name: str, stopped: int, log_path: str | Path | None = None) -> None:
        self.signal_name, self.stopped = signal_name, stopped
        what = f"{stopped} rank process{'es' if stopped != 1 else ''}"
        logs = f" (their logs: {log_path})" if log_path else ""
        super().__init__(f"interrupted by {signal_name}; stopped torchrun and {what}, none "
                         f"left running{logs}")


@dataclasses.dataclass(frozen=True)
class JobMemory:
    """What a ``plan run`` job holds in this machine's memory at its peak, in bytes.

    Every rank builds the full model in float32 (the same seed on every rank, so the weights
    agree) before it keeps its shard, and the last-stage ranks run it unsharded for the
    reference; so each rank holds ``model_bytes`` on top of the plan's per-rank figure.

    Attributes:
        ranks: processes torchrun starts.
        model_bytes: one full model's parameters and buffers, as a rank builds it.
        plan_bytes: the plan's predicted memory (shard, activations, workspace) summed over
            ranks.
        reference_bytes: activations of the unsharded reference forward pass, summed over
            the ranks that run it (an estimate from the plan's activation figures).
        process_bytes: interpreter, torch and launcher overhead of all processes.
        reference_ranks: ranks that run the reference.
    """

    ranks: int
    model_bytes: int
    plan_bytes: int
    reference_bytes: int
    process_bytes: int
    reference_ranks: int

    @property
    def total_bytes(self) -> int:
        return (self.ranks * self.model_bytes + self.plan_bytes + self.reference_bytes
                + self.process_bytes)


def job_memory(plan, model, ranks=None) -> JobMemory:
    """Peak memory of running ``plan`` with ``plan run`` on this machine.

    Args:
        plan: a ``planner.plan.Plan``.
        model: the model the ranks will build (any device; on ``meta`` nothing is allocated);
            its parameters and buffers are counted in float32, as every rank builds it.
        ranks: the ranks this machine runs (one node of a multi-node run); default all.
    """
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (4 if t.is_floating_point() else t.element_size())

    seen, model_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            model_bytes += nbytes(t)
    par = plan.parallelism
    # On GPUs the shards, activations and the reference pass live in device memory; only
    # the ranks' full float32 builds and the processes are on this host.
    on_host = plan.cluster.device == "cpu"
    stage_of = {d: i for i, s in enumerate(plan.stages) for g in s.devices for d in g}
    here = sorted(stage_of if ranks is None else set(ranks) & set(stage_of))
    plan_bytes = sum(plan.stages[stage_of[d]].predicted.memory_bytes for d in here) * on_host
    # Activations of one stage on one device: its predicted peak less its layers' resident
    # bytes. Unsharded (x tp) and for the global batch (x dp) that is what the reference
    # forward pass holds at most, on each last-stage rank.
    activations = 0
    for s in plan.stages:
        resident = sum(plan.layers[j].costs[s.tp].memory_bytes
                       for j in range(s.layers[0], s.layers[1] + 1)
                       if s.tp in plan.layers[j].costs)
        activations = max(activations, max(0, s.predicted.memory_bytes - resident) * s.tp)
    reference_ranks = sum(stage_of[d] == len(plan.stages) - 1 for d in here)
    return JobMemory(ranks=len(here), model_bytes=model_bytes, plan_bytes=plan_bytes,
                     reference_bytes=activations * par.dp * reference_ranks * on_host,
                     process_bytes=len(here) * RANK_PROCESS_BYTES + LAUNCHER_BYTES,
                     reference_ranks=reference_ranks)


def available_memory_bytes() -> int | None:
    """This machine's available memory (``MemAvailable`` of ``/proc/meminfo``), or None
    where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def _fewer_ranks(need: JobMemory, available: int) -> str:
    """Advice on the rank count: how many ranks of this model would fit, if any."""
    budget = MEMORY_FRACTION * available - LAUNCHER_BYTES
    per_rank = (need.model_bytes + need.plan_bytes / need.ranks
                + need.reference_bytes / max(need.reference_ranks, 1) + RANK_PROCESS_BYTES)
    fit = int(budget // per_rank) if per_rank > 0 else 0
    if fit >= 1 and fit < need.ranks:
        return (f"plan for fewer ranks (each needs about {_gib(per_rank)}, so at most about "
                f"{fit} fit: --cluster {fit}xcpu), or use ")
    return (f"even one rank of this model needs about {_gib(per_rank)}, so use ")


def preflight(plan, model_spec: str, overrides: dict | None = None, *,
              available: int | None = None, nnodes: int = 1) -> JobMemory:
    """Everything ``plan run`` can check before starting a rank, in this process.

    The plan's sizes and device ids; the model built on ``meta`` (no weights) and traced
    there, against the plan's fingerprint; the job's peak memory (``job_memory``) against
    ``available`` (default: this machine's ``MemAvailable``; never the plan's claimed
    device capacity). With ``nnodes`` > 1 this machine runs one node's ranks, the node
    that needs the most (the rendezvous decides which node it runs).

    Returns:
        The job's memory estimate.

    Raises:
        RunRefused: naming the problem and what to change.
        planner.models.loader.ModelLoadError: ``model_spec`` cannot be built.
        planner.plan.PlanFormatError: the plan is not valid (sizes, dtype, the parts agreeing:
            ``Plan.validate``), or the model does not trace to the plan's fingerprint.
    """
    from codegen.layout import LayoutError, ParallelLayout
    from planner.cluster import DTYPES
    from planner.models.loader import load_model
    from planner.plan import PlanFormatError, check_fingerprint
    from planner.tracing import TraceError, trace

    plan.validate()  # the plan file's one schema: sizes, dtype, dp x microbatches | batch
    w = plan.workload
    layout = ParallelLayout.from_plan(plan)
    try:
        layout.validate()
    except LayoutError as e:
        raise RunRefused(f"the plan cannot run: {e}. Re-plan with `plan MODEL --out plan.json`.") from None
    if w.phase == "train":
        from codegen.train import untrainable

        why = untrainable(layout, plan.parallelism.schedule)
        if why is not None:
            raise RunRefused(f"this train plan cannot run: {why}.")
    ids = sorted({d for s in plan.stages for g in s.devices for d in g})
    if ids != list(range(layout.world_size)):
        raise RunRefused(f"the plan's stages use device ids {ids}; `plan run` starts "
                         f"{layout.world_size} ranks, which need ids 0..{layout.world_size - 1}. "
                         "Re-plan with `plan MODEL --out plan.json`.")
    def build(device: str):
        # A factory builds where it likes; under a meta default device most build there too
        # (nothing allocated), presets and hf: models honour ``device``.
        with torch.device(device):
            return load_model(model_spec, overrides, batch_size=w.batch_size,
                              seq_len=w.seq_len, dtype=DTYPES[w.dtype], device=device)

    lm = build("meta")
    if nnodes > 1:
        per_node = layout.world_size // nnodes
        need = max((job_memory(plan, lm.model, range(n * per_node, (n + 1) * per_node))
                    for n in range(nnodes)), key=lambda m: m.total_bytes)
    else:
        need = job_memory(plan, lm.model)
    available = available_memory_bytes() if available is None else available
    if available is not None and need.total_bytes > MEMORY_FRACTION * available:
        model = f"{plan.model.name} ({model_spec})" if plan.model.name != model_spec else model_spec
        raise RunRefused(
            f"this job would need about {_gib(need.total_bytes)} of memory and this machine has "
            f"{_gib(available)} available (MemAvailable; a job may use "
            f"{MEMORY_FRACTION:.0%} of it), so it was not launched. The {need.ranks} ranks each "
            f"build the full {model} in float32 before keeping their shard "
            f"({_gib(need.model_bytes)} each, {_gib(need.ranks * need.model_bytes)} in all); "
            f"the plan predicts {_gib(need.plan_bytes)} more over all ranks (shards, "
            f"activations, workspace); the unsharded reference's activations on "
            f"{need.reference_ranks} rank(s) add about {_gib(need.reference_bytes)}, and the "
            f"processes {_gib(need.process_bytes)}. The plan's claimed device memory is not "
            f"used: every rank runs on this machine. To run here: {_fewer_ranks(need, available)}"
            "a smaller model (a smaller preset, or fewer layers with --set "
            "num_hidden_layers=N for hf/llama models, n_layer=N for gpt ones), or a smaller "
            "--batch/--seq; or run the plan on a machine with more memory.")
    # The memory is checked first: building on meta is cheap, tracing a big model is not.
    try:
        try:
            traced = trace(lm.model, lm.args, lm.kwargs, name=lm.name)
        except TraceError:
            # A model that does not trace on meta (planned with --device cpu, or a factory
            # that mixes meta and cpu tensors) is built on cpu, as the ranks build it: one
            # copy, within the memory checked above.
            lm = build("cpu")
            traced = trace(lm.model, lm.args, lm.kwargs, name=lm.name)
        check_fingerprint(plan, traced)
    except PlanFormatError as e:
        given = f"{model_spec}" + "".join(f" --set {k}={json.dumps(v)}"
                                          for k, v in (overrides or {}).items())
        raise PlanFormatError(f"{e} (`plan run` built: {given})") from None
    if w.phase == "decode":
        _check_generates(plan, lm, model_spec)
    return need


def _check_generates(plan, lm, model_spec: str) -> None:
    """A decode plan's model must run as a ``planner.decode.DecodeStep`` (its one-token
    step with the KV cache as explicit state): one step on the device it was built on
    (``meta``: nothing computed, in well under a second; the ranks trace it); else
    ``RunRefused`` naming the reason, before any rank starts."""
    from codegen.generate import decode_context
    from planner.decode import DecodeError, DecodeStep

    try:
        step = DecodeStep(lm.model, context_len=decode_context(plan))
        with torch.no_grad():
            step(*step.example_inputs(batch=1, tokens=1))
    except (DecodeError, NotImplementedError, TypeError, ValueError, AttributeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RunRefused(
            f"{model_spec} cannot generate with fx-planner: its decode step (one token with "
            f"the KV cache as explicit state, planner.decode.DecodeStep) fails: {first}. "
            "Models that generate: the zoo GPT presets and HF llama, gpt2, qwen2, phi3, "
            "mistral and gemma (docs/generation.md); plan this model with --phase prefill to "
            "run its forward pass.") from None


def torchrun_command(nproc: int, worker_args: list[str],
                     rendezvous: list[str] | None = None) -> list[str]:
    """The ``python -m torch.distributed.run`` command line for ``codegen.rank`` (which runs
    ``codegen.check.main``): ``--standalone`` on this machine, or one agent of a multi-node
    job with ``rendezvous`` (``codegen.launch.rendezvous_args``)."""
    where = rendezvous if rendezvous is not None else [
        "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    return [sys.executable, "-m", "torch.distributed.run", *where, "-m", "codegen.rank",
            *worker_args]


def run_check(plan_path: str | Path, model: str, overrides: dict | None = None, *,
              tol: float = 1e-4, seed: int = 0, timeout_s: float = 600,
              collective_timeout_s: float = 60, repeats: int = 5, check_first: bool = True,
              log_path: str | Path | None = None, error_prefix: str = "",
              prompt_len: int | None = None, new_tokens: int = 16, steps: int = 3,
              json_output: bool = False, nnodes: int = 1, node_rank: int = 0,
              rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> int:
    """Launch ``plan_path`` with torchrun on this machine and check it against the model.

    A decode plan generates instead (``generate_case``): a prefill of ``prompt_len`` tokens
    (default the plan's context minus ``new_tokens``), then up to ``new_tokens`` greedy
    steps, every token compared with the unsharded model's ``generate`` (a finite ``tol``
    makes the first mismatch fail the run).

    Args:
        plan_path: a ``fx-planner/plan/v2`` file.
        model: the MODEL spec the plan was made for (``llama-tiny``, ``hf:gpt2``...).
        overrides: ``--set`` config overrides used when planning.
        tol: max abs error allowed (fp32).
        seed: weight and input seed (the same on every rank).
        timeout_s: wall-clock limit for the whole job; past it every rank is killed.
        collective_timeout_s: limit of every collective and stage-boundary send/recv.
        repeats: timed forward passes after the first (checked) one; the report gives the
            first call, the median and the best of them.
        check_first: run ``preflight`` (plan, fingerprint, memory) before launching; pass
            False only when the caller has just done it.
        log_path: where the job's stderr (all ranks and torchrun) goes; default a new
            ``fx-planner-run-*.log`` in the temp dir, removed when the job succeeds.
        error_prefix: put before the failure paragraph (``"error: "`` from the CLI).
        prompt_len, new_tokens: decode plans: the prompt and the tokens to generate.
        steps: train plans: AdamW steps (``train_case``), each step's loss compared with
            single-process training (relative difference <= ``TRAIN_LOSS_RTOL``) and the
            final weights within ``tol``.
        json_output: print rank 0's report as one JSON object (``check_report`` or
            ``generation_report``) instead of its tables.
        nnodes, node_rank, rdzv_endpoint, rdzv_id: a multi-node run (``codegen.launch``):
            this machine is node ``node_rank`` of ``nnodes``, whose torchrun agents meet at
            ``rdzv_endpoint`` (``HOST:PORT``) under the run id ``rdzv_id``; it starts the
            plan's ``devices_per_node`` ranks of one node. The report is printed where rank
            0 runs; every node exits with its verdict.

    Returns:
        0 when every output is within ``tol``; otherwise non-zero (torchrun's exit status,
        or 124 past ``timeout_s``), after printing to stderr one paragraph that names the
        rank that failed first and why, and the log file.

    Raises:
        RunRefused, planner.plan.PlanFormatError, planner.models.loader.ModelLoadError:
            from ``preflight``; nothing was launched.
        RunInterrupted: SIGINT, SIGTERM or SIGHUP arrived; every rank process was ended.
    """
    from planner.plan import Plan

    plan = Plan.load(plan_path)
    if check_first:
        preflight(plan, model, overrides, nnodes=nnodes if rdzv_endpoint else 1)
    nproc = plan.parallelism.dp * sum(s.tp for s in plan.stages[:plan.parallelism.pp])
    rendezvous = None
    if rdzv_endpoint is not None:
        from codegen.launch import node_layout, parse_endpoint, rendezvous_args

        parse_endpoint(rdzv_endpoint)
        layout = node_layout(nproc, nodes=plan.cluster.nodes,
                             devices_per_node=plan.cluster.devices_per_node, nnodes=nnodes)
        rendezvous = rendezvous_args(layout, rdzv_endpoint,
                                     rdzv_id or f"fx-planner-{plan.model.fingerprint[:12]}",
                                     join_timeout_s=timeout_s)
        rendezvous.insert(2, f"--node-rank={node_rank}")  # shown in torchrun's own logs
    keep_log = log_path is not None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix=f"fx-planner-run-{time.strftime('%Y%m%d-%H%M%S')}-",
                                        suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    with tempfile.TemporaryDirectory(prefix="fx-planner-check-") as status_dir:
        args = ["--plan", str(plan_path), "--model", model, "--tol", str(tol), "--seed",
                str(seed), "--timeout", str(collective_timeout_s), "--status-dir", status_dir,
                "--repeats", str(repeats), "--new-tokens", str(new_tokens), "--steps",
                str(steps)]
        if plan.workload.phase == "decode":
            args += ["--prompt-len", str(generation_lengths(plan, prompt_len, new_tokens)[0])]
        for key, value in (overrides or {}).items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        report = Path(status_dir, "report.json")
        if json_output:
            args += ["--json-out", str(report)]
        rc, seconds = _launch(torchrun_command(nproc, args, rendezvous), timeout_s, log_path)
        if json_output and report.exists():
            print(report.read_text())
        status = _read_status(status_dir, None if rendezvous else nproc)
        if rendezvous is not None and rc != 0 and not status:
            print(f"{error_prefix}plan run failed: no rank started on node {node_rank}: the "
                  f"rendezvous at {rdzv_endpoint} did not complete (torchrun ended with status "
                  f"{rc} after {seconds:.1f} s; wall limit {timeout_s:.0f} s): the other "
                  f"{nnodes - 1} node(s) of --nnodes {nnodes} did not all join, or the "
                  "endpoint cannot be reached. Start `plan run` with the same plan, --nnodes "
                  "and --rdzv-endpoint on every node (node 0's address and a port it can "
                  f"open). Full log: {log_path}", file=sys.stderr)
        elif rc != 0:
            stderr = log_path.read_text(errors="replace")
            print(error_prefix + diagnose_failure(
                rc, stderr, status, nproc, seconds=seconds, timeout_s=timeout_s,
                collective_timeout_s=collective_timeout_s, ended_at=time.time(),
                log_path=log_path), file=sys.stderr)
        elif not keep_log:
            log_path.unlink(missing_ok=True)
        if rendezvous is not None and rc == 0 and 0 not in status:
            ranks = sorted(status)
            stages = sorted({st["coords"][0] for st in status.values() if st.get("coords")})
            print(f"node {node_rank}: ran ranks {ranks} of the plan (stage(s) {stages}) and "
                  "they finished; the report is printed on the node that ran rank 0, and "
                  "every node exits non-zero when the check failed", file=sys.stderr)
        return rc


def generation_lengths(plan, prompt_len: int | None, new_tokens: int) -> tuple[int, int]:
    """``(prompt_len, context)`` of a decode plan's run: the plan's KV-cache context holds
    the prompt and the new tokens, so the prompt defaults to the context minus them.

    Raises:
        ValueError: the prompt and the new tokens do not fit the context, or either is < 1.
    """
    from codegen.generate import decode_context

    context = decode_context(plan)
    if new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {new_tokens}")
    prompt = context - new_tokens if prompt_len is None else prompt_len
    if prompt < 1 or prompt + new_tokens > context:
        raise ValueError(
            f"a prompt of {prompt} tokens and {new_tokens} new tokens do not fit this plan's "
            f"KV cache of {context} tokens (its --context): give --prompt-len and "
            f"--new-tokens that add up to at most {context}, or re-plan with a larger "
            "--context")
    return prompt, context


def _launch(cmd: list[str], timeout_s: float, log_path: Path) -> tuple[int, float]:
    """Run ``cmd`` in its own session with stderr to ``log_path``. Past ``timeout_s`` the
    launcher and every rank are stopped (status 124); on SIGINT/SIGTERM/SIGHUP to this
    process too, and ``RunInterrupted`` is raised. Returns (rc, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, lambda signum, _frame: received.append(signum))
    start = time.monotonic()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stderr=log, start_new_session=True)
        rc = None
        while rc is None and not received and time.monotonic() - start < timeout_s:
            try:
                rc = proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        if received:
            # torchrun may have ended in the same poll: its pid is reaped then (and could be
            # reused), and its ranks ended before it, so there is nothing left to stop
            ranks = _stop_job(proc) if rc is None else 0
            raise RunInterrupted(signal.Signals(received[0]).name, ranks, log_path)
        if rc is None:
            _stop_job(proc)
            rc = 124
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
    return rc, time.monotonic() - start


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid`` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every live process below ``root`` (not ``root``): pid -> start time."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st:
                children.setdefault(st[0], []).append((int(entry), st[2]))
    found, todo = {}, [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _alive(pid: int, started: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == started and st[1] not in ("Z", "X")


def _signal(pid: int, started: int, sig: int) -> None:
    if _alive(pid, started):  # the same process, not a reused pid
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_job(proc: subprocess.Popen, grace_s: float | None = None) -> int:
    """End torchrun and every process below it: SIGTERM, then SIGKILL after ``grace_s``
    (default ``STOP_GRACE_S``).

    The ranks run in sessions of their own (torchrun starts them so), so a signal to the
    launcher's process group would miss them: they are found through /proc and signalled
    one by one (a pid is signalled only while its start time is the one recorded).

    Returns:
        How many processes below torchrun (the ranks) were alive when this began.
    """
    tree = _descendants(proc.pid)
    alive_at_start = len(tree)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for pid, started in tree.items():
        _signal(pid, started, signal.SIGTERM)
    deadline = time.monotonic() + (STOP_GRACE_S if grace_s is None else grace_s)
    while time.monotonic() < deadline:
        if proc.poll() is None:  # torchrun may still start or track ranks: keep up with it
            for pid, started in _descendants(proc.pid).items():
                if pid not in tree:
                    tree[pid] = started
                    _signal(pid, started, signal.SIGTERM)
        if proc.poll() is not None and not any(_alive(p, t) for p, t in tree.items()):
            break
        time.sleep(0.1)
    if proc.poll() is None:
        tree.update(_descendants(proc.pid))
        proc.kill()
    for pid, started in tree.items():
        _signal(pid, started, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p, t) for p, t in tree.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive_at_start


def _read_status(status_dir: str | Path, nproc: int | None) -> dict[int, dict]:
    """Each rank's last record: ranks ``0..nproc-1`` (a missing one is ``not started``),
    or with ``nproc`` None (a node of a multi-node run, whose ranks the rendezvous chose)
    the ranks that recorded something here."""
    ranks = range(nproc) if nproc is not None else sorted(
        int(p.stem[4:]) for p in Path(status_dir).glob("rank*.json") if p.stem[4:].isdigit())
    status = {}
    for r in ranks:
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
                     ended_at: float | None = None, log_path: str | Path | None = None) -> str:
    """One paragraph naming the rank that failed first and the cause.

    ``status`` is each rank's last record (``state``: running / error / accuracy / ok,
    ``phase``, ``error``, ``t``); torchrun's failure summary in ``stderr`` gives exit codes.
    A rank that exited without recording a Python error (killed, crashed) is the cause;
    otherwise the rank whose error came first; the others are reported as consequences.
    Outputs beyond the tolerance (``accuracy``) are reported as such. Ranks that finished
    (``ok``) and were then stopped by torchrun are not counted as hung.
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
    quiet = [r for r in codes if status.get(r, {}).get("state") not in ("error", "accuracy")]
    stopped = sorted(r for r in quiet if codes[r] == -signal.SIGTERM
                     and status.get(r, {}).get("state") != "ok")
    died = sorted(r for r in quiet if codes[r] != -signal.SIGTERM)
    raised = sorted((st["t"], r) for r, st in status.items() if st.get("state") == "error")
    inaccurate = sorted(r for r, st in status.items() if st.get("state") == "accuracy")
    if not died and not raised and not inaccurate:
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
    elif inaccurate:
        r = inaccurate[0]
        head = (f"plan run --check failed on accuracy: {status[r].get('error')} against the "
                f"unsharded model (compared on rank {r} over the outputs of every last-stage "
                "rank; every rank ran to the end, none failed or hung). The sharded model "
                "computes something else than the model: if the difference is only float "
                "rounding (sums in another order), raise --tol")
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
    logs = f" Full rank logs: {log_path}" if log_path is not None else ""
    return (f"{head}{tail}. The job ended with status {rc} after {seconds:.1f} s{after} "
            f"(collective timeout {collective_timeout_s:.0f} s, wall limit {timeout_s:.0f} s)."
            f"{logs}")


def check_case(model_spec: str, overrides: dict, plan, *, seed: int = 0,
               timeout: datetime.timedelta = _TIMEOUT, repeats: int = 0) -> dict:
    """Run one plan on this rank and measure it against the eager model (inside torchrun).

    Returns:
        This rank's result: coordinates, ``max_abs_err`` (last-stage ranks, else ``None``),
        ``all_reduces`` in its graph, ``sharded`` weights ``{name: [global numel, local
        numel, global shape, local shape]}``, ``seconds`` for the first (checked) step and
        ``repeat_seconds`` for ``repeats`` more, each started after a barrier.
    """
    from codegen.layout import ParallelLayout
    from codegen.runtime import parallelize
    from codegen.tensor_parallel import count_collectives
    from planner.models import load_model

    w = plan.workload
    layout = ParallelLayout.from_plan(plan)
    compares = layout.coords(dist.get_rank()).stage == len(layout.stages) - 1
    lm = load_model(model_spec, overrides, batch_size=w.batch_size, seq_len=w.seq_len, seed=seed)
    ref = None
    if compares:  # only the last stage's ranks have outputs to compare
        _set_status(phase="eager reference")
        with torch.no_grad():
            ref = [x for x in pytree.tree_leaves(lm.model(*lm.args, **lm.kwargs))
                   if isinstance(x, torch.Tensor)]
    _set_status(phase="parallelize")
    local = parallelize(lm.model, plan, lm.args, lm.kwargs, timeout=timeout)
    # From here on this rank holds its stage's (sharded) weights only: the rest of the full
    # model, which every rank builds to shard it, is freed.
    lm.model = None
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
    if out is not None and ref is not None:
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
            "inserted": sorted([k, b] for k, b in local.tp_report.collectives),
            "param_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
            "sharded": sharded, "seconds": seconds, "repeat_seconds": repeat_seconds}


def train_batches(lm, steps: int, seed: int) -> list[tuple[tuple, dict]]:
    """``steps`` global batches shaped like the example inputs: step 0 is the example,
    each later step new token ids (uniform over the embedding's rows, seeded)."""
    from codegen.stage_split import model_tensor_inputs
    from codegen.train import token_ids

    ids = token_ids(model_tensor_inputs(lm.args, lm.kwargs))
    vocab = next((m.num_embeddings for m in lm.model.modules()
                  if isinstance(m, torch.nn.Embedding)), int(ids.max()) + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    out = [(lm.args, lm.kwargs)]
    for _ in range(steps - 1):
        new = torch.randint(0, vocab, tuple(ids.shape), generator=gen, dtype=ids.dtype)
        out.append(pytree.tree_map(lambda x, new=new: new if x is ids else x,
                                   (lm.args, lm.kwargs)))
    return out


def train_case(model_spec: str, overrides: dict, plan, *, steps: int, seed: int = 0,
               timeout: datetime.timedelta = _TIMEOUT) -> dict:
    """Train ``steps`` AdamW steps with a train plan on this rank (inside torchrun) and
    beside it, in this process, the unsharded model on the same batches
    (``codegen.train.reference_train``, same seed, same initial weights).

    Returns:
        This rank's result: coordinates, ``losses`` (the step's, every rank the same),
        ``reference`` losses, ``max_param_err``: the largest difference between this
        rank's final weights (a ZeRO-3/2 shard gathered over its dp group) and the same
        slice of the reference's, ``params`` it compared, and ``seconds`` per step.
    """
    import copy

    from codegen.runtime import parallelize
    from codegen.train import TrainConfig, reference_train
    from planner.models import load_model
    from planner.sharding import Shard

    config = TrainConfig(eps=CHECK_TRAIN_EPS)
    w = plan.workload
    lm = load_model(model_spec, overrides, batch_size=w.batch_size, seq_len=w.seq_len, seed=seed)
    batches = train_batches(lm, steps, seed)
    _set_status(phase="reference training")
    ref_model = copy.deepcopy(lm.model)
    ref_losses = reference_train(ref_model, batches, config)
    _set_status(phase="parallelize")
    # plan run's preflight has traced the model against the plan's fingerprint already
    local = parallelize(lm.model, plan, lm.args, lm.kwargs, timeout=timeout, train=config,
                        check_fingerprint=False)
    lm.model = None
    _set_status(coords=[local.coords.stage, local.coords.replica, local.coords.tp_rank])
    dist.barrier()
    losses, seconds = [], []
    for k, (args, kwargs) in enumerate(batches):
        _set_status(phase=f"training step {k}")
        start = time.perf_counter()
        losses.append(local.step(*args, **kwargs).item())
        seconds.append(time.perf_counter() - start)
    trainer = local.trainer
    err, compared = 0.0, 0
    for stage in trainer.stages:
        module = stage.graph.module
        placements = stage.report.analysis.params if stage.report.analysis else {}
        for name, p in module.named_parameters():
            mine = p.full_tensor() if hasattr(p, "full_tensor") else p
            want = ref_model.get_parameter(name).detach()
            place = placements.get(name)
            if isinstance(place, Shard) and trainer.tp > 1:
                parts = [want.narrow(place.dim, a, n)
                         for a, n in place.pieces(trainer.tp, trainer.coords.tp_rank)]
                want = torch.cat(parts, place.dim)
            err = max(err, (mine.detach() - want).abs().max().item())
            compared += 1
    return {"rank": dist.get_rank(), "stage": local.coords.stage,
            "stages": [s.index for s in trainer.stages], "replica": local.coords.replica,
            "tp_rank": local.coords.tp_rank, "losses": losses, "reference": ref_losses,
            "max_param_err": err, "params": compared, "seconds": seconds,
            "recomputed": [len(s.recomputed) for s in trainer.stages],
            "differentiable": [{k: v for k, v in s.differentiable.items() if k != "grad_sum"}
                               for s in trainer.stages],
            "grad_sum": [len(s.differentiable.get("grad_sum", [])) for s in trainer.stages]}


def train_report(results: list[dict], loss_tol: float, param_tol: float) -> dict:
    """Per step the distributed loss (the rank's furthest from the reference), the
    reference loss and their relative difference; the largest final weight difference
    over every rank."""
    first = results[0]
    steps = []
    for k, want in enumerate(first["reference"]):
        got = max((r["losses"][k] for r in results), key=lambda x, want=want: abs(x - want))
        rel = abs(got - want) / max(abs(want), 1e-12)
        steps.append({"step": k, "loss": got, "reference": want, "rel_diff": rel,
                      "ok": rel <= loss_tol})
    param_err = max(r["max_param_err"] for r in results)
    return {"phase": "train", "steps": steps, "loss_tol": loss_tol,
            "max_param_err": param_err, "param_tol": param_tol,
            "params_ok": param_err <= param_tol,
            "step_s": [max(r["seconds"][k] for r in results) for k in range(len(steps))]}


def _fmt_tol(x: float) -> str:
    """``1e-4``, not ``1e-04``."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e+")


def _report_train(results: list[dict], check: bool, tol: float, json_path: str | None) -> int:
    """Rank 0's report of a train plan's run; with ``check``, non-zero when a step's loss
    or the final weights differ beyond the tolerances."""
    report = train_report(results, TRAIN_LOSS_RTOL if check else math.inf, tol)
    n = len(report["steps"])
    good = sum(s["ok"] for s in report["steps"])
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    else:
        print(f"{'step':>4} {'loss':>12} {'reference':>12} {'rel diff':>10} {'step s':>8}")
        for s, sec in zip(report["steps"], report["step_s"], strict=True):
            print(f"{s['step']:>4} {s['loss']:>12.7f} {s['reference']:>12.7f} "
                  f"{s['rel_diff']:>10.2e} {sec:>8.3f}")
        print(f"final weights: max abs difference {report['max_param_err']:.3e} "
              f"(tolerance {_fmt_tol(tol)})")
        same = sum(s["rel_diff"] <= TRAIN_LOSS_RTOL for s in report["steps"])
        print(f"losses identical within {_fmt_tol(TRAIN_LOSS_RTOL)}: {same}/{n} steps")
    if good != n or not report["params_ok"]:
        what = (f"{n - good} of {n} step losses differ by more than "
                f"{_fmt_tol(TRAIN_LOSS_RTOL)} (relative)" if good != n else
                f"final weights differ by {report['max_param_err']:.3e} > {_fmt_tol(tol)}")
        print(f"FAILED: {what}", file=sys.stderr)
        _set_status(state="accuracy", error=what)
        return 1
    return 0


def _prompts(vocab: int, batch: int, prompt_len: int, pad: int, seed: int):
    """``batch`` prompts of lengths ``prompt_len``, ``prompt_len - 1``, ``prompt_len - 2``
    (repeating; at least 1), left-padded with ``pad``, and their attention mask."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    for i in range(batch):
        short = min(i % 3, prompt_len - 1)
        ids[i, :short], mask[i, :short] = pad, 0
    return ids, mask


def _token_id(config, key: str) -> int | None:
    value = getattr(config, key, None)
    value = value[0] if isinstance(value, (list, tuple)) and value else value
    vocab = getattr(config, "vocab_size", None)
    return value if isinstance(value, int) and vocab and 0 <= value < vocab else None


def generate_case(model_spec: str, overrides: dict, plan, *, prompt_len: int, new_tokens: int,
                  seed: int = 0, timeout: datetime.timedelta = _TIMEOUT) -> dict:
    """Generate with a decode plan on this rank (inside torchrun): prefill ``prompt_len``
    tokens, then up to ``new_tokens`` greedy steps (``codegen.generate``).

    Every rank builds the model and the same left-padded prompts; each dp replica generates
    its rows; every stage holds its blocks' KV cache for the plan's context, of it this
    rank's piece (the sharding analysis places it; the plan's recorded strategy shards the
    weights, and the inserted collectives are checked against its record). Rank 0 also
    runs transformers' ``generate`` on the unsharded model.

    Returns:
        This rank's result: coordinates, its replica's rows, the tokens (on the rank that
        broadcasts them), the reference (rank 0), step times, its KV-cache bytes.
    """
    from codegen.generate import Generator
    from codegen.layout import ParallelLayout
    from codegen.runtime import build_process_groups
    from planner.models import GPT, load_model

    w = plan.workload
    layout = ParallelLayout.from_plan(plan)
    rank = dist.get_rank()
    me = layout.coords(rank)
    groups = build_process_groups(layout, rank, timeout)
    _set_status(phase="build model")
    lm = load_model(model_spec, overrides, batch_size=w.batch_size, seq_len=prompt_len,
                    seed=seed)
    model = lm.model.eval()
    config = model.config
    eos, pad = _token_id(config, "eos_token_id"), _token_id(config, "pad_token_id")
    pad = pad if pad is not None else 0
    ids, mask = _prompts(config.vocab_size, w.batch_size, prompt_len, pad, seed)
    reference = None
    if rank == 0:
        _set_status(phase="eager reference")
        with torch.no_grad():
            if isinstance(model, GPT):  # the zoo's own loop
                full = model.generate(ids, new_tokens, attention_mask=mask, eos_token_id=eos,
                                      pad_token_id=pad)
            else:
                full = model.generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, eos_token_id=eos,
                                      pad_token_id=pad)
            reference = full[:, prompt_len:].tolist()
    _set_status(phase="parallelize")
    generator = Generator(model, plan, tp_group=groups.tp,
                          timeout_s=timeout.total_seconds())
    _set_status(coords=[me.stage, me.replica, me.tp_rank], phase="generate")
    # warm-up: traces both graphs and opens every send/recv pair and the token broadcast,
    # so that TTFT is the prefill's, not the first connection's
    generator.generate(ids, min(2, new_tokens), mask, eos, pad)
    dist.barrier()
    times: list[float] = []
    stage_times: dict[str, list[float]] = {"prefill": [], "decode": []}
    out = generator.generate(ids, new_tokens, mask, eos, pad, times=times,
                             stage_times=stage_times)
    source = layout.stages[-1].devices[me.replica][0]
    return {"rank": rank, "stage": me.stage, "replica": me.replica, "tp_rank": me.tp_rank,
            "rows": list(generator.rows), "tokens": out.tolist() if rank == source else None,
            "reference": reference, "eos": eos, "times": times, "stage_times": stage_times,
            "cache_bytes": generator.cache_bytes, "context": generator.context_len,
            "prompt_len": prompt_len, "new_tokens": new_tokens}


def _stage_call_s(ranks: list[dict], phase: str) -> float | None:
    """Median seconds of one call of a stage's module in ``phase``: the i-th calls of a
    replica's tp ranks end with the slowest; every replica's calls pooled."""
    calls = []
    for replica in sorted({r["replica"] for r in ranks}):
        lists = [r["stage_times"][phase] for r in ranks if r["replica"] == replica]
        calls += [max(c) for c in zip(*lists)]
    return statistics.median(calls) if calls else None


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "n": len(values)}


def generation_report(plan, results: list[dict]) -> dict:
    """What a decode plan's run measured next to what the plan predicts (``plan run
    --json`` prints it): tokens against the unsharded model's up to each sequence's EOS,
    per stage the KV-cache bytes a rank allocated and the seconds of its prefill and decode
    calls, end to end TTFT and TPOT (a round: every unfinished microbatch one token on)."""
    ref, eos = results[0]["reference"], results[0]["eos"]
    got = [None] * plan.workload.batch_size
    for r in results:
        if r["tokens"] is not None:
            lo, _ = r["rows"]
            for i, row in enumerate(r["tokens"]):
                got[lo + i] = row
    identical = total = 0
    first_mismatch = None
    for i, (mine, want) in enumerate(zip(got, ref, strict=True)):
        n = want.index(eos) + 1 if eos is not None and eos in want else len(want)
        for j in range(n):  # up to and including the sequence's EOS
            total += 1
            if j < len(mine) and mine[j] == want[j]:
                identical += 1
            elif first_mismatch is None:
                first_mismatch = {"sequence": i, "token": j,
                                  "got": mine[j] if j < len(mine) else None, "want": want[j]}
    stages = []
    for i, stage in enumerate(plan.stages):
        ranks = [r for r in results if r["stage"] == i]
        stages.append({
            "stage": i, "ranks": [r["rank"] for r in ranks], "tp": stage.tp,
            "kv_cache_bytes": {"allocated": max(r["cache_bytes"] for r in ranks),
                               "predicted": stage.kv_cache_bytes},
            "prefill_s": {"measured": _stage_call_s(ranks, "prefill"),
                          "predicted": stage.prefill_s},
            "decode_step_s": {"measured": _stage_call_s(ranks, "decode"),
                              "predicted": stage.predicted.compute_s + stage.predicted.comm_s},
        })
    sources = [r for r in results if r["tokens"] is not None]
    rounds = sorted(t for r in sources for t in r["times"][1:])
    first = results[0]
    return {
        "phase": "decode", "plan_device": plan.cluster.device,
        "run_device": "cuda" if torch.cuda.is_available() else "cpu",
        "batch": plan.workload.batch_size, "dp": plan.parallelism.dp,
        "microbatches": plan.parallelism.microbatches, "context": first["context"],
        "prompt_len": first["prompt_len"], "new_tokens": first["new_tokens"],
        "tokens": {"identical": identical, "total": total, "first_mismatch": first_mismatch},
        "stages": stages,
        "ttft_s": {"measured": max(r["times"][0] for r in sources),
                   "predicted": plan.predicted.ttft_s,
                   "predicted_prompt_len": plan.workload.seq_len},
        "tpot_s": {**_quantiles(rounds), "predicted": plan.predicted.tpot_s},
        "decode_step_s": {"predicted": plan.predicted.latency_s},
    }


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_generation(report: dict) -> None:
    print(f"{'stage':>5} {'ranks':>10} {'cache bytes/rank':>17} {'predicted':>10} "
          f"{'prefill s':>10} {'predicted':>10} {'decode step s':>14} {'predicted':>10}")
    for st in report["stages"]:
        kv, pre, dec = st["kv_cache_bytes"], st["prefill_s"], st["decode_step_s"]
        print(f"{st['stage']:>5} {','.join(map(str, st['ranks'])):>10} {kv['allocated']:>17} "
              f"{kv['predicted']:>10} {_fmt_s(pre['measured']):>10} "
              f"{_fmt_s(pre['predicted']):>10} {_fmt_s(dec['measured']):>14} "
              f"{_fmt_s(dec['predicted']):>10}")
    ttft, tpot = report["ttft_s"], report["tpot_s"]
    predicted_ttft = ("no TTFT prediction" if ttft["predicted"] is None else
                      f"predicted {ttft['predicted']:.4f} s for {ttft['predicted_prompt_len']} "
                      "tokens")
    if tpot["n"]:
        measured = (f"TPOT median {tpot['median']:.4f} s (p10 {tpot['p10']:.4f} - p90 "
                    f"{tpot['p90']:.4f} s) over {tpot['n']} rounds")
    else:
        measured = "TPOT - (one token)"
    predicted_tpot = "" if tpot["predicted"] is None else f", predicted {tpot['predicted']:.4f} s"
    print(f"end to end: TTFT {ttft['measured']:.4f} s for {report['prompt_len']}-token prompts "
          f"({predicted_ttft}), {measured}{predicted_tpot}; the plan is for "
          f"{report['plan_device']}, this run is on {report['run_device']}")
    tokens = report["tokens"]
    print(f"tokens identical: {tokens['identical']}/{tokens['total']}")


def _report_generation(plan, results: list[dict], check: bool, json_path: str | None) -> int:
    """Rank 0: the run's ``generation_report``, printed (or written to ``json_path``)."""
    report = generation_report(plan, results)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    else:
        _print_generation(report)
    bad = report["tokens"]["first_mismatch"]
    if bad is not None and check:
        print(f"FAILED: sequence {bad['sequence']}, new token {bad['token']}: {bad['got']} "
              f"where the unsharded model generates {bad['want']}", file=sys.stderr)
        _set_status(state="accuracy",
                    error=f"token mismatch at sequence {bad['sequence']}, step {bad['token']}")
        return 1
    return 0


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
    p.add_argument("--prompt-len", type=int, default=None, help="decode plans: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=16, help="decode plans: tokens to generate")
    p.add_argument("--steps", type=int, default=3, help="train plans: AdamW steps")
    p.add_argument("--json-out", default=None, help="rank 0 writes its report here as JSON "
                   "instead of printing it")
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
    if code and _STATUS.get("state") != "accuracy":
        _set_status(state="error", error=f"exited with status {code}")
    elif not code:
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
                if plan.workload.phase == "train":
                    results.append(train_case(case["model"], case.get("overrides", {}), plan,
                                              steps=case.get("steps", a.steps), seed=a.seed,
                                              timeout=timeout))
                    continue
                results.append(check_case(case["model"], case.get("overrides", {}), plan,
                                          seed=a.seed, timeout=timeout))
            Path(a.out, f"rank{rank}.json").write_text(json.dumps(results))
            return 0
        plan = Plan.load(a.plan)
        decode = plan.workload.phase == "decode"
        train = plan.workload.phase == "train"
        if train:
            result = train_case(a.model, parse_set(a.set), plan, steps=a.steps, seed=a.seed,
                                timeout=timeout)
        elif decode:
            result = generate_case(a.model, parse_set(a.set), plan, prompt_len=a.prompt_len,
                                   new_tokens=a.new_tokens, seed=a.seed, timeout=timeout)
        else:
            result = check_case(a.model, parse_set(a.set), plan, seed=a.seed,
                                timeout=timeout, repeats=a.repeats)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        code = 0
        if rank == 0:
            _set_status(phase="report")
            if train:
                code = _report_train(gathered, math.isfinite(a.tol), a.tol, a.json_out)
            elif decode:
                code = _report_generation(plan, gathered, math.isfinite(a.tol), a.json_out)
            else:
                code = _report(plan, gathered, a.tol, a.json_out)
        # Every rank exits with rank 0's verdict, so that on several nodes every node's
        # torchrun (and `plan run`) fails when the check failed, not only rank 0's.
        verdict = [code, _STATUS.get("error")]
        dist.broadcast_object_list(verdict, src=0)
        if rank != 0 and verdict[0]:
            _set_status(state="accuracy", error=f"{verdict[1]} (found by rank 0)")
        return verdict[0]
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


def check_report(plan, results: list[dict], tol: float) -> dict:
    """What a forward plan's run measured next to what the plan predicts (``plan run
    --json`` prints it): the worst error against the unsharded model, per stage its first
    call and repeated steps, end to end."""
    errs = [r["max_abs_err"] for r in results if r["max_abs_err"] is not None]
    stages = []
    for i, stage in enumerate(plan.stages):
        ranks = [r for r in results if r["stage"] == i]
        steps = _step_times(ranks)
        stages.append({"stage": i, "ranks": [r["rank"] for r in ranks],
                       "first_call_s": max(r["seconds"] for r in ranks),
                       "median_s": statistics.median(steps) if steps else None,
                       "best_s": min(steps) if steps else None,
                       "predicted_compute_s": stage.predicted.compute_s})
    steps = _step_times(results)
    return {"phase": plan.workload.phase, "plan_device": plan.cluster.device,
            "run_device": "cuda" if torch.cuda.is_available() else "cpu",
            "max_abs_err": max(errs), "tol": tol, "stages": stages,
            "step_s": {"first_call": max(r["seconds"] for r in results),
                       "median": statistics.median(steps) if steps else None,
                       "best": min(steps) if steps else None, "n": len(steps),
                       "predicted": plan.predicted.latency_s}}


def _report(plan, results: list[dict], tol: float, json_path: str | None) -> int:
    report = check_report(plan, results, tol)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    else:
        print(f"{'stage':>5} {'ranks':>10} {'first call s':>13} {'median s':>10} {'best s':>10} "
              f"{'predicted compute s':>20}")  # fmt: skip
        for st in report["stages"]:
            print(f"{st['stage']:>5} {','.join(map(str, st['ranks'])):>10} "
                  f"{st['first_call_s']:>13.4f} {_fmt_s(st['median_s']):>10} "
                  f"{_fmt_s(st['best_s']):>10} {st['predicted_compute_s']:>20.6f}")
        step = report["step_s"]
        if step["n"]:
            measured = (f"best {step['best']:.4f} s, median {step['median']:.4f} s over "
                        f"{step['n']} steps after a first call of {step['first_call']:.4f} s")
        else:
            measured = f"{step['first_call']:.4f} s (one step)"
        print(f"end to end: measured {measured}; plan predicts {step['predicted']:.6f} s"
              f" (prediction is for {report['plan_device']}; this run is on "
              f"{report['run_device']})")
        print(f"max abs error vs the unsharded model: {report['max_abs_err']:.3e} "
              f"(tolerance {tol:.0e})")
    worst = report["max_abs_err"]
    if worst > tol:
        print("FAILED: outputs differ beyond tolerance", file=sys.stderr)
        _set_status(state="accuracy", error=f"max abs error {worst:.3e} > tolerance {tol:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

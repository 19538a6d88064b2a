"""Greedy generation across pipeline stages and tensor-parallel groups (issue 12).

Every rank holds one stage of a traced ``planner.decode.DecodeStep``: its prefill graph
(traced at the prompt length) and its decode graph (one token), both cut by
``codegen.stage_split.split_stages`` and sharded for the rank's tensor-parallel rank by
``codegen.tensor_parallel.shard_stage``, so the rank keeps only its stage's blocks' KV
cache, and of it only its piece (split by KV heads where attention is).

A replica's sequences are split into ``microbatches`` groups, each with its own cache,
kept in flight together: stage i runs group j's step while stage i + 1 runs group j - 1's.
One step of one group:

- the first stage runs on the step's tokens, positions and cache mask, every later stage on
  the tensors the stage before sends it (``recv_from``; the boundary values are replicated
  over a tp group, so one peer suffices), and sends its own on (``send_to``);
- every stage keeps the group's updated cache;
- the last stage picks the group's next tokens (``planner.decode.GreedyState``: greedy, with
  EOS and padding as transformers' ``generate`` does) and broadcasts them from ``source``
  to every rank of the replica, asynchronously: a rank waits for group j's tokens only when
  it is about to run group j's next step, and runs the other groups' steps meanwhile.

Every rank issues the broadcasts in the same order (round by round, group by group), and
all know every token, so they stop each group at the same step.
"""

from __future__ import annotations

import datetime
import math
import time

import torch
import torch.distributed as dist

from codegen.runtime import _wait
from codegen.stage_split import StageGraph
from planner.decode import GreedyState

__all__ = ["generate_stage", "Generator", "cache_specs", "decode_context"]

def decode_context(plan) -> int:
    """A decode plan's KV-cache context in tokens: its ``--context`` (recorded in
    ``workload_full``), else its sequence length."""
    return (plan.extra.get("workload_full") or {}).get("context_len") or plan.workload.seq_len


def cache_specs(stage: StageGraph) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """``(shape, dtype)`` of a stage graph's cache inputs (its last ``state_inputs``
    placeholders), as sharded: what one microbatch's cache on this rank allocates."""
    placeholders = [n.meta["val"] for n in stage.module.graph.nodes if n.op == "placeholder"]
    return [(tuple(v.shape), v.dtype)
            for v in placeholders[len(placeholders) - len(stage.state_inputs):]]


#: p2p tags of one group step: ``(round * groups + group) * _TAGS + i`` for its i-th tensor.
_TAGS = 64


@torch.no_grad()
def generate_stage(prefill: StageGraph, decode: StageGraph, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, max_new_tokens: int,
                   eos_token_id: int | None = None, pad_token_id: int | None = None, *,
                   context_len: int, microbatches: int = 1,
                   recv_from: int | None = None, send_to: tuple[int, ...] = (),
                   source: int = 0, group=None, timeout_s: float = 60.0,
                   times: list[float] | None = None,
                   stage_times: dict[str, list[float]] | None = None) -> torch.Tensor:
    """Generate greedily with this rank's stage; every rank returns the same tokens.

    Args:
        prefill, decode: this rank's stage of the prompt-length and one-token graphs, traced
            for one group (``b / microbatches`` rows) and sharded alike (their cache inputs
            have the same local shapes).
        input_ids, attention_mask: the replica's prompts ``[b, T]``, left-padded (every rank).
        max_new_tokens, eos_token_id, pad_token_id: as in transformers' ``generate``.
        context_len: the cache's slots (the ``DecodeStep``'s context).
        microbatches: groups of ``b / microbatches`` sequences kept in flight.
        recv_from: the global rank this stage receives its inputs from (None: first stage).
        send_to: the ranks of the next stage this rank sends to (empty: last stage).
        source: the global rank whose tokens every rank takes (one of the last stage).
        group: the ranks that generate these sequences together (one dp replica's; default
            every rank): the token broadcast runs on it.
        timeout_s: limit of every send, receive and broadcast.
        times: when given, gets the seconds until every group's first token is known on this
            rank (TTFT), then of each round (every unfinished group one token further).
        stage_times: when given, ``{"prefill": [...], "decode": [...]}`` gets the seconds of
            each call of this rank's stage module (its compute and collectives, not the
            waits for the stage before).

    Returns:
        The new tokens ``[b, n]``, ``n <= max_new_tokens`` (a group that finished early is
        filled with the pad id, as one batch would be).
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    first, last = recv_from is None, not send_to
    b, T = input_ids.shape
    m = microbatches
    if m < 1 or b % m:
        raise ValueError(f"{b} sequences cannot be split into {m} equal groups")
    if T + max_new_tokens > context_len:
        raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed the cache's "
                         f"{context_len} slots")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = b // m
    ids = input_ids.split(rows)
    seqs = [GreedyState(mask, context_len, max_new_tokens, eos_token_id, pad_token_id)
            for mask in attention_mask.split(rows)]
    specs = {id(s): [(tuple(n.meta["val"].shape), n.meta["val"].dtype)
                     for n in s.module.graph.nodes if n.op == "placeholder"]
             for s in (prefill, decode)}
    caches = [[torch.zeros(shape, dtype=dtype) for shape, dtype in cache_specs(decode)]
              for _ in range(m)]
    rank = dist.get_rank()
    pending: list = [None] * m  # per group: (broadcast work, its token tensor)
    # Per group: its last step's sends, awaited lazily at the group's next step (its token
    # came back by then, so the next stage has received them): a stage never waits for
    # the next one to post its receive before it runs another group.
    sends: list[list] = [[] for _ in range(m)]

    def finish_sends(g: int) -> None:
        for w, dst, tag in sends[g]:
            _wait(w, timeout, f"rank {rank} sending step {tag} to rank {dst}")
        sends[g] = []

    def step(stage: StageGraph, g: int, inputs, tag: int) -> None:
        """Group g's step through this stage, then its token's broadcast (issued, not
        awaited)."""
        n_in = len(stage.inputs) - len(stage.state_inputs)
        if first:
            args = list(inputs)
        else:
            args = [torch.empty(shape, dtype=dtype) for shape, dtype in specs[id(stage)][:n_in]]
            for i, t in enumerate(args):
                _wait(dist.irecv(t, src=recv_from, tag=tag * _TAGS + i), timeout,
                      f"rank {rank} waiting for step {tag} from rank {recv_from}")
        start = time.perf_counter()
        out = stage.module(*args, *caches[g])
        if stage_times is not None:
            stage_times["prefill" if stage is prefill else "decode"].append(
                time.perf_counter() - start)
        n_out = len(out) - len(stage.state_outputs)
        sent, caches[g] = out[:n_out], list(out[n_out:])
        finish_sends(g)
        sends[g] = [(dist.isend(t.contiguous(), dst=dst, tag=tag * _TAGS + i), dst, tag)
                    for dst in send_to for i, t in enumerate(sent)]
        token = seqs[g].choose(sent[0][:, -1]) if last else torch.zeros(rows, dtype=torch.long)
        pending[g] = (dist.broadcast(token, src=source, group=group, async_op=True), token)

    def token_of(g: int) -> torch.Tensor:
        work, token = pending[g]
        _wait(work, timeout, f"rank {rank} waiting for the next token from rank {source}")
        return token

    clock = time.perf_counter()
    for g in range(m):
        s = seqs[g]
        step(prefill, g, (ids[g], s.positions, s.valid), g)
    active, rounds = list(range(m)), 0
    while active:
        rounds += 1
        for g in list(active):
            token = token_of(g)
            if g == active[-1] and times is not None:
                now = time.perf_counter()
                times.append(now - clock)
                clock = now
            if seqs[g].accept(token):
                active.remove(g)
                continue
            step(decode, g, seqs[g].advance(token), rounds * m + g)
    for g in range(m):
        finish_sends(g)
    width = max(len(s.out) for s in seqs)
    return torch.cat([s.tokens(width) for s in seqs], 0)


class Generator:
    """One rank's part of a decode plan, generating (``planner.parallelize(...).generate``).

    Built on every rank of the job (it creates one process group per dp replica, so every
    rank must build it, in the same order). ``generate`` traces the model's
    ``planner.decode.DecodeStep`` at the prompt length and at one token for one microbatch
    of this replica's rows (cached per shape), cuts the plan's stages, shards this rank's stage with
    the plan's recorded strategy (the inserted collectives are checked against the record:
    kinds and counts) and runs ``generate_stage``. It keeps a reference to the full model
    to trace new prompt lengths: the memory of the whole model stays on every rank.

    Attributes:
        context_len: the plan's KV-cache context (prompt + new tokens fit in it).
        cache_bytes: this rank's KV-cache bytes (every microbatch's), once ``generate`` ran.
    """

    def __init__(self, model, plan, *, tp_group=None, timeout_s: float = 60.0) -> None:
        from codegen.layout import ParallelLayout
        from planner.decode import DecodeStep

        self.plan = plan
        self.layout = ParallelLayout.from_plan(plan)
        self.rank = dist.get_rank()
        self.me = self.layout.coords(self.rank)
        self.timeout_s = timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        self.replicas = [dist.new_group(sorted(d for s in self.layout.stages
                                               for d in s.devices[r]), timeout=timeout)
                         for r in range(self.layout.dp)]
        self.tp_group = tp_group
        self.context_len = decode_context(plan)
        self.step = DecodeStep(model, context_len=self.context_len)
        self._stages: dict[tuple[int, int], StageGraph] = {}
        self.cache_bytes = 0

    def _stage(self, rows: int, tokens: int) -> StageGraph:
        from codegen.stage_split import split_stages
        from codegen.tensor_parallel import check_against, shard_stage
        from planner.tracing import trace

        key = (rows, tokens)
        if key not in self._stages:
            stage_layout = self.layout.stages[self.me.stage]
            traced = trace(self.step, self.step.example_inputs(batch=rows, tokens=tokens))
            stage = split_stages(traced, self.layout.stage_layers)[self.me.stage]
            group = self.tp_group.group_name if stage_layout.tp > 1 else ""
            report = shard_stage(stage, traced, stage_layout.tp, self.me.tp_rank, group,
                                 sharding=stage_layout.sharding)
            if stage_layout.sharding is not None:
                check_against(report, stage_layout.sharding, None)
            self._stages[key] = stage
        return self._stages[key]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, *,
                 times: list[float] | None = None,
                 stage_times: dict[str, list[float]] | None = None) -> torch.Tensor:
        """Greedy generation for the global batch ``input_ids`` ``[B, T]`` (left-padded,
        the same on every rank): this rank's replica generates its rows, in the plan's
        microbatches kept in flight across the stages; returns their new tokens
        ``[B / dp, n]`` on every rank of the replica (``rows`` says which). ``times`` and
        ``stage_times`` as in ``generate_stage``."""
        B, T = input_ids.shape
        dp = self.layout.dp
        if B % dp:
            raise ValueError(f"batch {B} is not divisible by the plan's dp {dp}")
        rows, m = B // dp, self.layout.microbatches
        if rows % m:
            raise ValueError(f"the {rows} sequences of a replica (batch {B} / dp {dp}) cannot "
                             f"be split into the plan's {m} microbatches: use a batch that "
                             f"dp x microbatches = {dp * m} divides")
        lo = self.me.replica * rows
        self.rows = (lo, lo + rows)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefill, decode = self._stage(rows // m, T), self._stage(rows // m, 1)
        self.cache_bytes = m * sum(math.prod(shape) * dtype.itemsize
                                   for shape, dtype in cache_specs(decode))
        recv_from, send_to = self.layout.boundary_peers(self.rank)
        return generate_stage(prefill, decode, input_ids[lo:lo + rows],
                              attention_mask[lo:lo + rows], max_new_tokens, eos_token_id,
                              pad_token_id, context_len=self.context_len,
                              microbatches=m, recv_from=recv_from, send_to=send_to,
                              source=self.layout.stages[-1].devices[self.me.replica][0],
                              group=self.replicas[self.me.replica],
                              timeout_s=self.timeout_s, times=times,
                              stage_times=stage_times)

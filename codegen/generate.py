"""Greedy generation across pipeline stages and tensor-parallel groups (issue 12, part).

Every rank holds one stage of a traced ``planner.decode.DecodeStep``: its prefill graph
(traced at the prompt length) and its decode graph (one token), both cut by
``codegen.stage_split.split_stages`` and sharded for the rank's tensor-parallel rank by
``codegen.tensor_parallel.shard_stage``, so the rank keeps only its stage's blocks' KV
cache, and of it only its piece (split by KV heads where attention is). One step:

- the first stage runs on the step's tokens, positions and cache mask, every later stage on
  the tensors the stage before sends it (``recv_from``; the boundary values are replicated
  over a tp group, so one peer suffices), and sends its own on (``send_to``);
- every stage keeps its updated cache;
- the last stage picks the next token (greedy, with EOS and padding as transformers'
  ``generate`` does) and broadcasts it from ``source`` to every rank, which all update the
  positions and masks the same way.

Groups of sequences are not yet kept in flight across stages (each step drains the
pipeline); docs/generation.md says what is missing.
"""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from codegen.runtime import _wait
from codegen.stage_split import StageGraph
from planner.decode import prompt_positions

__all__ = ["generate_stage"]


@torch.no_grad()
def generate_stage(prefill: StageGraph, decode: StageGraph, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, max_new_tokens: int,
                   eos_token_id: int | None = None, pad_token_id: int | None = None, *,
                   context_len: int,
                   recv_from: int | None = None, send_to: tuple[int, ...] = (),
                   source: int = 0, group=None, timeout_s: float = 60.0,
                   times: list[float] | None = None) -> torch.Tensor:
    """Generate greedily with this rank's stage; every rank returns the same tokens.

    Args:
        prefill, decode: this rank's stage of the prompt-length and one-token graphs
            (same layers, sharded alike: their cache inputs have the same local shapes).
        input_ids, attention_mask: the prompts ``[b, T]``, left-padded (every rank).
        max_new_tokens, eos_token_id, pad_token_id: as in transformers' ``generate``.
        context_len: the cache's slots (the ``DecodeStep``'s context).
        recv_from: the global rank this stage receives its inputs from (None: first stage).
        send_to: the ranks of the next stage this rank sends to (empty: last stage).
        source: the global rank whose tokens every rank takes (one of the last stage).
        group: the ranks that generate these sequences together (one dp replica's; default
            every rank): the token broadcast runs on it.
        timeout_s: limit of every send, receive and broadcast.
        times: when given, gets the seconds of the prefill step, then of each decode step,
            each up to its token being known on this rank.

    Returns:
        The new tokens ``[b, n]``, ``n <= max_new_tokens``.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    first, last = recv_from is None, not send_to
    b, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    specs = {id(s): [(tuple(n.meta["val"].shape), n.meta["val"].dtype)
                     for n in s.module.graph.nodes if n.op == "placeholder"]
             for s in (prefill, decode)}
    cache = [torch.zeros(shape, dtype=dtype) for shape, dtype in
             specs[id(decode)][len(decode.inputs) - len(decode.state_inputs):]]
    if T + max_new_tokens > context_len:
        raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceed the cache's "
                         f"{context_len} slots")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    rank = dist.get_rank()

    def step(stage: StageGraph, ids, pos, mask, tag: int):
        nonlocal cache
        n_in = len(stage.inputs) - len(stage.state_inputs)
        if first:
            args = [ids, pos, mask]
        else:
            args = [torch.empty(shape, dtype=dtype) for shape, dtype in specs[id(stage)][:n_in]]
            for i, t in enumerate(args):
                _wait(dist.irecv(t, src=recv_from, tag=tag * 64 + i), timeout,
                      f"rank {rank} waiting for step {tag} from rank {recv_from}")
        out = stage.module(*args, *cache)
        n_out = len(out) - len(stage.state_outputs)
        sent, cache = out[:n_out], list(out[n_out:])
        works = [(dist.isend(t.contiguous(), dst=dst, tag=tag * 64 + i), dst)
                 for dst in send_to for i, t in enumerate(sent)]
        for w, dst in works:
            _wait(w, timeout, f"rank {rank} sending step {tag} to rank {dst}")
        return sent[0][:, -1] if last else None

    def share(logits, done):
        token = torch.zeros(b, dtype=torch.long)
        if last:
            token = logits.argmax(-1)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad), token)
        _wait(dist.broadcast(token, src=source, group=group, async_op=True), timeout,
              f"rank {rank} waiting for the next token from rank {source}")
        return token

    positions = prompt_positions(real)
    lengths = real.sum(-1)
    slots = torch.arange(context_len)
    valid = slots[None, :] < lengths[:, None]
    clock = time.perf_counter()
    logits = step(prefill, input_ids, positions, valid, 0)
    done = torch.zeros(b, dtype=torch.bool)
    position = lengths.clone()
    out = []
    for n in range(max_new_tokens):
        token = share(logits, done)
        if times is not None:
            now = time.perf_counter()
            times.append(now - clock)
            clock = now
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        out.append(token)
        if n == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        valid = valid | (slots[None, :] == position[:, None])
        logits = step(decode, token[:, None], position[:, None], valid, n + 1)
        position = position + 1
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(b, 0)



class Generator:
    """One rank's part of a decode plan, generating (``planner.parallelize(...).generate``).

    Built on every rank of the job (it creates one process group per dp replica, so every
    rank must build it, in the same order). ``generate`` traces the model's
    ``planner.decode.DecodeStep`` at the prompt length and at one token for this replica's
    rows (cached per prompt length), cuts the plan's stages, shards this rank's stage with
    the plan's recorded strategy (the inserted collectives are checked against the record:
    kinds and counts) and runs ``generate_stage``. It keeps a reference to the full model
    to trace new prompt lengths: the memory of the whole model stays on every rank.

    Attributes:
        context_len: the plan's KV-cache context (prompt + new tokens fit in it).
        cache_bytes: this rank's KV-cache bytes, once ``generate`` ran.
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
        w = plan.workload
        self.context_len = (plan.extra.get("workload_full") or {}).get("context_len") \
            or w.seq_len
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
                 times: list[float] | None = None) -> torch.Tensor:
        """Greedy generation for the global batch ``input_ids`` ``[B, T]`` (left-padded,
        the same on every rank): this rank's replica generates its rows; returns their new
        tokens ``[B / dp, n]`` on every rank of the replica (``rows`` says which)."""
        B, T = input_ids.shape
        dp = self.layout.dp
        if B % dp:
            raise ValueError(f"batch {B} is not divisible by the plan's dp {dp}")
        rows = B // dp
        lo = self.me.replica * rows
        self.rows = (lo, lo + rows)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefill, decode = self._stage(rows, T), self._stage(rows, 1)
        self.cache_bytes = sum(
            n.meta["val"].numel() * n.meta["val"].element_size()
            for n in decode.module.graph.nodes
            if n.op == "placeholder" and n.name in decode.state_inputs)
        recv_from, send_to = self.layout.boundary_peers(self.rank)
        return generate_stage(prefill, decode, input_ids[lo:lo + rows],
                              attention_mask[lo:lo + rows], max_new_tokens, eos_token_id,
                              pad_token_id, context_len=self.context_len,
                              recv_from=recv_from, send_to=send_to,
                              source=self.layout.stages[-1].devices[self.me.replica][0],
                              group=self.replicas[self.me.replica],
                              timeout_s=self.timeout_s, times=times)

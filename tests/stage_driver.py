"""A tiny scheduler for model tests: drives a chain of StageRunners (one PP pipeline, as seen by one TP
rank) through prompts with continuous batching, paged blocks from a shuffled free list, chunked
prefill, late arrivals and block reuse after a sequence finishes. Imports no transformers, so spawned
TP workers can use it cheaply.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trellis.core.plan import NewRequest, SeqStep, StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import StageRunner


@dataclass
class DriveResult:
    tokens: list[list[int]]  # generated tokens per prompt
    first_logits: list[list[float]]  # last stage's logits at each prompt's first sampled position
    steps: int = 0


@dataclass
class _Seq:
    prompt: list[int]
    arrival: int
    sampling: SamplingParams
    fed: int = 0  # tokens already in the KV cache
    table: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    announced: bool = False


def drive(
    runners: Sequence[StageRunner],
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    tp: TPGroup | None = None,
    chunk_size: int | None = None,
    arrivals: Sequence[int] | None = None,
    sampling: Sequence[SamplingParams] | None = None,
    seed: int = 0,
) -> DriveResult:
    """Run every prompt to ``max_new_tokens`` through ``runners`` (stage order); every TP rank calls
    this with the same arguments, and the leader's sampled tokens are broadcast to the others."""
    tp = tp or TPGroup.single()
    block_size, num_blocks = runners[0].block_size, runners[0].num_blocks
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)  # non-contiguous tables, like a long-running server
    seqs = [
        _Seq(list(p), (arrivals or [0] * len(prompts))[i], (sampling or [SamplingParams()] * len(prompts))[i])
        for i, p in enumerate(prompts)
    ]
    first_logits: list[list[float]] = [[] for _ in prompts]
    finished: list[int] = []
    step_id = 0
    while any(len(s.output) < max_new_tokens for s in seqs):
        steps, new_requests = [], []
        for seq_id, s in enumerate(seqs):
            if s.arrival > step_id or len(s.output) >= max_new_tokens:
                continue
            if not s.announced:
                new_requests.append(NewRequest(seq_id, tuple(s.prompt), s.sampling))
                s.announced = True
            feed = _next_tokens(s, chunk_size)
            needed = -(-(s.fed + len(feed)) // block_size) - len(s.table)
            new_blocks = [free.pop() for _ in range(needed)]
            prefill_done = s.fed + len(feed) >= len(s.prompt)
            steps.append(
                SeqStep(
                    seq_id, s.fed, tuple(feed), len(s.table), tuple(new_blocks), prefill_done, len(s.output)
                )
            )
            s.table.extend(new_blocks)
            s.fed += len(feed)
        plan = StepPlan(step_id, tuple(steps), tuple(new_requests), tuple(finished))
        finished = []
        tokens = _run_step(runners, plan, tp)
        sampled = [st.seq_id for st in steps if st.sample]
        logits = runners[-1].last_logits
        assert logits is not None
        for row, (seq_id, token) in enumerate(zip(sampled, tokens, strict=True)):
            s = seqs[seq_id]
            if not s.output:
                first_logits[seq_id] = logits[row].tolist()
            s.output.append(token)
            if len(s.output) >= max_new_tokens:
                finished.append(seq_id)
                free.extend(s.table)  # reused by later arrivals: stale K/V must not leak
        step_id += 1
    return DriveResult([s.output for s in seqs], first_logits, step_id)


def _next_tokens(s: _Seq, chunk_size: int | None) -> list[int]:
    if s.fed < len(s.prompt):
        end = len(s.prompt) if chunk_size is None else min(len(s.prompt), s.fed + chunk_size)
        return s.prompt[s.fed : end]
    return [s.output[-1]]


def _run_step(runners: Sequence[StageRunner], plan: StepPlan, tp: TPGroup) -> list[int]:
    hidden = None
    for runner in runners:
        out = runner.execute(plan, hidden)
        hidden = out if isinstance(out, torch.Tensor) else None
    count = sum(1 for s in plan.seqs if s.sample)
    if count == 0:
        return []
    ids = torch.zeros(count, dtype=torch.int64)
    if isinstance(out, StepResult):
        assert out.seq_ids == tuple(s.seq_id for s in plan.seqs if s.sample)
        ids = torch.tensor(out.token_ids, dtype=torch.int64)
    return tp.broadcast(ids).tolist()

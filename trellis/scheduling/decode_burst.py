"""Decode bursts: several greedy decode steps run on the device before the host looks again (pure).

``plan_burst`` decides a micro-batch's burst length and allocates the blocks every step of it
needs, rewriting the batch's steps to carry them (every stage then holds the same tables).
"""

from __future__ import annotations

import dataclasses

from trellis.core.plan import SeqStep
from trellis.scheduling.block_manager import BlockManager
from trellis.scheduling.scheduler_config import SchedulerConfig
from trellis.scheduling.sequence import Sequence


def plan_burst(
    cfg: SchedulerConfig, anyone_waiting: bool, seqs: list[Sequence], steps: list[SeqStep], bm: BlockManager
) -> int:
    """How many decode steps this batch may run on the device in a row (1: an ordinary step).

    Only with one stage, nobody waiting to be admitted, and every sequence a greedy decode that
    asks for no logprobs (a burst reports only ids); never past a sequence's max_tokens or the
    context; blocks for every step allocated now.
    """
    if cfg.decode_burst == 1 or cfg.max_in_flight != 1 or anyone_waiting:
        return 1
    if any(len(st.token_ids) != 1 or not st.sample for st in steps):
        return 1
    if any(not s.sampling.greedy or s.sampling.stop_token_ids for s in seqs):
        return 1
    if any(s.sampling.logprobs is not None for s in seqs):
        return 1
    burst = min(
        [cfg.decode_burst]
        + [s.sampling.max_tokens - len(s.output_ids) for s in seqs]
        + [cfg.max_model_len - s.num_tokens for s in seqs]
    )
    # Each sequence already has a slot for its first step; room for all `burst` of them:
    if burst <= 1 or sum(bm.num_new_blocks(s, burst) for s in seqs) > bm.num_free_blocks:
        return 1
    for i, (st, seq) in enumerate(zip(steps, seqs, strict=True)):
        bm.allocate_slots(seq, burst)
        steps[i] = dataclasses.replace(st, new_blocks=tuple(seq.block_table[st.block_table_start :]))
        seq.num_synced_blocks = len(seq.block_table)
    return burst

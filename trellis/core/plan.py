"""What moves between stages each step: the step plan down the pipe, sampled ids (with their
logprobs, for the requests that ask) back to the head.

Pure data, no torch, no protobuf (``trellis.wire.plan_codec`` puts these on the wire). A request's
data (prompt, sampling) travels once, in the plan of its first step; after that each step
carries only diffs: the tokens to feed, and the blocks appended to (or replacing part of) the
sequence's block table. Every stage applies the same diffs, so every stage holds the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trellis.core.sampling import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """Sent once, in the plan of the request's first step."""

    seq_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a step."""

    seq_id: int
    start_pos: int  # tokens of this sequence already in the KV cache
    token_ids: tuple[int, ...]  # tokens fed this step, at positions start_pos, start_pos + 1, ...
    block_table_start: int  # the stage sets table[block_table_start:] = new_blocks
    new_blocks: tuple[int, ...]
    sample: bool  # True when the last fed token's logits give the next token (not a prefill chunk)
    output_index: int = 0  # tokens generated so far; with the seed it fixes the sampler's noise


@dataclass(frozen=True)
class KVCopy:
    """Block i of ``block_ids`` (this replica's KV cache) <-> slot i of ``slots`` (the KV store's
    slab). Every (stage, TP rank) copies only its own layers x KV heads of each block.

    ``slab`` set: the slots are in that file instead, a decode replica's hand-off slab
    (trellis/core/handoff_api.py), and every rank sums what it copies: the step's result carries
    one checksum per slot (``StepResult.kv_sums``)."""

    block_ids: tuple[int, ...]
    slots: tuple[int, ...]
    slab: str = ""


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    seqs: tuple[SeqStep, ...]
    new_requests: tuple[NewRequest, ...] = ()
    finished: tuple[int, ...] = ()  # sequences whose state every stage drops before this step
    return_logits: bool = False  # the last stage sends the sampled rows' full logits back (tests)
    # A decode burst: every sequence is a greedy decode, and the stage runs this many steps in a
    # row, feeding each sampled token back on the device; blocks for all of them are in the plan.
    decode_steps: int = 1
    # The KV store's slab (a shared-memory file) and the copies every stage makes at the start of
    # the step, before its layers: loads fill fresh blocks from the store (the scheduler counts
    # them as computed), saves copy named, computed blocks out to put slots (committed on return).
    kv_slab: str = ""
    kv_loads: tuple[KVCopy, ...] = ()
    kv_saves: tuple[KVCopy, ...] = ()
    # P/D: copies of blocks out to decode replicas' hand-off slabs, made by every stage right after
    # its layers ran this step (so a block this step completes goes out in the same step).
    kv_sends: tuple[KVCopy, ...] = ()

    @property
    def summed_copies(self) -> tuple[KVCopy, ...]:
        """The copies that report checksums, in the order of StepResult.kv_sums: the hand-off loads,
        then the sends."""
        return tuple(c for c in self.kv_loads if c.slab) + self.kv_sends

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model's distribution, log_softmax of the raw
    logits (before temperature, top-k, top-p), and the `k` most likely tokens with theirs, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first


@dataclass(frozen=True)
class StepResult:
    """The last stage's answer for one step: per sequence with sample=True, one sampled token (or
    `steps` of them after a decode burst)."""

    step_id: int
    seq_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # `steps` tokens per sequence, sequence-major
    steps: int = 1
    logits: Any = None  # float32 [len(seq_ids), vocab] when the plan asked for them (a torch tensor)
    # Empty when no sequence asked for logprobs; else aligned with token_ids, None where not asked.
    logprobs: tuple[TokenLogprob | None, ...] = ()
    # Some (stage, rank) could not make the plan's KV copies (e.g. the store's slab is gone): the
    # head voids the step for every sequence it loaded, and aborts the step's puts.
    kv_failed: bool = False
    # One checksum per slot of plan.summed_copies, summed over every (stage, rank) (see KVCopy).
    kv_sums: tuple[int, ...] = ()


def add_kv_sums(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """Two stages' (or ranks') checksums of one plan's hand-off slots, slot by slot."""
    if not a or not b:
        return a or b
    if len(a) != len(b):
        raise ValueError(f"hand-off checksums of {len(a)} and {len(b)} slots for one plan")
    return tuple(x + y for x, y in zip(a, b, strict=True))

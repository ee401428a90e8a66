"""One request's state on the head stage: its tokens, its KV blocks, and where it is in its life.

Pure Python (no torch): the scheduler and the block manager share it. A preempted sequence goes
back to WAITING with its output ids kept and nothing computed; it re-prefills prompt + outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum

from trellis.core.handoff_api import HandoffTarget
from trellis.core.sampling import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"  # not started, or preempted (then it keeps its output ids)
    RUNNING = "running"  # holds KV blocks; prefilling in chunks or decoding
    RESERVED = "reserved"  # a decode replica's hand-off reservation: holds blocks, not yet runnable
    FINISHED = "finished"


class FinishReason(StrEnum):
    STOP = "stop"  # a stop token or an EOS token was sampled (it is the last output id)
    LENGTH = "length"  # max_tokens reached, or the sequence reached max_model_len
    ABORT = "abort"  # the client went away or cancelled
    TOO_LONG = "too_long"  # the next token needs more KV blocks than the whole cache holds
    HANDOFF = "handoff"  # a prefill replica's half is done: the KV is in the decode replica's slots


@dataclass(frozen=True)
class SeqUpdate:
    """What one completed step did to one sequence, for the router's token stream."""

    seq_id: int
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None = None
    block_sums: tuple[int, ...] = ()  # with HANDOFF: the checksum of each target slot, in order


@dataclass(frozen=True)
class StoreHit:
    """A read lease the KV store granted on blocks [first_block, first_block + len(slots)) of a
    sequence's prompt: block first_block + i is in store slot slots[i] until expires_at (unix s)."""

    lease_id: str
    first_block: int
    slots: tuple[int, ...]
    expires_at: float
    slab: str  # the store instance's slab file the slots are in

    @property
    def end_block(self) -> int:
        return self.first_block + len(self.slots)


@dataclass(eq=False)
class HandoffOut:
    """A prefill replica's side of one request's hand-off: copy blocks [target.first_block, ...) of
    its prompt into the target's slots, then finish (the first token was streamed, the rest is D's)."""

    transfer_id: str
    target: HandoffTarget | None = None  # None until attached
    decode_here: bool = False  # no decode replica took it (or a copy failed): run it whole here
    sent: int = 0  # target blocks put in plans so far
    confirmed: int = 0  # of those, blocks whose step came back with their checksums
    sums: dict[int, int] = field(default_factory=dict)  # target slot -> checksum
    parked: bool = False  # the first token is out: waiting for the copies, never decoded here

    @property
    def done(self) -> bool:
        return self.target is not None and self.parked and self.confirmed == self.target.num_blocks


@dataclass(eq=False)
class HandoffIn:
    """A decode replica's side: blocks [first_block, ...) of the prompt reserved, staged in ``slots``
    of its hand-off slab; at commit, loaded before the sequence's first step and checked."""

    transfer_id: str
    first_block: int
    slots: tuple[int, ...]
    deadline: float  # unix s: a reservation not committed by then is dropped
    expected: tuple[int, ...] = ()  # P's checksums, from the commit
    committed: bool = False
    loading: bool = False  # in a plan whose result has not come back


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival: int  # admission order: lower arrived first
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (steps completed, or prefix hits)
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of the full blocks of the known tokens, grown on demand. Tokens never change
    # once known, so these survive preemption.
    block_hashes: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_synced_blocks: int = 0  # leading table entries every stage holds as they are now
    announced: bool = False  # its NewRequest went out in a plan, so stages hold state for it
    in_flight: bool = False  # part of a plan whose result has not come back
    abort_requested: bool = False  # aborted while in flight: finish when its step returns
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    store_hit: StoreHit | None = None  # a store lease to load from at admission (then dropped)
    handoff_out: HandoffOut | None = None  # P/D, on the prefill replica
    handoff_in: HandoffIn | None = None  # P/D, on the decode replica

    @property
    def parked(self) -> bool:
        return self.handoff_out is not None and self.handoff_out.parked

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + outputs, without building the whole list."""
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        head = self.prompt_ids[start:] if start < n_prompt else ()
        return head + tuple(self.output_ids[max(start - n_prompt, 0) : end - n_prompt])

"""The scheduler's P/D entry points (a mixin of Scheduler; pure): reserve, commit, attach, drop.

Decode replica D: ``reserve`` makes a RESERVED sequence that holds blocks for the whole prompt (its
own prefix match shared, the rest fresh) and staging slots for the part it lacks; it is in no queue
and never scheduled. ``commit`` makes it a RUNNING sequence whose prompt counts as computed and whose
first output (the token P sampled) is to be fed: its first step loads the staged blocks (see
trellis/scheduling/handoff.py). A reservation that is not committed is dropped by ``drop_reserved``
(its deadline, or an abort): blocks freed unnamed, slots quarantined.

Prefill replica P: ``attach`` gives a request its target (or tells it to decode here).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence as SequenceOf

from trellis.core.handoff_api import QUARANTINE_S, HandoffError, HandoffTarget
from trellis.core.sampling import SamplingParams
from trellis.scheduling.block_manager import blocks_for
from trellis.scheduling.scheduler_config import InvalidRequestError
from trellis.scheduling.sequence import FinishReason, HandoffIn, SeqStatus, Sequence, SeqUpdate


class NoRoomError(RuntimeError):
    """D cannot take a hand-off now (blocks or staging slots): the router goes elsewhere."""


class PDRequests:
    # What the mixin reads of Scheduler (see trellis/scheduling/scheduler.py).
    _seqs: dict[int, Sequence]
    _running: list[Sequence]
    _next_arrival: int

    def reserve(
        self,
        seq_id: int,
        prompt: SequenceOf[int],
        transfer_id: str,
        deadline: float,
        block_hashes: SequenceOf[int],
    ) -> tuple[int, tuple[int, ...]]:
        """D: hold blocks for ``prompt``; returns (prompt blocks matched here, staging slots for
        the rest). Raises NoRoomError, or InvalidRequestError for a prompt that can never fit."""
        prompt = tuple(prompt)
        self.check(prompt, SamplingParams(max_tokens=1))
        if seq_id in self._seqs:
            raise InvalidRequestError(f"seq {seq_id} is already scheduled")
        bm = self.block_manager
        seq = Sequence(seq_id, prompt, SamplingParams(), arrival=-1, block_hashes=list(block_hashes))
        prefix = bm.match_prefix(seq)
        if bm.blocks_to_admit(prefix, len(prompt)) > bm.num_free_blocks:
            raise NoRoomError(f"no room for {len(prompt)} tokens ({bm.num_free_blocks} blocks free)")
        slots = self.handoffs.reserve_slots(blocks_for(len(prompt), self.config.block_size) - len(prefix))
        if slots is None:
            raise NoRoomError("no staging slots free (engine.handoff_slots)")
        bm.admit(seq, prefix, len(prompt))
        seq.status = SeqStatus.RESERVED
        seq.handoff_in = HandoffIn(transfer_id, len(prefix), slots, deadline)
        self._seqs[seq_id] = seq
        return len(prefix), slots

    def commit(
        self,
        seq_id: int,
        prompt: SequenceOf[int],
        sampling: SamplingParams,
        first_token: int,
        sums: SequenceOf[int],
    ) -> None:
        """D: the decode half arrived: run the reserved sequence, its first token fed next."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.status is not SeqStatus.RESERVED or seq.handoff_in is None:
            raise HandoffError("the reservation is gone (expired or aborted)")
        if tuple(prompt) != seq.prompt_ids:
            raise HandoffError("the decode half's prompt is not the reserved one")
        if len(sums) != len(seq.handoff_in.slots):
            raise HandoffError(f"{len(sums)} checksums for {len(seq.handoff_in.slots)} staged blocks")
        self.check(seq.prompt_ids, sampling)
        seq.sampling = sampling
        seq.output_ids.append(first_token)
        seq.num_computed_tokens = len(seq.prompt_ids)
        seq.handoff_in.expected, seq.handoff_in.committed = tuple(sums), True
        seq.arrival, self._next_arrival = self._next_arrival, self._next_arrival + 1
        seq.status = SeqStatus.RUNNING
        bisect.insort(self._running, seq, key=lambda s: s.arrival)

    def drop_reserved(self, seq_id: int, *, aborted_at: float | None = None) -> bool:
        """D: give up a reservation not committed; False if there is none. Its slots are quarantined
        QUARANTINE_S past the deadline (P may copy until then), or past ``aborted_at`` when the
        router aborted it (it has stopped P first: a copy still in flight lands within a step)."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.status is not SeqStatus.RESERVED:
            return False
        assert seq.handoff_in is not None
        end = seq.handoff_in.deadline if aborted_at is None else min(aborted_at, seq.handoff_in.deadline)
        self.handoffs.drop_in(seq, end + QUARANTINE_S)
        self.block_manager.free(seq)
        seq.status = SeqStatus.FINISHED
        del self._seqs[seq_id]
        return True

    def _finish_handoffs(self, updates: list[SeqUpdate], seq_ids: set[int]) -> list[SeqUpdate]:
        """P: the sequences whose every copy came back finish (HANDOFF, with the checksums), in the
        update of their first token when it came in this step."""
        for seq_id in seq_ids:
            seq = self._seqs.get(seq_id)
            h = None if seq is None else seq.handoff_out
            if h is None or not h.done:
                continue
            assert h.target is not None
            sums = tuple(h.sums[slot] for slot in h.target.slots)
            self._finish(seq, FinishReason.HANDOFF)
            i = next((i for i, u in enumerate(updates) if u.seq_id == seq_id), None)
            tokens = updates.pop(i).new_token_ids if i is not None else ()
            updates.append(SeqUpdate(seq_id, tokens, True, FinishReason.HANDOFF, sums))
        return updates

    def awaits_target(self, seq_id: int) -> bool:
        """P: the request is handed off and has no target (nor was it told to decode here) yet."""
        seq = self._seqs.get(seq_id)
        h = None if seq is None else seq.handoff_out
        return h is not None and h.target is None and not h.decode_here

    def attach(self, seq_id: int, target: HandoffTarget | None) -> bool:
        """P: where the request's blocks go (None: decode it here); False if it is gone."""
        seq = self._seqs.get(seq_id)
        h = None if seq is None else seq.handoff_out
        if h is None:
            return False
        if target is None:
            self.handoffs.decode_here(seq)
            return True
        nb = blocks_for(len(seq.prompt_ids), self.config.block_size)
        # A target has a slot at least (D's prefix match always leaves the prompt's last block to
        # send); one with none would never be waited for by a step, so it is refused too.
        if (
            target.block_size != self.config.block_size
            or target.first_block + target.num_blocks != nb
            or not target.num_blocks
        ):
            self.handoffs.decode_here(seq)
            raise HandoffError(
                f"the target holds blocks [{target.first_block}, {target.first_block + target.num_blocks}) "
                f"of {target.block_size} tokens; this prompt has {nb} of {self.config.block_size}"
            )
        h.target = target
        return True

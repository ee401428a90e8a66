"""The scheduler's side of P/D hand-offs (pure): what each plan copies, and what its result proves.

Prefill replica P (a sequence with ``handoff_out``): once a target is attached, every plan copies
the target blocks that are complete by the end of that plan's layers: a block is complete when
the plan (or an earlier one that came back) fed its last token, and the prompt's partial last
block when the plan fed the prompt's last token. The copy runs on every stage right after its
layers (``StepPlan.kv_sends``), and each stage runs plans in order, so a block is never read
before its KV is written, nor after a later plan reuses it. A sequence in flight in another plan
copies nothing (its blocks are not known complete). Only a returned step confirms its copies, with
one checksum per slot; a step whose copies failed turns the request back into an aggregated one
(``decode_here``: P decodes it), which the router sees as more tokens on P's stream.

Decode replica D (a sequence with ``handoff_in``): the reserved blocks are filled from the staging
slots by the plan of the sequence's first step, before its layers (a hand-off load), and trusted
only when the step comes back with every slot's checksum equal to P's; otherwise the step is
voided and the sequence recomputes its prompt here, its blocks never named from the bad bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf

from trellis.core.plan import KVCopy, SeqStep, StepResult
from trellis.scheduling.block_manager import blocks_for
from trellis.scheduling.sequence import HandoffIn, Sequence
from trellis.scheduling.staging_slots import StagingSlots

DEADLINE_MARGIN_S = 1.0  # no copy is planned this close to a target's deadline (a step may run long)


class HandoffBook:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.staging: StagingSlots | None = None  # a decode replica's hand-off slots (set by its head)
        self.slab = ""  # the hand-off slab those slots are in
        self._sending: dict[int, list[tuple[int, tuple[int, ...]]]] = {}  # step -> (seq, slots)
        self._loading: dict[int, list[tuple[int, int]]] = {}  # step -> (seq, slots loaded)
        self.fallbacks = 0  # P: requests turned aggregated (no target, a failed copy, a deadline)
        self.blocks_sent = 0  # P: copies confirmed by a returned step
        self.voided = 0  # D: loads voided (then recomputed)
        self.blocks_loaded = 0  # D: loads confirmed

    # ---- P: the copies of one plan ----------------------------------------------------------------
    def sends(
        self, running: Iterable[Sequence], steps: SequenceOf[SeqStep], now: float
    ) -> list[tuple[int, KVCopy]]:
        """The copies this plan makes: (seq id, copy) per sequence with target blocks now complete.
        A target past its deadline (D has given its slots up) turns the request aggregated."""
        in_plan = {s.seq_id: s for s in steps}
        out = []
        for seq in running:
            h = seq.handoff_out
            if h is None or h.target is None or h.decode_here:
                continue
            step = in_plan.get(seq.seq_id)
            if step is None and seq.in_flight:
                continue
            fed = step.start_pos + len(step.token_ids) if step is not None else seq.num_computed_tokens
            n = len(seq.prompt_ids)
            upto = blocks_for(n, self.block_size) if fed >= n else fed // self.block_size
            t = h.target
            if t.deadline and now >= t.deadline - DEADLINE_MARGIN_S:
                self.decode_here(seq)
                continue
            first = t.first_block + h.sent
            end = min(upto, t.first_block + t.num_blocks)
            if end <= first:
                continue
            blocks = tuple(seq.block_table[first:end])
            slots = t.slots[first - t.first_block : end - t.first_block]
            h.sent += end - first
            out.append((seq.seq_id, KVCopy(blocks, slots, t.slab)))
        return out

    def load(self, seq: Sequence) -> KVCopy | None:
        """D: the hand-off load of a committed sequence's first step (None when there is none)."""
        h = seq.handoff_in
        if h is None or not h.committed or h.loading or not h.slots:
            return None
        h.loading = True
        first = h.first_block
        return KVCopy(tuple(seq.block_table[first : first + len(h.slots)]), h.slots, self.slab)

    def record(self, step_id: int, loads: list[tuple[int, int]], sends: list[tuple[int, KVCopy]]) -> None:
        if loads:
            self._loading[step_id] = loads
        if sends:
            self._sending[step_id] = [(sid, c.slots) for sid, c in sends]

    # ---- a returned step -------------------------------------------------------------------------
    def returned(
        self, result: StepResult, seqs: dict[int, Sequence], untrusted: set[int]
    ) -> tuple[set[int], set[int]]:
        """Apply a step's hand-off checksums; returns (the D sequences whose loads are voided, the P
        sequences that copied in it).
        ``untrusted``: sequences whose step is void anyway (a store load failed): their copies
        are not confirmed, and are made again after the recompute."""
        loads = self._loading.pop(result.step_id, [])
        sends = self._sending.pop(result.step_id, [])
        sums = result.kv_sums
        good = not result.kv_failed and len(sums) == sum(n for _, n in loads) + sum(len(s) for _, s in sends)
        void: set[int] = set()
        at = 0
        for seq_id, n in loads:
            seq = seqs.get(seq_id)
            if seq is not None and seq.handoff_in is not None:
                h = seq.handoff_in
                if not good or tuple(sums[at : at + n]) != h.expected:
                    void.add(seq_id)
                    self.voided += 1
                else:
                    self.blocks_loaded += n
                self.drop_in(seq)
            at += n
        for seq_id, slots in sends:
            seq = seqs.get(seq_id)
            h = None if seq is None else seq.handoff_out
            if h is not None and not h.decode_here and seq_id not in untrusted:
                if good:
                    h.sums.update(zip(slots, sums[at : at + len(slots)], strict=True))
                    h.confirmed += len(slots)
                    self.blocks_sent += len(slots)
                else:  # the target is gone or unwritable: this replica decodes the request itself
                    self.decode_here(seq)
            at += len(slots)
        return void, {seq_id for seq_id, _ in sends}

    # ---- D: reservations -------------------------------------------------------------------------
    def reserve_slots(self, n: int) -> tuple[int, ...] | None:
        return None if self.staging is None else self.staging.take(n)

    def drop_in(self, seq: Sequence, quarantine_until: float = 0.0) -> None:
        """Give back a D sequence's staging slots (after its load came back, or it was given up)."""
        h: HandoffIn | None = seq.handoff_in
        if h is None:
            return
        seq.handoff_in = None
        if self.staging is not None and h.slots:
            self.staging.release(h.slots, 0.0 if h.committed else quarantine_until)

    def decode_here(self, seq: Sequence) -> None:
        """P: the request is no longer handed off; this replica decodes it (its stream goes on)."""
        h = seq.handoff_out
        if h is not None and not h.decode_here:
            h.decode_here, h.parked = True, False
            self.fallbacks += 1

    @staticmethod
    def rewind(seq: Sequence) -> None:
        """P: a sequence reset (preempted, or a voided store load): unconfirmed copies are redone."""
        h = seq.handoff_out
        if h is not None:
            h.sent = h.confirmed

"""The head stage's continuous-batching scheduler (pure Python, no torch, no grpc).

Each ``schedule()`` builds one micro-batch (a ``StepPlan``) from the sequences that are not in
flight: decodes first (one token each, for latency), then prefill chunks of running sequences,
then new or preempted sequences in arrival order, under a token budget and a sequence cap. Up to
``max_in_flight`` plans may be outstanding at once (one per pipeline stage keeps every stage
busy); successive plans hold disjoint sequences. ``complete()`` takes a plan's sampled ids back,
appends them, finishes sequences and frees their blocks.

When a running sequence needs a block and none is free, the newest running sequence that is not
in flight is preempted by recompute (blocks freed, outputs kept, back to waiting). A sequence
never loses its blocks to a newer one, so the oldest always makes progress: no livelock. If the
only candidate is the needy sequence itself while a newer one is in flight, it waits for that one
to come back (it becomes the victim) instead of throwing away its own work.

KV from the store: a sequence may arrive with a ``StoreHit`` (a read lease on store slots holding
blocks of its prompt). At admission, the blocks past its local prefix match that the lease covers
become fresh blocks of its table, filled by the plan's ``kv_loads`` before any layer runs, and
count as computed. They are trusted only once the step returns: if a stage reports the copy
failed, or the lease expired before the step completed (the store may have reused the slots), the
sequence is reset as if preempted (nothing emitted, no block named) and recomputes without the
store. Every lease is handed back through ``take_released_leases`` exactly once.

P/D (trellis/scheduling/handoff.py, pd_requests.py): a prefill half's plans copy its blocks out as
they complete; once its first token is out it is parked (never decoded here, never a preemption
victim) until its copies came back. A decode half is RESERVED (blocks held, in no queue) until its
commit; its first step loads the staged blocks, trusted as a store load is, and by their checksums.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from trellis.core import log
from trellis.core.handoff_api import QUARANTINE_S
from trellis.core.plan import KVCopy, NewRequest, SeqStep, StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.scheduling.block_manager import BlockManager
from trellis.scheduling.checks import check_fits, finish_reason, sampled_tokens
from trellis.scheduling.decode_burst import plan_burst
from trellis.scheduling.handoff import HandoffBook
from trellis.scheduling.pd_requests import PDRequests
from trellis.scheduling.scheduler_config import (  # noqa: F401 - re-exported
    InvalidRequestError,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
)
from trellis.scheduling.sequence import (
    FinishReason,
    HandoffOut,
    SeqStatus,
    Sequence,
    SeqUpdate,
    StoreHit,
)
from trellis.scheduling.store_loads import StoreLoads, loadable_blocks

logger = log.get(component="scheduler")


@dataclass
class _Batch:
    """The micro-batch being built by one ``schedule()`` call."""

    budget: int
    max_seqs: int
    steps: list[SeqStep] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    loads: list[KVCopy] = field(default_factory=list)
    slab: str = ""  # the store slab of this batch's loads (one per plan)
    load_hits: list[tuple[int, StoreHit]] = field(default_factory=list)  # (seq id, its lease)
    handoff_loads: list[tuple[int, int]] = field(default_factory=list)  # (seq id, slots), P/D

    @property
    def full(self) -> bool:
        return self.budget <= 0 or len(self.steps) >= self.max_seqs


class Scheduler(PDRequests, StoreLoads):
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.time) -> None:
        """``clock``: unix seconds, the clock store leases expire by."""
        self.config = config
        self._clock = clock
        self._loads: dict[int, list[tuple[int, StoreHit]]] = {}  # step id -> the leases it loaded from
        self._released: list[str] = []  # lease ids done with, for the KV agent to release
        self._loaded_blocks = 0
        self._voided_loads = 0
        self.handoffs = HandoffBook(config.block_size)
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching, config.cache_key
        )
        self._seqs: dict[int, Sequence] = {}  # every live sequence, waiting, running or in flight
        self._waiting: list[Sequence] = []  # by arrival; preempted ones are older than new ones
        self._running: list[Sequence] = []  # by arrival; they hold blocks
        self._outstanding: dict[int, tuple[SeqStep, ...]] = {}  # step id -> its steps, until complete()
        self._pending_finished: list[int] = []  # announced seqs gone since the last plan
        self._next_step_id = 0
        self._bursts: dict[int, int] = {}  # step id -> decode steps, until complete()
        self._next_arrival = 0
        self._num_preemptions = 0
        self._watermark = int(config.num_blocks * config.admission_watermark)
        if config.num_blocks * config.block_size < config.max_model_len:
            logger.warning(
                "kv_cache_smaller_than_max_model_len",
                capacity_tokens=config.num_blocks * config.block_size,
                max_model_len=config.max_model_len,
            )

    # -- requests ------------------------------------------------------------------------------

    def add(
        self,
        seq_id: int,
        prompt_ids: SequenceOf[int],
        sampling: SamplingParams,
        store_hit: StoreHit | None = None,
        block_hashes: SequenceOf[int] = (),
        handoff: HandoffOut | None = None,
        outputs: SequenceOf[int] = (),
    ) -> None:
        """Queue a request; raises InvalidRequestError (a ValueError) if it can never be served.

        ``block_hashes``: the names of the prompt's leading full blocks when the caller hashed
        them already (under this scheduler's cache_key), so they are not computed twice.
        ``handoff``: P/D, the prefill half (trellis/scheduling/handoff.py). ``outputs``: tokens
        generated elsewhere (a decode half whose KV did not arrive): recomputed like a preemption."""
        prompt = tuple(prompt_ids)
        if seq_id in self._seqs:
            raise InvalidRequestError(f"seq {seq_id} is already scheduled")
        self.check(prompt, sampling)
        seq = Sequence(
            seq_id=seq_id,
            prompt_ids=prompt,
            sampling=sampling,
            arrival=self._next_arrival,
            store_hit=store_hit,
            block_hashes=list(block_hashes),
            output_ids=list(outputs),
            handoff_out=handoff,
        )
        self._next_arrival += 1
        self._seqs[seq_id] = seq
        self._waiting.append(seq)  # newest arrival: the end keeps the list sorted

    def check(self, prompt: tuple[int, ...], sampling: SamplingParams) -> None:
        """Raise InvalidRequestError if this request could never be served (add() checks it too)."""
        check_fits(prompt, sampling, self.config)

    def abort(self, seq_id: int) -> None:
        """Drop a request: now if it is not in flight, else when its step comes back."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return  # already finished, or never added: aborting is idempotent
        if seq.in_flight:
            seq.abort_requested = True
        else:
            self._finish(seq, FinishReason.ABORT)

    # -- the step ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next micro-batch, or None when nothing can run now (all busy, or no work).

        Whenever nothing is in flight and there is work, this returns a plan.
        """
        if len(self._outstanding) >= self.config.max_in_flight:
            return None
        batch = _Batch(budget=self.config.max_num_batched_tokens, max_seqs=self.config.max_num_seqs)
        ready = [s for s in self._running if not (s.in_flight or s.parked)]
        decodes = [s for s in ready if s.num_uncomputed_tokens == 1]
        chunks = [s for s in ready if s.num_uncomputed_tokens > 1]
        preempted = False
        for seq in decodes + chunks:
            if batch.full:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted for an older sequence earlier in this loop
            num_new, preempted_some = self._make_room(seq, min(seq.num_uncomputed_tokens, batch.budget))
            preempted |= preempted_some
            if num_new:
                self._add_to_batch(batch, seq, num_new)
        # After a preemption, admitting would only take back the blocks just freed; but admit
        # anyway if the batch is empty, so an idle pipeline always gets a plan.
        if not (preempted and batch.steps):
            for seq in list(self._waiting):
                if batch.full or not self._admit(batch, seq):
                    break  # first come, first served: nobody overtakes a waiting sequence
        sends = self.handoffs.sends(self._running, batch.steps, self._clock())
        if not (batch.steps or sends):
            return None
        burst = 1
        if self.config.decode_burst > 1:
            seqs = [self._seqs[st.seq_id] for st in batch.steps]
            burst = plan_burst(self.config, bool(self._waiting), seqs, batch.steps, self.block_manager)
        step_id = self._next_step_id
        self._next_step_id += 1
        plan = StepPlan(
            step_id=step_id,
            seqs=tuple(batch.steps),
            new_requests=tuple(batch.new_requests),
            finished=tuple(self._pending_finished),
            decode_steps=burst,
            kv_loads=tuple(batch.loads),
            kv_slab=batch.slab,
            kv_sends=tuple(c for _, c in sends),
        )
        self._pending_finished.clear()
        self._outstanding[step_id] = plan.seqs
        self._bursts[step_id] = burst
        if batch.load_hits:
            self._loads[step_id] = batch.load_hits
        self.handoffs.record(step_id, batch.handoff_loads, sends)
        return plan

    def copy_only_plan(self) -> StepPlan | None:
        """A plan that feeds no sequence (for KV copies the head attaches while nothing else runs),
        or None when max_in_flight plans are out."""
        if len(self._outstanding) >= self.config.max_in_flight:
            return None
        step_id = self._next_step_id
        self._next_step_id += 1
        plan = StepPlan(step_id=step_id, seqs=(), finished=tuple(self._pending_finished))
        self._pending_finished.clear()
        self._outstanding[step_id] = ()
        self._bursts[step_id] = 1
        return plan

    def complete(self, result: StepResult) -> list[SeqUpdate]:
        """Apply a step's sampled ids; returns one update per sampled live sequence, in plan order."""
        steps = self._outstanding.get(result.step_id)
        if steps is None:
            raise SchedulerError(f"result for step {result.step_id}, which is not outstanding")
        burst = self._bursts.get(result.step_id, 1)
        sampled = sampled_tokens(result, steps, burst)
        del self._outstanding[result.step_id]
        del self._bursts[result.step_id]
        void = self._void_loads(result)
        void_in, sent = self.handoffs.returned(result, self._seqs, void)
        void |= void_in
        updates: list[SeqUpdate] = []
        for step in steps:
            seq = self._seqs[step.seq_id]
            seq.in_flight = False
            if seq.seq_id in void:
                self._reset_void(seq)
                continue
            seq.num_computed_tokens += len(step.token_ids) + burst - 1  # a burst fed its own tokens
            if burst == 1:
                self.block_manager.register_computed(seq)  # the step completed on every stage
            if seq.abort_requested:
                self._finish(seq, FinishReason.ABORT)
                continue
            if not step.sample:
                continue
            new: list[int] = []
            reason = None
            for token in sampled[seq.seq_id]:  # a burst's tokens past a finish are dropped
                seq.output_ids.append(token)
                new.append(token)
                reason = finish_reason(seq, token, self.config)
                if reason is not None:
                    break
            if reason is not None:
                self._finish(seq, reason)
            elif burst > 1:  # only now are the burst's tokens known, and with them its blocks' names
                self.block_manager.register_computed(seq)
            elif seq.handoff_out is not None and not seq.handoff_out.decode_here:
                seq.handoff_out.parked = True  # P/D: the first token is out, the rest is D's
            updates.append(SeqUpdate(seq.seq_id, tuple(new), reason is not None, reason))
        return self._finish_handoffs(updates, sent | {st.seq_id for st in steps})

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._outstanding)

    def num_in_flight(self) -> int:
        """Plans issued and not yet completed."""
        return len(self._outstanding)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self._seqs[seq_id].block_table)

    def stats(self) -> dict[str, int]:
        return {
            "waiting": len(self._waiting),
            "running": len(self._running),
            "in_flight_plans": len(self._outstanding),
            "in_flight_seqs": sum(len(steps) for steps in self._outstanding.values()),
            "preemptions": self._num_preemptions,
            "steps_issued": self._next_step_id,
            "pending_finished": len(self._pending_finished),
            "store_loaded_blocks": self._loaded_blocks,
            "store_voided_loads": self._voided_loads,
            **self.block_manager.stats(),
        }

    # -- internals -----------------------------------------------------------------------------

    def _make_room(self, seq: Sequence, num_new: int) -> tuple[int, bool]:
        """Allocate slots for up to ``num_new`` of ``seq``'s tokens, preempting only if none fit.

        A prefill chunk shrinks to the free blocks rather than evicting others. Returns (tokens
        granted, 0 when ``seq`` waits or was itself preempted; whether anything was preempted).
        """
        bm = self.block_manager
        size = self.config.block_size
        preempted = False
        while (len(seq.block_table) + bm.num_free_blocks) * size - seq.num_computed_tokens < 1:
            # seq is a candidate; a parked P/D sequence is not (it holds its blocks for its copies)
            victim = next(s for s in reversed(self._running) if not (s.in_flight or s.parked))
            if victim is seq:
                if any(s.in_flight and s.arrival > seq.arrival for s in self._running):
                    return 0, preempted  # a newer one is in flight: take its blocks when it returns
                self._preempt(seq)
                return 0, True
            self._preempt(victim)
            preempted = True
        fit = (len(seq.block_table) + bm.num_free_blocks) * size - seq.num_computed_tokens
        num_new = min(num_new, fit)
        bm.allocate_slots(seq, num_new)
        return num_new, preempted

    def _admit(self, batch: _Batch, seq: Sequence) -> bool:
        """Start (or restart) a waiting sequence with its first chunk, if its blocks are free."""
        bm = self.block_manager
        size = self.config.block_size
        prefix = bm.match_prefix(seq)
        loaded = loadable_blocks(seq.store_hit, len(prefix), batch.slab, seq.num_tokens, size, self._clock())
        cached = (len(prefix) + loaded) * size
        num_new = min(seq.num_tokens - cached, batch.budget)
        reserve = self._watermark if self._running else 0
        if bm.blocks_to_admit(prefix, cached + num_new) + reserve > bm.num_free_blocks:
            return False
        bm.admit(seq, prefix, cached + num_new)
        self._use_store_hit(batch, seq, len(prefix), loaded)
        self._waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        bisect.insort(self._running, seq, key=lambda s: s.arrival)
        self._add_to_batch(batch, seq, num_new)
        return True

    def _add_to_batch(self, batch: _Batch, seq: Sequence, num_new: int) -> None:
        load = self.handoffs.load(seq)  # P/D: a decode half's first step fills its blocks first
        if load is not None:
            batch.loads.append(load)
            batch.handoff_loads.append((seq.seq_id, len(load.slots)))
        start = seq.num_computed_tokens
        if not seq.announced:
            batch.new_requests.append(NewRequest(seq.seq_id, seq.prompt_ids, seq.sampling))
            seq.announced = True
        table_start = seq.num_synced_blocks
        batch.steps.append(
            SeqStep(
                seq_id=seq.seq_id,
                start_pos=start,
                token_ids=seq.token_slice(start, start + num_new),
                block_table_start=table_start,
                new_blocks=tuple(seq.block_table[table_start:]),
                sample=start + num_new == seq.num_tokens,
                output_index=len(seq.output_ids),
            )
        )
        seq.num_synced_blocks = len(seq.block_table)
        seq.in_flight = True
        batch.budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        self.handoffs.drop_in(seq)  # its KV is recomputed instead
        self.handoffs.rewind(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_synced_blocks = 0  # the next plan sends the whole new table from index 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self._running.remove(seq)
        bisect.insort(self._waiting, seq, key=lambda s: s.arrival)
        logger.debug("preempted", seq_id=seq.seq_id, num_tokens=seq.num_tokens)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.store_hit is not None:  # finished (aborted) before it was admitted
            self._released.append(seq.store_hit.lease_id)
            seq.store_hit = None
        if seq.handoff_in is not None:
            self.handoffs.drop_in(seq, seq.handoff_in.deadline + QUARANTINE_S)
        self.block_manager.free(seq)
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.seq_id]
        if seq.announced:
            self._pending_finished.append(seq.seq_id)

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
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from trellis.core import log
from trellis.core.plan import NewRequest, SeqStep, StepPlan, StepResult
from trellis.core.request import RequestLimits, prompt_problem, sampling_problem
from trellis.core.sampling import SamplingParams
from trellis.scheduling.block_manager import BlockManager, blocks_for
from trellis.scheduling.scheduler_config import (  # noqa: F401 - re-exported
    InvalidRequestError,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
)
from trellis.scheduling.sequence import FinishReason, SeqStatus, Sequence, SeqUpdate

logger = log.get(component="scheduler")

_TOKEN_ID_LIMIT = 2**31  # token ids are hashed as int32


@dataclass
class _Batch:
    """The micro-batch being built by one ``schedule()`` call."""

    budget: int
    max_seqs: int
    steps: list[SeqStep] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return self.budget <= 0 or len(self.steps) >= self.max_seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
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
        self._capacity_tokens = config.num_blocks * config.block_size
        if self._capacity_tokens < config.max_model_len:
            logger.warning(
                "kv_cache_smaller_than_max_model_len",
                capacity_tokens=self._capacity_tokens,
                max_model_len=config.max_model_len,
            )

    # -- requests ------------------------------------------------------------------------------

    def add(self, seq_id: int, prompt_ids: SequenceOf[int], sampling: SamplingParams) -> None:
        """Queue a request; raises InvalidRequestError (a ValueError) if it can never be served."""
        cfg = self.config
        prompt = tuple(prompt_ids)
        if seq_id in self._seqs:
            raise InvalidRequestError(f"seq {seq_id} is already scheduled")
        # The one validator's rules (trellis.core.request), with the limits the scheduler knows: a
        # caller that skipped validation still cannot queue what could never be served.
        limits = RequestLimits(vocab_size=_TOKEN_ID_LIMIT, max_model_len=cfg.max_model_len)
        if any(not isinstance(t, int) for t in prompt):
            raise InvalidRequestError(
                f"prompt token id {next(t for t in prompt if not isinstance(t, int))!r} is not an integer"
            )
        if problem := prompt_problem(prompt, limits) or sampling_problem(sampling, _TOKEN_ID_LIMIT):
            raise InvalidRequestError(problem)
        if len(prompt) > self._capacity_tokens:
            need = blocks_for(len(prompt), cfg.block_size)
            raise InvalidRequestError(
                f"prompt of {len(prompt)} tokens needs {need} KV blocks, the cache holds {cfg.num_blocks}"
            )
        seq = Sequence(seq_id=seq_id, prompt_ids=prompt, sampling=sampling, arrival=self._next_arrival)
        self._next_arrival += 1
        self._seqs[seq_id] = seq
        self._waiting.append(seq)  # newest arrival: the end keeps the list sorted

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
        ready = [s for s in self._running if not s.in_flight]
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
        if not batch.steps:
            return None
        burst = self._burst(batch)
        step_id = self._next_step_id
        self._next_step_id += 1
        plan = StepPlan(
            step_id=step_id,
            seqs=tuple(batch.steps),
            new_requests=tuple(batch.new_requests),
            finished=tuple(self._pending_finished),
            decode_steps=burst,
        )
        self._pending_finished.clear()
        self._outstanding[step_id] = plan.seqs
        self._bursts[step_id] = burst
        return plan

    def complete(self, result: StepResult) -> list[SeqUpdate]:
        """Apply a step's sampled ids; returns one update per sampled live sequence, in plan order."""
        steps = self._outstanding.get(result.step_id)
        if steps is None:
            raise SchedulerError(f"result for step {result.step_id}, which is not outstanding")
        burst = self._bursts.get(result.step_id, 1)
        sampled = self._check_result(result, steps, burst)
        del self._outstanding[result.step_id]
        del self._bursts[result.step_id]
        updates: list[SeqUpdate] = []
        for step in steps:
            seq = self._seqs[step.seq_id]
            seq.in_flight = False
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
                reason = self._finish_reason(seq, token)
                if reason is not None:
                    break
            if reason is not None:
                self._finish(seq, reason)
            elif burst > 1:  # only now are the burst's tokens known, and with them its blocks' names
                self.block_manager.register_computed(seq)
            updates.append(SeqUpdate(seq.seq_id, tuple(new), reason is not None, reason))
        return updates

    # -- introspection ---------------------------------------------------------------------------

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
            victim = next(s for s in reversed(self._running) if not s.in_flight)  # seq is a candidate
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
        prefix = bm.match_prefix(seq)
        cached = len(prefix) * self.config.block_size
        num_new = min(seq.num_tokens - cached, batch.budget)
        reserve = self._watermark if self._running else 0
        if bm.blocks_to_admit(prefix, cached + num_new) + reserve > bm.num_free_blocks:
            return False
        bm.admit(seq, prefix, cached + num_new)
        self._waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        bisect.insort(self._running, seq, key=lambda s: s.arrival)
        self._add_to_batch(batch, seq, num_new)
        return True

    def _add_to_batch(self, batch: _Batch, seq: Sequence, num_new: int) -> None:
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

    def _burst(self, batch: _Batch) -> int:
        """How many decode steps this batch may run on the device in a row (1: an ordinary step).

        Only with one stage, nobody waiting to be admitted, and every sequence a greedy decode that
        asks for no logprobs (a burst reports only ids); never past a sequence's max_tokens or the
        context; blocks for every step allocated now.
        """
        cfg = self.config
        if cfg.decode_burst == 1 or cfg.max_in_flight != 1 or self._waiting:
            return 1
        seqs = [self._seqs[st.seq_id] for st in batch.steps]
        if any(len(st.token_ids) != 1 or not st.sample for st in batch.steps):
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
        bm = self.block_manager
        # Each sequence already has a slot for its first step; room for all `burst` of them:
        if burst <= 1 or sum(bm.num_new_blocks(s, burst) for s in seqs) > bm.num_free_blocks:
            return 1
        for i, (st, seq) in enumerate(zip(batch.steps, seqs, strict=True)):
            bm.allocate_slots(seq, burst)
            batch.steps[i] = dataclasses.replace(
                st, new_blocks=tuple(seq.block_table[st.block_table_start :])
            )
            seq.num_synced_blocks = len(seq.block_table)
        return burst

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_synced_blocks = 0  # the next plan sends the whole new table from index 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self._running.remove(seq)
        bisect.insort(self._waiting, seq, key=lambda s: s.arrival)
        logger.debug("preempted", seq_id=seq.seq_id, num_tokens=seq.num_tokens)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sampling = seq.sampling
        if token in sampling.stop_token_ids:
            return FinishReason.STOP
        if not sampling.ignore_eos and token in self.config.eos_token_ids:
            return FinishReason.STOP
        if len(seq.output_ids) >= sampling.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        if seq.num_tokens > self._capacity_tokens:  # feeding the new token needs one block too many
            logger.warning("kv_cache_too_small_for_seq", seq_id=seq.seq_id, num_tokens=seq.num_tokens)
            return FinishReason.TOO_LONG
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
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

    def _check_result(
        self, result: StepResult, steps: tuple[SeqStep, ...], burst: int
    ) -> dict[int, tuple[int, ...]]:
        """The result's seq id -> its tokens, after checking it answers exactly the plan's sampled seqs."""
        if result.steps != burst or len(result.seq_ids) * burst != len(result.token_ids):
            raise SchedulerError(
                f"step {result.step_id}: {len(result.seq_ids)} seq ids and {len(result.token_ids)} tokens "
                f"in {result.steps} steps, but the plan asked for {burst} steps"
            )
        sampled = {
            sid: tuple(result.token_ids[i * burst : (i + 1) * burst]) for i, sid in enumerate(result.seq_ids)
        }
        expected = {s.seq_id for s in steps if s.sample}
        if len(sampled) != len(result.seq_ids) or sampled.keys() != expected:
            raise SchedulerError(
                f"step {result.step_id}: result seqs {sorted(result.seq_ids)} "
                f"do not match the sampled seqs {sorted(expected)}"
            )
        bad = [t for t in result.token_ids if not isinstance(t, int) or not 0 <= t < _TOKEN_ID_LIMIT]
        if bad:
            raise SchedulerError(f"step {result.step_id}: token id {bad[0]!r} is not in [0, 2^31)")
        return sampled

"""When a store lease's blocks may be loaded, and when a load must be voided (pure).

A lease's slots are the reader's until ``expires_at`` (trellis/core/kv_store_api.py). A load is
only started if the lease outlives the step by LEASE_MARGIN_S, and only trusted once the step came
back before ``expires_at`` with no stage reporting a failed copy: otherwise the store may have
reused the slots while a stage read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from trellis.core import log
from trellis.core.plan import KVCopy, StepResult
from trellis.scheduling.scheduler_config import SchedulerConfig
from trellis.scheduling.sequence import FinishReason, Sequence, StoreHit

LEASE_MARGIN_S = 2.0  # a store lease closer than this to expiry is not loaded from (recompute)


def loadable_blocks(
    hit: StoreHit | None, local: int, batch_slab: str, num_tokens: int, block_size: int, now: float
) -> int:
    """Blocks past the local match ``local`` that ``hit`` covers and that are safe to load: the
    lease outlives the step by LEASE_MARGIN_S, its slab is the one of the batch's other loads (a
    plan names one), and one prompt token is always left to compute (its logits give the next token)."""
    if hit is None or not hit.first_block <= local < hit.end_block:
        return 0
    if batch_slab and hit.slab != batch_slab:
        return 0
    if hit.expires_at - now < LEASE_MARGIN_S:
        return 0
    max_blocks = (num_tokens - 1) // block_size
    return max(0, min(hit.end_block, max_blocks) - local)


def voided(hits: Iterable[tuple[int, StoreHit]], kv_failed: bool, now: float) -> set[int]:
    """The sequences whose loads in a returned step cannot be trusted."""
    return {seq_id for seq_id, hit in hits if kv_failed or now >= hit.expires_at}


class LoadBatch(Protocol):
    """The part of a plan being built that store loads go into (scheduler._Batch)."""

    loads: list[KVCopy]
    load_hits: list[tuple[int, StoreHit]]
    slab: str


class StoreLoads:
    """The scheduler's store-load bookkeeping (a mixin of Scheduler, trellis/scheduling/scheduler.py):
    which leases a returned step used, which loads it voids, and the leases to hand back."""

    _loads: dict[int, list[tuple[int, StoreHit]]]
    _released: list[str]
    _clock: Callable[[], float]
    _voided_loads: int
    _num_preemptions: int
    _loaded_blocks: int
    config: SchedulerConfig

    def _use_store_hit(self, batch: LoadBatch, seq: Sequence, local: int, loaded: int) -> None:
        """At admission, past ``local`` cached blocks: load ``loaded`` blocks from the sequence's
        lease in this plan (they count as computed), or hand the lease back unused."""
        hit, seq.store_hit = seq.store_hit, None
        if not loaded:
            if hit is not None:
                self._released.append(hit.lease_id)  # its blocks are cached here already, or it expired
            return
        assert hit is not None
        at = local - hit.first_block
        blocks = tuple(seq.block_table[local : local + loaded])
        batch.loads.append(KVCopy(blocks, hit.slots[at : at + loaded]))
        batch.load_hits.append((seq.seq_id, hit))
        batch.slab = hit.slab
        seq.num_computed_tokens = (local + loaded) * self.config.block_size
        self._loaded_blocks += loaded

    def take_released_leases(self) -> list[str]:
        """Store leases no sequence needs any more (loaded and checked, or never used), once each."""
        out, self._released = self._released, []
        return out

    def _void_loads(self, result: StepResult) -> set[int]:
        """The sequences of this step whose store loads cannot be trusted (see the module doc)."""
        hits = self._loads.pop(result.step_id, [])
        if not hits:
            return set()
        self._released.extend(hit.lease_id for _, hit in hits)
        return voided(hits, result.kv_failed, self._clock())

    def _reset_void(self, seq: Sequence) -> None:
        self._voided_loads += 1
        log.get(component="scheduler").warning("store load voided; recomputing", seq_id=seq.seq_id)
        if seq.abort_requested:
            self._finish(seq, FinishReason.ABORT)
            return
        self._preempt(seq)
        seq.num_preemptions -= 1  # not a preemption: counted as a voided load
        self._num_preemptions -= 1

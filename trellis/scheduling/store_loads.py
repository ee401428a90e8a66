"""When a store lease's blocks may be loaded, and when a load must be voided (pure).

A lease's slots are the reader's until ``expires_at`` (trellis/core/kv_store_api.py). A load is
only started if the lease outlives the step by LEASE_MARGIN_S, and only trusted once the step came
back before ``expires_at`` with no stage reporting a failed copy: otherwise the store may have
reused the slots while a stage read them.
"""

from __future__ import annotations

from collections.abc import Iterable

from trellis.scheduling.sequence import StoreHit

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

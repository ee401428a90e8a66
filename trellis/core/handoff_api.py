"""The P/D hand-off's contract, as plain data: what the router, the prefill head and the decode head
exchange to move one request's KV from a prefill replica P to a decode replica D.

The hand-off (docs/pd-disaggregation.md) in four calls, each with a deadline:
1. router -> D ``reserve(transfer, prompt, ttl_s)``: D matches its own prefix cache, takes blocks for
   the rest of the prompt and as many *staging slots* of its hand-off slab (a shared-memory file D
   owns, laid out like the KV store's slab: one whole-model block per slot) and answers a
   ``HandoffTarget``; ``Overloaded`` (RESOURCE_EXHAUSTED) when it has no room.
   At the same time, router -> P ``submit(request, handoff=HandoffRef(transfer))``: P prefills.
2. router -> P ``attach(transfer, target)``: P copies the prompt's blocks past ``target.first_block``
   into the target's slots (each of its (stage, rank) its own layers x KV heads, after the step that
   completed them), streams the first token, and when every copy came back ends its stream with
   finish_reason ``handoff`` and one checksum per slot. ``target=None``: D could not take it; P
   decodes the request itself (aggregated).
3. router -> D ``submit(request, handoff=HandoffRef(transfer, first_token, block_sums))``: D checks
   the reservation, loads the staging slots into its reserved blocks (every rank summing what it
   read), and streams the tokens after the first. A checksum that differs voids the load: D
   recomputes the prompt itself, its blocks never named from the bad bytes.
4. ``abort(transfer)`` on either side (cancel, deadline, a peer gone): frees that side at once.

Ownership: P's blocks are P's (it never lends them; they stay in its prefix cache), D's reserved
blocks are D's (only D's ranks write them, from its own staging slots). P writes only into staging
slots of a live reservation; a slot given up is not reused for ``QUARANTINE_S`` past the
transfer's deadline (a reservation that expired) or past the router's abort (which stops P
first), so a late copy of an abandoned transfer does not land in another's slots (and the
checksum would catch it if it did), and P plans no copy past the target's deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

HANDOFF_FINISH = "handoff"  # P's last chunk: the KV is in D's staging slots
QUARANTINE_S = 5.0  # a freed staging slot waits this long past its transfer's deadline


@dataclass(frozen=True)
class HandoffRef:
    """A request's part in a hand-off (in StageRequest.handoff)."""

    transfer_id: str
    epoch: int = 1
    # For D only: the first token P sampled and the per-slot checksums of what P copied.
    first_token: int = -1
    block_sums: tuple[int, ...] = ()

    @property
    def is_decode_half(self) -> bool:
        return self.first_token >= 0


@dataclass(frozen=True)
class HandoffTarget:
    """Where P copies a prompt's blocks: D's hand-off slab and one slot per block from first_block."""

    slab: str  # D's staging file (shared memory on this host)
    first_block: int  # blocks of the prompt D holds already (its own prefix match): not sent
    slots: tuple[int, ...]  # slot of prompt block first_block + i
    block_size: int
    fingerprint: str  # D's KVFingerprint key: P refuses a target that names blocks differently
    deadline: float = 0.0  # unix s (one host's clock): P plans no copy into these slots after it

    @property
    def num_blocks(self) -> int:
        return len(self.slots)


class HandoffError(ValueError):
    """A hand-off call that cannot be honoured (unknown transfer, another prompt, a shape mismatch)."""

"""A head's part in P/D hand-offs (trellis/core/handoff_api.py): the RPCs' domain side.

As prefill replica P: a request submitted with a HandoffRef prefills as usual; ``attach`` gives it
its target (D's staging slots) or tells it to decode here; the scheduler plans the copies and ends
its stream with finish_reason "handoff" and the checksums (trellis/scheduling/handoff.py).

As decode replica D: ``reserve`` holds blocks and staging slots (its hand-off slab, a shared-memory
file this head creates on first use and unlinks at exit) until a deadline, past which the
reservation is dropped; ``submit_decode`` commits it: the decode half's stream yields the tokens
after P's first. If the reservation is gone by then (deadline, abort), D recomputes the prompt
itself instead (the first token is fed as already generated), so the client's stream goes on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from trellis.core import log
from trellis.core.handoff_api import HandoffError, HandoffRef, HandoffTarget
from trellis.core.kv_names import KVFingerprint
from trellis.core.kv_store_api import SlotLayout
from trellis.core.sampling import SamplingParams
from trellis.kv_store.slab import Slab
from trellis.runtime.device_slab import DeviceSlab
from trellis.runtime.head import Head, RequestStream
from trellis.scheduling.block_manager import blocks_for
from trellis.scheduling.pd_requests import NoRoomError
from trellis.scheduling.sequence import HandoffOut
from trellis.scheduling.staging_slots import StagingSlots

__all__ = ["HandoffSide", "HandoffStats", "NoRoomError"]

ATTACH_WAIT_S = 10.0  # a prefill half waits this long for its target, then decodes the request here


@dataclass
class HandoffStats:
    reserved: int = 0  # reservations made (D)
    committed: int = 0  # decode halves that found their reservation (D)
    recomputed: int = 0  # decode halves that did not: the prompt recomputed here (D)
    expired: int = 0  # reservations dropped at their deadline (D)
    sent: int = 0  # prefill halves submitted (P)


class HandoffSide:
    def __init__(
        self,
        head: Head,
        fingerprint: KVFingerprint,
        layout: SlotLayout,
        *,
        replica: str,
        num_slots: int,
        shm_dir: str,
    ) -> None:
        self.head = head
        self.fingerprint = fingerprint
        self.layout = layout
        self.replica = replica
        self.num_slots = num_slots
        self.shm_dir = shm_dir
        self.stats = HandoffStats()
        self._slab: Slab | DeviceSlab | None = None
        self._seq_of: dict[str, int] = {}  # transfer id -> its sequence on this head
        self._transfer_of: dict[int, str] = {}
        self._early: dict[str, tuple[HandoffTarget | None, float]] = {}  # attaches before their request
        self._log = log.get(component="handoff")
        head.finish_listeners.append(self._forget_seq)

    # ---- P ---------------------------------------------------------------------------------------
    def submit_prefill(
        self, prompt: Sequence[int], sampling: SamplingParams, ref: HandoffRef
    ) -> RequestStream:
        """The prefill half. Its attach may have come first (two RPCs, no order between them); with
        none within ATTACH_WAIT_S (the router is gone, say) it decodes the request here."""
        stream = self.head.submit(prompt, sampling, handoff=HandoffOut(ref.transfer_id))
        self._remember(ref.transfer_id, stream.seq_id)
        self.stats.sent += 1
        early = self._early.pop(ref.transfer_id, None)
        if early is not None:
            self.attach(ref.transfer_id, early[0])
        else:
            loop = asyncio.get_running_loop()
            loop.call_later(ATTACH_WAIT_S, self._attach_overdue, ref.transfer_id, stream.seq_id)
        return stream

    def attach(self, transfer_id: str, target: HandoffTarget | None) -> bool:
        """Where the prefill half's blocks go (None: decode here). False: the request is gone.
        HandoffError for a target this replica cannot write (it then decodes the request here)."""
        seq_id = self._seq_of.get(transfer_id)
        if seq_id is None:  # its prefill half is not here yet (or is gone: then this expires)
            now = time.monotonic()
            self._early = {t: e for t, e in self._early.items() if now - e[1] < ATTACH_WAIT_S}
            self._early[transfer_id] = (target, now)
            return True
        scheduler = self.head.scheduler
        try:
            if target is not None and target.fingerprint != self.fingerprint.key:
                scheduler.attach(seq_id, None)
                raise HandoffError(
                    f"the decode replica names blocks under {target.fingerprint!r}, this one under "
                    f"{self.fingerprint.key!r}: another model, dtype or block size"
                )
            return scheduler.attach(seq_id, target)
        finally:
            self.head.wake()

    # ---- D ---------------------------------------------------------------------------------------
    def reserve(self, transfer_id: str, prompt: Sequence[int], ttl_s: float) -> HandoffTarget:
        """Blocks and staging slots for the part of ``prompt`` this head lacks, until ttl_s from now.
        Raises NoRoomError (no blocks or slots now), InvalidRequestError (never fits)."""
        if transfer_id in self._seq_of:
            raise HandoffError(f"transfer {transfer_id} is already reserved here")
        slab = self.ensure_slab()
        size = self.fingerprint.block_size
        names = self.fingerprint.block_hashes(prompt)[: len(prompt) // size]
        seq_id = self.head.new_seq_id()
        deadline = time.time() + ttl_s
        first, slots = self.head.scheduler.reserve(seq_id, prompt, transfer_id, deadline, names)
        self._remember(transfer_id, seq_id)
        asyncio.get_running_loop().call_later(ttl_s, self._expire, transfer_id, seq_id)
        self.stats.reserved += 1
        return HandoffTarget(str(slab.path), first, slots, size, self.fingerprint.key, deadline)

    def submit_decode(
        self, prompt: Sequence[int], sampling: SamplingParams, ref: HandoffRef
    ) -> RequestStream:
        """The decode half: its stream yields the tokens after ``ref.first_token``."""
        seq_id = self._seq_of.get(ref.transfer_id)
        scheduler = self.head.scheduler
        if seq_id is not None:
            try:
                scheduler.commit(seq_id, prompt, sampling, ref.first_token, ref.block_sums)
                self.stats.committed += 1
                return self.head.adopt(seq_id, prompt)
            except HandoffError as e:
                self._log.warning(
                    "hand-off not usable; recomputing here", transfer=ref.transfer_id, error=str(e)
                )
                self._drop(ref.transfer_id, seq_id)
        else:
            self._log.warning("hand-off reservation gone; recomputing here", transfer=ref.transfer_id)
        self.stats.recomputed += 1
        return self.head.submit(prompt, sampling, outputs=(ref.first_token,))

    def abort(self, transfer_id: str) -> bool:
        """Give up a transfer on this side now; False if nothing of it is held here."""
        seq_id = self._seq_of.get(transfer_id)
        if seq_id is None:
            return False
        if not self._drop(transfer_id, seq_id, aborted=True):
            self.head.abort(seq_id)
        return True

    def close(self) -> None:
        if isinstance(self._slab, Slab):
            self._slab.close()
        self._slab = None

    def ensure_slab(self) -> Slab | DeviceSlab:
        """The hand-off slab, made on first use: in GPU memory on a GPU (peers open it by CUDA IPC),
        else a shared-memory file."""
        if self._slab is None:
            ctx = self.head.executor.ctx
            if ctx.device.type == "cuda":
                device_slab = DeviceSlab(self.num_slots, self.layout, ctx.device)
                ctx.runner.own_slab(device_slab.name, device_slab.slots)
                self._slab = device_slab
            else:
                self._slab = Slab.create(
                    self.shm_dir,
                    f"handoff-{self.replica}",
                    uuid.uuid4().hex[:12],
                    self.num_slots,
                    self.layout.slot_bytes,
                    field="engine.handoff",
                )
            handoffs = self.head.scheduler.handoffs
            handoffs.staging = StagingSlots(self.num_slots)
            handoffs.slab = str(self._slab.path)
            where = "gpu" if isinstance(self._slab, DeviceSlab) else str(self._slab.path)
            self._log.info("hand-off slab ready", where=where, slots=self.num_slots)
        return self._slab

    # ---- internals -------------------------------------------------------------------------------
    def _attach_overdue(self, transfer_id: str, seq_id: int) -> None:
        if self.head.scheduler.awaits_target(seq_id):
            self._log.warning("no hand-off target came; decoding here", transfer=transfer_id)
            self.head.scheduler.attach(seq_id, None)
            self.head.wake()

    def _expire(self, transfer_id: str, seq_id: int) -> None:
        if self._drop(transfer_id, seq_id):
            self.stats.expired += 1
            self._log.info("hand-off reservation expired", transfer=transfer_id)

    def _drop(self, transfer_id: str, seq_id: int, *, aborted: bool = False) -> bool:
        """Drop a reservation that is not committed; False if there is none."""
        if not self.head.scheduler.drop_reserved(seq_id, aborted_at=time.time() if aborted else None):
            return False
        self._forget_seq(seq_id)
        return True

    def _remember(self, transfer_id: str, seq_id: int) -> None:
        self._seq_of[transfer_id] = seq_id
        self._transfer_of[seq_id] = transfer_id

    def _forget_seq(self, seq_id: int) -> None:
        transfer_id = self._transfer_of.pop(seq_id, None)
        if transfer_id is not None:
            self._seq_of.pop(transfer_id, None)


def default_slots(max_model_len: int, block_size: int, num_slots: int) -> int:
    """engine.handoff_slots, 0 resolved: room for two prompts of max_model_len."""
    return num_slots or 2 * blocks_for(max_model_len, block_size)

"""Copies between this rank's KV cache and the KV store's slab: one gather or scatter per step.

The slab (trellis/core/kv_store_api.py) is a shared-memory file of slots, each one block of the
whole model ``[layers, K|V, block_size, kv_heads, head_dim]``; this rank owns layers [l0, l1) and
KV heads [h0, h1) of it. The cache is block-major (trellis/runtime/model/kv_cache.py), so

    save: staged = gather_blocks(cache.data, blocks)   # [n, layers, 2, B, heads, D], one kernel
          slab[slots, l0:l1, :, :, h0:h1] = staged                  # host; one DMA per run of slots
    load: the reverse, one scatter (index_put) into the cache.

When this rank holds the whole slot (one stage, TP 1) a run of consecutive slots is one contiguous
span of the slab, copied as one transfer; otherwise each run is a strided copy. On CUDA the slab is
registered as pinned memory, so the transfers run at the host link's rate and do not block the host.

On CPU there is no device to stage on: each block is copied straight between its cache rows and its
slot, one strided copy of a whole block (all layers: ~2 MiB for an 8B model), which runs at memcpy
speed, where indexing the permuted cache ran at ~2 GB/s (bench/kv_store_bench.py).
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch

from trellis.core import log
from trellis.core.kv_names import kv_heads_of_rank
from trellis.core.kv_store_api import SlotLayout
from trellis.core.model_config import ModelConfig
from trellis.core.plan import KVCopy, StepPlan
from trellis.runtime.device_slab import DeviceSlabView, SlabError, is_device_slab
from trellis.runtime.model.parallel import TPGroup

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first index in ``slots``, first slot, length) of each run of consecutive slot numbers."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == s:
            first, start, n = runs[-1]
            runs[-1] = (first, start, n + 1)
        else:
            runs.append((i, s, 1))
    return runs


def on_tmpfs(path: str) -> bool:
    """Whether ``path`` lies on a tmpfs (the mount with the longest matching mount point)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1]
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        return False
    return kind == "tmpfs"


class SlabView:
    """The store's slab mapped into this process, as a tensor [num_slots, *layout.shape]."""

    def __init__(self, path: str, layout: SlotLayout, device: torch.device) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise SlabError(f"cannot open the KV store's slab {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < layout.slot_bytes:
                raise SlabError(f"the KV store's slab {path} holds no whole slot ({size} bytes)")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.num_slots = size // layout.slot_bytes
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=self.num_slots * layout.slot_bytes)
        self.slots = raw.view(_TORCH_DTYPES[layout.dtype]).view(self.num_slots, *layout.shape)
        self.pinned = False
        # Page-locked: DMA at the link's rate, and non_blocking copies. Only a tmpfs slab: pages of a
        # file on disk may be written back and moved, and DMA into them failed on an H200 host.
        if device.type == "cuda" and on_tmpfs(path):
            cudart = torch.cuda.cudart()
            self.pinned = int(cudart.cudaHostRegister(raw.data_ptr(), raw.numel(), 0)) == 0
            if not self.pinned:
                # A failed registration (e.g. a slab on a filesystem that is not a tmpfs) leaves a
                # CUDA error that the next kernel launch would report as its own: clear it.
                cudart.cudaGetLastError()
                log.get().warning("kv store slab not pinnable; copies run at pageable speed", path=path)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.slots.data_ptr())
            self.pinned = False
        del self.slots
        self._map.close()


class RankSlice:
    """This rank's part of a slot: layers [l0, l1) and KV heads [h0, h1) of the model's."""

    def __init__(self, layers: tuple[int, int], heads: tuple[int, int], layout: SlotLayout) -> None:
        self.layers, self.heads = layers, heads
        self.whole = layers == (0, layout.num_layers) and heads == (0, layout.num_kv_heads)

    def of(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` [n, L, 2, B, H, D] -> this rank's view [n, l1 - l0, 2, B, h1 - h0, D]."""
        (l0, l1), (h0, h1) = self.layers, self.heads
        return slots if self.whole else slots[:, l0:l1, :, :, h0:h1]


def _check(copies: Sequence[KVCopy], num_blocks: int, num_slots: int) -> tuple[list[int], list[int]]:
    blocks = [b for c in copies for b in c.block_ids]
    slots = [s for c in copies for s in c.slots]
    if len(blocks) != len(slots):
        raise SlabError(f"a KV copy lists {len(blocks)} blocks but {len(slots)} slots")
    if blocks and not (min(blocks) >= 0 and max(blocks) < num_blocks):
        raise SlabError(f"a KV copy names a cache block outside [0, {num_blocks})")
    if slots and not (min(slots) >= 0 and max(slots) < num_slots):
        raise SlabError(f"a KV copy names a store slot outside [0, {num_slots})")
    return blocks, slots


def slot_sums(slots: torch.Tensor) -> torch.Tensor:
    """One checksum per slot of ``slots`` [n, ...]: its bytes as little-endian int32 words, summed
    (int64). Every part a (stage, rank) copies is whole words (layers x heads, head_dim even), so
    the parts' sums add up to the whole slot's, whatever the split. 32-bit words: the sum runs at
    memory speed on a CPU (2-byte ones ran 3.4x slower than the copy they check)."""
    words = slots.view(torch.int32)
    return words.sum(dim=tuple(range(1, words.dim())), dtype=torch.int64)


def save_blocks(
    cache: torch.Tensor,
    slab: SlabView | DeviceSlabView,
    part: RankSlice,
    copies: Sequence[KVCopy],
    num_blocks: int,
    sums: list[torch.Tensor] | None = None,
) -> int:
    """Copy the listed cache blocks out to their slots (this rank's part). Returns bytes moved.

    ``cache``: the block-major [layers, 2, blocks, B, heads, D] tensor. On CUDA the copies are
    queued on the current stream; the step's closing sync makes them complete. ``sums``: append
    one checksum per slot (of the bytes as written).
    """
    blocks, slots = _check(copies, num_blocks, slab.num_slots)
    if not blocks:
        return 0
    if cache.device.type == "cpu":
        for b, s in zip(blocks, slots, strict=True):
            slot = part.of(slab.slots[s : s + 1])
            slot[0].copy_(cache[:, :, b])
            if sums is not None:
                sums.append(slot_sums(slot))
        return len(blocks) * cache[:, :, 0].numel() * cache.element_size()
    from trellis.runtime.kernels.kv_blocks import gather_blocks  # triton: the CUDA path only

    ids = torch.tensor(blocks, dtype=torch.int64, device=cache.device)
    block_sums = None if sums is None else torch.zeros(len(blocks), dtype=torch.int64, device=cache.device)
    runs = slot_runs(slots)
    dests = [part.of(slab.slots[start : start + n]) for _, start, n in runs]
    if all(d.device == cache.device and d.is_contiguous() for d in dests):
        # Slots in this GPU's memory (a decode replica's device slab): one kernel per run of slots,
        # straight from the cache into them, the checksums summed on the way.
        for (first, _, n), dest in zip(runs, dests, strict=True):
            run_sums = None if block_sums is None else block_sums[first : first + n]
            gather_blocks(cache, ids[first : first + n], out=dest, sums=run_sums)
    else:
        staged = gather_blocks(cache, ids, sums=block_sums)  # one kernel: [n, layers, 2, B, heads, D]
        for (first, _, n), dest in zip(runs, dests, strict=True):
            dest.copy_(staged[first : first + n], non_blocking=slab.pinned)
    if block_sums is not None:
        sums.append(block_sums)
    return len(blocks) * cache[:, :, 0].numel() * cache.element_size()


def load_blocks(
    cache: torch.Tensor,
    slab: SlabView | DeviceSlabView,
    part: RankSlice,
    copies: Sequence[KVCopy],
    num_blocks: int,
    sums: list[torch.Tensor] | None = None,
) -> int:
    """Fill the listed cache blocks from their slots (this rank's part). Returns bytes moved;
    ``sums``: append one checksum per slot (of the bytes as read)."""
    blocks, slots = _check(copies, num_blocks, slab.num_slots)
    if not blocks:
        return 0
    if cache.device.type == "cpu":
        for b, s in zip(blocks, slots, strict=True):
            cache[:, :, b].copy_(part.of(slab.slots[s : s + 1])[0])
            if sums is not None:  # of what landed (one read of the shared slot: the same words)
                sums.append(slot_sums(cache[:, :, b].unsqueeze(0)))
        return len(blocks) * cache[:, :, 0].numel() * cache.element_size()
    from trellis.runtime.kernels.kv_blocks import scatter_blocks  # triton: the CUDA path only

    ids = torch.tensor(blocks, dtype=torch.int64, device=cache.device)
    block_sums = None if sums is None else torch.zeros(len(blocks), dtype=torch.int64, device=cache.device)
    runs = slot_runs(slots)
    pieces = [part.of(slab.slots[start : start + n]) for _, start, n in runs]
    if all(p.device == cache.device and p.is_contiguous() and p.dtype == cache.dtype for p in pieces):
        for (first, _, n), piece in zip(runs, pieces, strict=True):  # straight from device slots
            run_sums = None if block_sums is None else block_sums[first : first + n]
            scatter_blocks(cache, ids[first : first + n], piece, sums=run_sums)
    else:
        pieces = [p.to(cache.device, non_blocking=slab.pinned) for p in pieces]
        staged = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        scatter_blocks(cache, ids, staged.to(cache.dtype).contiguous(), sums=block_sums)  # one kernel
    if block_sums is not None:
        sums.append(block_sums)
    return len(blocks) * cache[:, :, 0].numel() * cache.element_size()


class StoreCopies:
    """One rank's side of a plan's KV copies: its part of a slot, and each slab it copies through
    (the store's, decode replicas' hand-off slabs) mapped once, up to MAX_SLABS of them (a
    restarted store names another slab, which is mapped beside, the old one dropped in time)."""

    MAX_SLABS = 8

    def __init__(
        self,
        cfg: ModelConfig,
        layers: tuple[int, int],
        tp: TPGroup,
        block_size: int,
        dtype: str,
        device: torch.device,
    ) -> None:
        self.layout = SlotLayout(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, block_size, dtype
        )
        heads = kv_heads_of_rank(cfg, tp.size, tp.rank)
        self.part = RankSlice(layers, heads, self.layout)
        # With more ranks than KV heads a head is held by several ranks: only the lowest one sends it
        # and counts it in the checksums (the others would add the same bytes again).
        self.primary = tp.rank == 0 or kv_heads_of_rank(cfg, tp.size, tp.rank - 1) != heads
        self.tp = tp
        self.device = device
        self._slabs: OrderedDict[str, SlabView | DeviceSlabView] = OrderedDict()
        self._owned: dict[str, torch.Tensor] = {}  # device slabs of this process (its hand-off slab)
        self._sums: list[torch.Tensor] = []
        self._failed = False

    def apply(self, plan: StepPlan, cache: torch.Tensor, num_blocks: int) -> bool:
        """The plan's saves then loads (before its layers); True if they failed on any rank of the
        stage (every rank agrees, by one all-reduce): the head then voids what the loads fed and
        aborts the puts, and the stage goes on serving. Hand-off loads are summed (see `finish`)."""
        failed = False
        self._sums, self._failed = [], False  # this plan's, for `finish`
        if not (plan.kv_saves or plan.kv_loads):
            return False
        try:
            if plan.kv_saves:
                save_blocks(cache, self._slab_for(plan.kv_slab), self.part, plan.kv_saves, num_blocks)
            for copy in plan.kv_loads:  # every rank loads; only the primary one counts the sums
                sums = self._sums if copy.slab and self.primary else None
                slab = self._slab_for(copy.slab or plan.kv_slab)
                load_blocks(cache, slab, self.part, [copy], num_blocks, sums)
        except SlabError as e:
            log.get().warning("kv store copy failed; the head recomputes", step_id=plan.step_id, error=str(e))
            failed = True
        if self.tp.size > 1:
            flag = torch.tensor([float(failed)], device=self.device)
            failed = bool(self.tp.all_reduce(flag).item())
        self._failed = failed
        return failed

    def finish(self, plan: StepPlan, cache: torch.Tensor, num_blocks: int) -> tuple[bool, tuple[int, ...]]:
        """After the layers: the plan's sends (a block this step completed goes out now), then the
        stage's checksums of every summed slot, added over the TP group (one all-reduce). Returns
        (failed on some rank, the sums: one per slot of plan.summed_copies)."""
        failed = self._failed
        try:
            for copy in plan.kv_sends if self.primary else ():
                save_blocks(cache, self._slab_for(copy.slab), self.part, [copy], num_blocks, self._sums)
        except SlabError as e:
            log.get().warning("kv hand-off send failed", step_id=plan.step_id, error=str(e))
            failed = True
        n = sum(len(c.slots) for c in plan.summed_copies)
        ok = not failed and (not self.primary or sum(t.numel() for t in self._sums) == n)
        sums = torch.cat(self._sums).to(self.device) if ok and self._sums else None
        if sums is None:
            sums = torch.zeros(n, dtype=torch.int64, device=self.device)
        self._sums = []
        if self.tp.size > 1:
            both = torch.cat([torch.tensor([int(not ok)], dtype=torch.int64, device=self.device), sums])
            both = self.tp.all_reduce(both)
            ok, sums = not bool(both[0].item()), both[1:]
        return not ok, tuple(sums.tolist()) if ok else ()

    def own(self, name: str, slots: torch.Tensor) -> None:
        """A device slab this process allocated (a decode head's hand-off slab): used as it is."""
        self._owned[name] = slots

    def _slab_for(self, path: str) -> SlabView | DeviceSlabView:
        if not path:
            raise SlabError("the plan copies KV but names no slab")
        slab = self._slabs.get(path)
        if slab is None and is_device_slab(path):  # a decode replica's slab in GPU memory
            slab = self._slabs[path] = DeviceSlabView(path, self.layout, self._owned.get(path))
        elif slab is None:  # first use (or a restarted store's new slab)
            slab = self._slabs[path] = SlabView(path, self.layout, self.device)
            if len(self._slabs) > self.MAX_SLABS:
                self._slabs.popitem(last=False)[1].close()
        self._slabs.move_to_end(path)
        return slab

    def close(self) -> None:
        for slab in self._slabs.values():
            slab.close()
        self._slabs.clear()

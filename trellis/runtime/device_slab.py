"""A decode replica's hand-off slab in GPU memory, opened by its peers through CUDA IPC.

A staging slab in host memory caps a GPU hand-off at the host link (gather, device to host, host to
device, scatter: ~48 GB/s each way on an H200 host). In device memory the prefill replica's ranks
write the decode replica's slots, and its ranks read them, at device rate (peer memory over NVLink
when they sit on other GPUs of the node). The slab is one tensor ``[num_slots, *SlotLayout.shape]``
on the decode head's GPU; its name is ``cuda-ipc:`` and the JSON of the IPC handle of its storage
(the fields ``UntypedStorage._share_cuda_`` gives, bytes as hex): plain data, never pickled. The
owner holds the tensor for its whole life; any other process opens the handle once and keeps it.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from trellis.core.kv_store_api import SlotLayout

PREFIX = "cuda-ipc:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SlabError(RuntimeError):
    """A slab cannot be mapped or opened, or a copy names a slot outside it (kv_copy's, too)."""


def is_device_slab(name: str) -> bool:
    return name.startswith(PREFIX)


class DeviceSlab:
    """The owner's side: the slots, allocated on ``device``, and the name peers open them by."""

    def __init__(self, num_slots: int, layout: SlotLayout, device: torch.device) -> None:
        self.slots = torch.zeros((num_slots, *layout.shape), dtype=_DTYPES[layout.dtype], device=device)
        self.num_slots = num_slots
        fields = self.slots.untyped_storage()._share_cuda_()
        self.name = PREFIX + json.dumps([f.hex() if isinstance(f, bytes) else f for f in fields])

    @property
    def path(self) -> str:  # what a target names (a file's path for a host slab)
        return self.name


class DeviceSlabView:
    """A peer's view of another process's DeviceSlab, with the interface of kv_copy.SlabView."""

    pinned = True  # device memory: copies never block the host

    def __init__(self, name: str, layout: SlotLayout, owned: torch.Tensor | None = None) -> None:
        """The slots live on the owner's GPU; a rank on another GPU copies peer to peer."""
        self.path = name
        if owned is not None:  # the owner's own process cannot open its handle: it uses the tensor
            self.slots = owned
        else:
            self.slots = _open(name, layout)
        self.num_slots = self.slots.shape[0]

    def close(self) -> None:
        del self.slots


def _open(name: str, layout: SlotLayout) -> torch.Tensor:
    try:
        raw: list[Any] = json.loads(name[len(PREFIX) :])
        dev, handle, size, offset, ref_handle, ref_offset, event, sync = raw
        fields = (dev, bytes.fromhex(handle), size, offset, bytes.fromhex(ref_handle), ref_offset)
        fields += (bytes.fromhex(event) if isinstance(event, str) else event, sync)
        torch.cuda._lazy_init()
        storage = torch.UntypedStorage._new_shared_cuda(*fields)
    except (ValueError, TypeError, RuntimeError) as e:
        raise SlabError(f"cannot open the decode replica's device slab: {e}") from None
    dtype = _DTYPES[layout.dtype]
    per_slot = layout.slot_bytes // dtype.itemsize
    n = storage.nbytes() // dtype.itemsize
    flat = torch.empty(0, dtype=dtype, device=torch.device("cuda", dev)).set_(storage, 0, (n,), (1,))
    return flat[: (n // per_slot) * per_slot].view(-1, *layout.shape)

"""The stage leader drives its TP peers: each step it broadcasts the plan (and hidden states).

Plan bytes go over a gloo group (host memory, cheap for small messages); hidden states over the
TP group's own backend (gloo on CPU, NCCL on GPU), straight into device memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_STOP = -1


class ControlChannel:
    def __init__(
        self,
        *,
        tp: int,
        device: torch.device,
        dtype: torch.dtype,
        ctrl_group: dist.ProcessGroup | None,
        data_group: dist.ProcessGroup | None,
    ) -> None:
        self.tp = tp
        self.device = device
        self.dtype = dtype
        self._ctrl = ctrl_group
        self._data = data_group

    def send(self, header: bytes, hidden: torch.Tensor | None) -> None:
        """Leader: give every peer this step's plan bytes and hidden states."""
        if self.tp == 1:
            return
        shape = (0, 0) if hidden is None else tuple(hidden.shape)
        meta = torch.tensor([len(header), *shape], dtype=torch.int64)
        dist.broadcast(meta, src=0, group=self._ctrl)
        dist.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8), src=0, group=self._ctrl)
        if hidden is not None:
            dist.broadcast(hidden.contiguous(), src=0, group=self._data)

    def stop(self) -> None:
        """Leader: tell the peers to exit their loop."""
        if self.tp > 1:
            dist.broadcast(torch.tensor([_STOP, 0, 0], dtype=torch.int64), src=0, group=self._ctrl)

    def recv(self) -> tuple[bytes, torch.Tensor | None] | None:
        """Peer: the next step's plan bytes and hidden states, or None when told to stop."""
        meta = torch.empty(3, dtype=torch.int64)
        dist.broadcast(meta, src=0, group=self._ctrl)
        n, rows, cols = (int(x) for x in meta)
        if n == _STOP:
            return None
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self._ctrl)
        hidden = None
        if rows or cols:
            hidden = torch.empty(rows, cols, dtype=self.dtype, device=self.device)
            dist.broadcast(hidden, src=0, group=self._data)
        return buf.numpy().tobytes(), hidden

"""The stage leader drives its TP peers: each step it broadcasts the plan; the ranks gather hidden states.

Plan bytes go over a gloo group (host memory, cheap for small messages). Hidden states from the
previous stage are never broadcast: each rank received its own column slice over UCX
(`handoff.py`), and the TP group all-gathers them over its own backend (gloo on CPU, NCCL on GPU),
straight into device memory.
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
        ctrl_group: dist.ProcessGroup | None,
        data_group: dist.ProcessGroup | None,
    ) -> None:
        self.tp = tp
        self.device = device
        self._ctrl = ctrl_group
        self._data = data_group

    def send(self, header: bytes, hidden_shape: tuple[int, ...] | None) -> None:
        """Leader: give every peer this step's plan bytes, and the shape [tokens, hidden] of the
        hidden states whose slice each rank then receives on its own link (None: no hidden input)."""
        if self.tp == 1:
            return
        rows, cols = hidden_shape if hidden_shape is not None else (0, 0)
        meta = torch.tensor([len(header), int(hidden_shape is not None), rows, cols], dtype=torch.int64)
        dist.broadcast(meta, src=0, group=self._ctrl)
        dist.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8), src=0, group=self._ctrl)

    def stop(self) -> None:
        """Leader: tell the peers to exit their loop."""
        if self.tp > 1:
            dist.broadcast(torch.tensor([_STOP, 0, 0, 0], dtype=torch.int64), src=0, group=self._ctrl)

    def recv(self) -> tuple[bytes, tuple[int, int] | None] | None:
        """Peer: the next step's plan bytes and hidden-state shape, or None when told to stop."""
        meta = torch.empty(4, dtype=torch.int64)
        dist.broadcast(meta, src=0, group=self._ctrl)
        n, has_hidden, rows, cols = (int(x) for x in meta)
        if n == _STOP:
            return None
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self._ctrl)
        return buf.numpy().tobytes(), (rows, cols) if has_hidden else None

    def all_linked(self, linked: bool) -> bool:
        """Every rank: whether every rank of the stage has its links to the neighbouring stages."""
        flag = torch.tensor([int(linked)], dtype=torch.int64)
        if self.tp > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._ctrl)
        return bool(flag.item())

    def gather_columns(self, part: torch.Tensor) -> torch.Tensor:
        """Every rank: the hidden states [tokens, hidden] from each rank's columns [tokens, hidden / tp]
        (rank r holds columns [r * hidden / tp, (r + 1) * hidden / tp))."""
        part = part.to(self.device).contiguous()
        if self.tp == 1:
            return part
        if part.shape[0] == 0:  # every rank knows the plan is empty: no collective
            return part.new_empty((0, part.shape[1] * self.tp))
        parts = [torch.empty_like(part) for _ in range(self.tp)]
        dist.all_gather(parts, part, group=self._data)
        return torch.cat(parts, dim=-1)

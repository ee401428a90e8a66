"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step launches hundreds of small kernels; launched from Python they take far longer than
the GPU needs to run them. Captured once per bucket, a step is one replay. Inputs live in static
buffers: a step copies its ids (or hidden states), positions, slots, block tables and context
lengths in, pads the rows up to the bucket (padding rows write to a scratch block that no
sequence owns and read one cached token), and replays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trellis.core import log
from trellis.runtime.model.attention_metadata import AttentionMetadata
from trellis.runtime.model.loader import show_progress

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)


class DecodeGraphs:
    def __init__(
        self,
        *,
        forward: Callable[[AttentionMetadata, torch.Tensor], torch.Tensor],
        is_first: bool,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        scratch_block: int,
        max_batch: int,
        max_blocks_per_seq: int,
    ) -> None:
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.is_first = is_first
        self._forward = forward
        n, w = max_batch, max_blocks_per_seq
        self.inputs = (
            torch.zeros(n, dtype=torch.int64, device=device)
            if is_first
            else torch.zeros(n, hidden_size, dtype=dtype, device=device)
        )
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, w, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Per row: token id, position, slot, context length, then the block table. Filled on the
        # host in pinned memory and moved in one copy: a step's inputs cost one H2D transfer.
        self._host = torch.zeros(n, 4 + w, dtype=torch.int64).pin_memory()
        self._host_np = self._host.numpy()
        self._staged = torch.zeros(n, 4 + w, dtype=torch.int64, device=device)
        self._copied = torch.cuda.Event()
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:bs],
            slot_mapping=self.slots[:bs],
            query_start=self.query_start[: bs + 1],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            block_size=self.block_size,
            start_positions=(0,) * bs,
            query_lens=(1,) * bs,
        )

    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool (a progress bar on TP
        rank 0 at a terminal: warm-up and capture of each bucket)."""
        logger = log.get()
        self._pad(0, self.max_batch)
        pool = torch.cuda.graph_pool_handle()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        buckets = tqdm(
            list(reversed(self.buckets)),
            desc="warming up and capturing decode graphs",
            unit="graph",
            disable=not show_progress(rank),
        )
        for bs in buckets:
            meta = self._meta(bs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up outside the graph (lazy inits, autotuning)
                for _ in range(2):
                    self._forward(meta, self.inputs[:bs])
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bs] = self._forward(meta, self.inputs[:bs])
            self._graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("decode graphs captured", buckets=self.buckets)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _pad(self, n: int, bs: int) -> None:
        if bs > n:
            self.positions[n:bs] = 0
            self.slots[n:bs] = self.scratch_block * self.block_size
            self.block_tables[n:bs] = self.scratch_block
            self.context_lens[n:bs] = 1

    def run(
        self, inputs: torch.Tensor | Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """One decode step of n = len(positions) sequences: token ids (first stage; a list, or a
        device tensor when a burst feeds back its own picks) or hidden states [n, hidden]; returns
        the output rows [n, ...]."""
        n = len(positions)
        bs = self.bucket(n)
        width = max(len(t) for t in tables)
        self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        h = self._host_np
        ids_on_host = self.is_first and not isinstance(inputs, torch.Tensor)
        if ids_on_host:
            h[:n, 0] = inputs
        pos = np.asarray(positions, dtype=np.int64)
        h[:n, 1] = pos
        for i, t in enumerate(tables):
            h[i, 4 : 4 + len(t)] = t
        blocks = h[np.arange(n), 4 + pos // self.block_size]
        h[:n, 2] = blocks * self.block_size + pos % self.block_size
        h[:n, 3] = pos + 1
        staged = self._staged[:n, : 4 + width]
        staged.copy_(self._host[:n, : 4 + width], non_blocking=True)
        self._copied.record()
        if ids_on_host:
            self.inputs[:n] = staged[:, 0]
        else:
            self.inputs[:n].copy_(inputs)
        self.positions[:n] = staged[:, 1]
        self.slots[:n] = staged[:, 2]
        self.context_lens[:n] = staged[:, 3]
        self.block_tables[:n, :width] = staged[:, 4:]
        self._pad(n, bs)
        self._graphs[bs].replay()
        return self._outputs[bs][:n]

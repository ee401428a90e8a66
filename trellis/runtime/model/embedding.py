"""Vocab-parallel embedding and LM head: the vocabulary split into contiguous shards, one per rank.

The vocabulary is padded up to a multiple of ``pad_to * tp`` so every shard has the same size; the
padding rows are zero and the logits they would give are dropped.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from trellis.runtime.model.linear import make_param
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.model.weights import Loadable, copy_checked, read_rows

VOCAB_PAD = 64


def padded_vocab_size(vocab_size: int, tp: int, pad_to: int = VOCAB_PAD) -> int:
    multiple = pad_to * tp
    return -(-vocab_size // multiple) * multiple


def load_vocab_shard(
    param: nn.Parameter, loaded: Loadable, shard_id: object = None, *, start: int, valid_rows: int
) -> None:
    copy_checked(param.data[:valid_rows], read_rows(loaded, start, start + valid_rows))
    param.data[valid_rows:].zero_()


class VocabParallelEmbedding(nn.Module):
    """Token ids [tokens] -> embeddings [tokens, hidden], replicated on every rank."""

    def __init__(self, vocab_size: int, hidden: int, *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = padded_vocab_size(vocab_size, tp.size) // tp.size
        self.vocab_start = tp.rank * self.shard_size
        self.vocab_end = self.vocab_start + self.shard_size
        self.valid_rows = max(0, min(self.shard_size, vocab_size - self.vocab_start))  # the rest is padding
        loader = partial(load_vocab_shard, start=self.vocab_start, valid_rows=self.valid_rows)
        self.weight = make_param((self.shard_size, hidden), dtype, loader)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Each rank embeds the ids in its shard, zeros the others; the all-reduce fills every row.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states [rows, hidden] -> logits [rows, vocab], gathered on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)  # [rows, shard_size]
        return self.tp.all_gather(local, dim=-1)[:, : self.vocab_size]

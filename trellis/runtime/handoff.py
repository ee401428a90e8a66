"""Hidden states between pipeline stages, sliced by TP rank.

After a stage's layers every TP rank holds the same hidden states [tokens, hidden] (row-parallel
outputs are all-reduced), so rank r sends only columns [r * hidden / tp, (r + 1) * hidden / tp) to
rank r of the next stage, over its own UCX link: tp times fewer bytes per link, and the tp links
run side by side. The receiving TP group all-gathers the slices (`ControlChannel.gather_columns`).
"""

from __future__ import annotations

import torch

from trellis.core.handoff_rules import sliced_handoff_problem as sliced_handoff_problem  # re-exported
from trellis.runtime.rank import DTYPES


class HandoffError(RuntimeError):
    """The hand-off between two stages went out of step (a bug, or a stage of another layout)."""


def column_slice(hidden: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s columns of [tokens, hidden], as a tensor of its own (a send reads it whole).

    Always a copy: with one token the columns would be a view of the runner's output buffer."""
    width = hidden.shape[-1] // tp
    return hidden[..., rank * width : (rank + 1) * width].clone(memory_format=torch.contiguous_format)


def payload_tensor(payload: torch.Tensor | None, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A received raw payload (flat uint8, or None when empty) as a tensor of dtype and shape."""
    if payload is None:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return payload.view(DTYPES[dtype]).view(shape)

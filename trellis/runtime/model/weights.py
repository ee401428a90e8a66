"""Reading one rank's part of a checkpoint tensor, from a safetensors slice or an in-memory tensor.

A safetensors ``get_slice`` object reads from disk only the rows/columns it is indexed with, so a
weight loader that indexes before copying never materializes the full tensor.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from trellis.core.errors import ModelError


class TensorSlice(Protocol):
    """What ``safe_open(...).get_slice(name)`` returns: a lazily read tensor."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


Loadable = torch.Tensor | TensorSlice


def shape_of(src: Loadable) -> tuple[int, ...]:
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def read_rows(src: Loadable, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) along dim 0 (works for 1-D biases too)."""
    rows = shape_of(src)[0]
    if not 0 <= start <= end <= rows:
        raise ModelError(f"rows [{start}, {end}) are outside a tensor of shape {list(shape_of(src))}")
    return src[start:end]


def read_cols(src: Loadable, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) of a 2-D tensor."""
    shape = shape_of(src)
    if len(shape) != 2 or not 0 <= start <= end <= shape[1]:
        raise ModelError(f"columns [{start}, {end}) are outside a tensor of shape {list(shape)}")
    return src[:, start:end]


def read_all(src: Loadable) -> torch.Tensor:
    return src[:]


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a checkpoint piece into a parameter (casting dtype), refusing a shape mismatch."""
    if dst.shape != src.shape:
        raise ModelError(
            f"shape mismatch: checkpoint gives {list(src.shape)}, model expects {list(dst.shape)}"
        )
    dst.copy_(src)

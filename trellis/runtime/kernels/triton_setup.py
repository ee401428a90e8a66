"""Triton, prepared for this machine: every kernel file takes ``triton`` and ``tl`` from here.

Without CUDA only Triton's interpreter can run the kernels (that is how the unit tests check them
on CPU). Triton reads ``TRITON_INTERPRET`` as it decorates its own library (tl.sum, tl.cdiv...) and
ours, so the variable must be set before triton is first imported: hence one module that sets it
and then imports triton, and no kernel file that imports triton directly. An explicit
``TRITON_INTERPRET`` setting is kept.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["is_interpreted", "tl", "triton"]


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a @triton.jit function) runs in Triton's interpreter, not compiled."""
    return isinstance(kernel, InterpretedFunction)

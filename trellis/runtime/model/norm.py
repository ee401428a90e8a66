"""RMSNorm, computed in float32 as Hugging Face Llama does, then cast back."""

from __future__ import annotations

import torch
from torch import nn

from trellis.runtime.model.linear import load_whole, make_param


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, *, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = make_param((hidden,), dtype, load_whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> same
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

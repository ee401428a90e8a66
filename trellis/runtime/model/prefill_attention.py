"""Prefill attention on the fused SDPA kernels (GPU), one sequence's chunk at a time.

A chunk of n queries at positions start .. start + n - 1 attends over its sequence's keys at
0 .. start + n - 1: query i sees key j iff j <= start + i, and with a sliding window W also
start + i - j < W. Three cases:

- a fresh prompt (start = 0) within the window: plain causal attention on the chunk's own k, v
  (optionally long ones on cuDNN, padded so that lengths share its plans: attend_fresh);
- earlier context (start > 0: an earlier chunk, or the prefix cache) within the window: over K/V
  gathered from the paged cache, causal aligned to the bottom right (the last query sees every
  key), given to SDPA as a ``causal_lower_right`` bias, which flash and efficient attention
  apply without materialising a mask;
- keys reaching past the window (start + n > W): a boolean mask over the keys inside the window
  only, on efficient attention (the fused kernel that takes a mask). Mistral-style windows run here.

Every fused backend needs 4-D input [batch, heads, tokens, head_dim]: 3-D views send SDPA to the math
path (fp32 scores, K/V repeated to every head, a dense mask), which is what this module avoids.
The CPU backend (attention_backend.TorchReferenceBackend) keeps its own exact path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right


@dataclass(frozen=True)
class SdpaChoice:
    """The fused kernel prefill asks for first, and whether K/V are repeated to the query heads
    first (for a backend that refuses or mishandles grouped-query input)."""

    first: SDPBackend
    expand_kv: bool

    def backends(self) -> list[SDPBackend]:
        """Priority order: the chosen kernel, then flash, efficient and last math (which takes
        any input), so an input the first refuses (fp32, a mask, a head dim) still runs."""
        rest = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
        return [self.first, *(b for b in rest if b != self.first)]


# Picked by measurement on an H200, torch 2.11, cuDNN 9.19 (bench/sdpa_backends.py, bench/RESULTS.md).
# Fresh prompts: flash. cuDNN is faster from 2k tokens (8k, 32 / 8 heads: 0.98 ms a layer vs flash
# 1.80) but builds an execution plan per shape (40-60 ms, once), so with LONG_PROMPTS_ON_CUDNN long
# prompts are padded to a multiple of CUDNN_PAD_TO and lengths share plans (8k: 219 ms against
# flash's 241, 81% of the FLOP limit; 32k: 80% against 63%); tests/gpu/test_prefill_gpu.py checks the
# padded path against the reference. Below CUDNN_MIN_TOKENS flash is as fast, with no plans.
# Chunks with context: flash takes the bottom-right alignment and grouped-query K/V as they are.
FRESH = SdpaChoice(SDPBackend.FLASH_ATTENTION, expand_kv=False)
LONG_PROMPTS_ON_CUDNN = True
LONG_FRESH = SdpaChoice(SDPBackend.CUDNN_ATTENTION, expand_kv=False)
CUDNN_MIN_TOKENS = 2048
CUDNN_PAD_TO = 512
WITH_CONTEXT = SdpaChoice(SDPBackend.FLASH_ATTENTION, expand_kv=False)
# A mask rules out flash and cuDNN; efficient attention is the fused kernel that takes one.
WINDOWED = SdpaChoice(SDPBackend.EFFICIENT_ATTENTION, expand_kv=True)


def within_window(context: int, sliding_window: int | None) -> bool:
    """True when no query of a chunk ending at ``context`` keys can see past the window: the
    farthest distance, context - 1, stays below W, so the window changes nothing."""
    return sliding_window is None or context <= sliding_window


def attend_fresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Causal attention of a prompt's first chunk on its own keys: q [n, q_heads, d], k, v
    [n, kv_heads, d] (strided views of the fused qkv output are fine) -> [n, q_heads, d].

    With LONG_PROMPTS_ON_CUDNN a long 16-bit chunk runs on LONG_FRESH over rows padded with zeros
    to a multiple of CUDNN_PAD_TO. That is exact: real query i sees keys j <= i < n only, so the
    padded keys are never seen, and the padded query rows are dropped."""
    n = q.shape[0]
    if not LONG_PROMPTS_ON_CUDNN or n < CUDNN_MIN_TOKENS or q.dtype not in (torch.bfloat16, torch.float16):
        return _sdpa(q, k, v, FRESH, is_causal=True, scale=scale)
    rows = -(-n // CUDNN_PAD_TO) * CUDNN_PAD_TO
    padded = (_pad_rows(t, rows) for t in (q, k, v))  # one layout for every length: one plan per size
    return _sdpa(*padded, LONG_FRESH, is_causal=True, scale=scale)[:n]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, heads, d] copied into a contiguous [rows, heads, d] whose rows n.. are zero (finite:
    a masked key still meets its value as 0 x V inside a kernel's tile)."""
    out = t.new_empty((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    out[t.shape[0] :].zero_()
    return out


def attend_with_context(
    q: torch.Tensor,
    flat_k: torch.Tensor,
    flat_v: torch.Tensor,
    slots: torch.Tensor,
    start: int,
    *,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Queries q [n, q_heads, d] at positions start .. start + n - 1 over the sequence's keys at
    ``slots`` [start + n] of the flat caches [slots, kv_heads, d] (this chunk's keys already
    stored) -> [n, q_heads, d]."""
    n, context = q.shape[0], slots.shape[0]
    if within_window(context, sliding_window):
        k, v = flat_k[slots], flat_v[slots]
        return _sdpa(q, k, v, WITH_CONTEXT, bias=causal_lower_right(n, context), scale=scale)
    assert sliding_window is not None
    first_key = max(0, start - sliding_window + 1)  # the first query's window; later ones see less far back
    keys = slots[first_key:]
    distance = torch.arange(start, start + n, device=q.device)[:, None] - torch.arange(
        first_key, context, device=q.device
    )
    allowed = (distance >= 0) & (distance < sliding_window)
    return _sdpa(q, flat_k[keys], flat_v[keys], WINDOWED, mask=allowed, scale=scale)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    choice: SdpaChoice,
    *,
    scale: float,
    is_causal: bool = False,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA over [tokens, heads, d] inputs, viewed as 4-D [1, heads, tokens, d]; the output comes
    back as [n, q_heads, d] (for flash and cuDNN a free view: they write [1, n, heads, d])."""
    groups = q.shape[1] // k.shape[1]
    # The efficient kernel reached through a CausalBias gets K/V as given, so fp32 (which flash
    # refuses) with grouped heads is expanded whatever the choice says.
    expand = groups > 1 and (choice.expand_kv or (bias is not None and q.dtype == torch.float32))
    if expand:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    attn_mask = bias if bias is not None else mask
    with sdpa_kernel(choice.backends(), set_priority=True):
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=not expand
        )
    return out[0].transpose(0, 1)

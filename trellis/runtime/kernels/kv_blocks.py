"""A request's KV blocks out of (gather) or into (scatter) the block-major cache, as one kernel.

The cache is ``[layers, 2, num_blocks, block_size, heads, head_dim]`` (trellis/runtime/model/
kv_cache.py): viewed as ``[planes = layers * 2, num_blocks, chunk = block_size * heads * head_dim]``,
block b of plane p is one contiguous chunk (32 KiB for an 8B model). The staging tensor is
block-major, ``[n, planes, chunk]``, i.e. ``[n, layers, 2, block_size, heads, head_dim]``: block i's
whole slot contiguous, as the KV store's slab holds it. Each program moves BLOCK elements of one
(block, plane) chunk, so a 4k prompt of an 8B model (256 blocks x 64 planes) is ~65k programs,
every load and store contiguous: a pure copy at the memory's rate, where indexing a permuted view
in PyTorch ran at ~0.84 TB/s read + write on an H200.
"""

from __future__ import annotations

import torch

from trellis.runtime.kernels.checks import KernelInputError
from trellis.runtime.kernels.triton_setup import tl, triton

_BLOCK = 4096  # elements per program


# Slices of the ids and sums (one run of slots each) start anywhere: no alignment specialization,
# so a run's offset never compiles another variant on the request's path.
@triton.jit(do_not_specialize=["ids_ptr", "sums_ptr"])
def _kv_blocks_kernel(
    cache_ptr,  # [planes, num_blocks, chunk], contiguous
    staged_ptr,  # [n, planes, chunk], contiguous
    ids_ptr,  # [n] int64 block ids
    sums_ptr,  # [n] int64, added to (SUMS only)
    num_blocks,
    planes,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHER: tl.constexpr,
    SUMS: tl.constexpr,
    WIDE: tl.constexpr,  # 4-byte elements (else 2-byte)
):
    i = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2).to(tl.int64)
    b = tl.load(ids_ptr + i).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < CHUNK
    in_cache = cache_ptr + (p * num_blocks + b) * CHUNK + offs
    in_staged = staged_ptr + (i * planes + p) * CHUNK + offs
    if GATHER:
        x = tl.load(in_cache, mask=mask, other=0)
        tl.store(in_staged, x, mask=mask)
    else:
        x = tl.load(in_staged, mask=mask, other=0)
        tl.store(in_cache, x, mask=mask)
    if SUMS:  # the block's checksum: its bytes as little-endian int32 words, summed (kv_copy.slot_sums)
        if WIDE:
            part = tl.sum(x.to(tl.int32, bitcast=True).to(tl.int64), axis=0)
        else:  # a word is two elements: the even one its low half (unsigned), the odd one its high half
            h = x.to(tl.int16, bitcast=True).to(tl.int64)
            part = tl.sum(tl.where(offs % 2 == 1, h * 65536, h & 0xFFFF), axis=0)
        tl.atomic_add(sums_ptr + i, part)


def _checked(cache: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, int]:
    if cache.dim() != 6 or not cache.is_contiguous():
        raise KernelInputError(f"the KV cache must be contiguous [L, 2, N, B, H, D], got {list(cache.shape)}")
    if ids.dim() != 1 or ids.dtype != torch.int64 or ids.device != cache.device:
        raise KernelInputError("block ids must be a 1-D int64 tensor on the cache's device")
    planes, num_blocks = cache.shape[0] * cache.shape[1], cache.shape[2]
    return planes, num_blocks, cache[0, 0, 0].numel()


def _check_sums(sums: torch.Tensor | None, n: int, cache: torch.Tensor) -> None:
    if sums is not None and (sums.shape != (n,) or sums.dtype != torch.int64 or not sums.is_contiguous()):
        raise KernelInputError(f"block sums must be a contiguous int64 [{n}] tensor")
    if sums is not None and cache.element_size() not in (2, 4):
        raise KernelInputError(f"block sums need 2- or 4-byte elements, got {cache.dtype}")


def _launch(
    cache: torch.Tensor, staged: torch.Tensor, ids: torch.Tensor, sums: torch.Tensor | None, gather: bool
) -> None:
    planes, num_blocks, chunk = _checked(cache, ids)
    n = ids.numel()
    _check_sums(sums, n, cache)
    if n:
        grid = (n, planes, triton.cdiv(chunk, _BLOCK))
        _kv_blocks_kernel[grid](
            cache,
            staged,
            ids,
            ids if sums is None else sums,
            num_blocks,
            planes,
            CHUNK=chunk,
            BLOCK=_BLOCK,
            GATHER=gather,
            SUMS=sums is not None,
            WIDE=cache.element_size() == 4,
        )


def gather_blocks(
    cache: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None, sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Blocks ``ids`` of every layer, K and V: ``[n, layers, 2, block_size, heads, head_dim]``, into
    ``out`` when given (e.g. a run of a slab's slots in device memory); ``sums`` [n] int64: each
    block's checksum is added to it."""
    want = (ids.numel(), *cache.shape[:2], *cache.shape[3:])
    if out is None:
        out = torch.empty(want, dtype=cache.dtype, device=cache.device)
    elif tuple(out.shape) != want or out.dtype != cache.dtype or not out.is_contiguous():
        raise KernelInputError(f"the gather's output must be contiguous {list(want)} {cache.dtype}")
    _launch(cache, out, ids, sums, gather=True)
    return out


def scatter_blocks(
    cache: torch.Tensor, ids: torch.Tensor, staged: torch.Tensor, sums: torch.Tensor | None = None
) -> None:
    """Write ``staged`` (as gather_blocks gives it) into blocks ``ids`` of the cache; ``sums`` as
    for gather_blocks."""
    want = (ids.numel(), *cache.shape[:2], *cache.shape[3:])
    if tuple(staged.shape) != want or staged.dtype != cache.dtype or not staged.is_contiguous():
        raise KernelInputError(f"staged blocks must be contiguous {list(want)} {cache.dtype}")
    _launch(cache, staged, ids, sums, gather=False)

"""The block gather / scatter kernel against PyTorch indexing (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from trellis.runtime.kernels import KernelInputError, gather_blocks, scatter_blocks


def test_gather_and_scatter_match_indexing() -> None:
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(3, 2, 7, 4, 2, 8, generator=g)  # 4 * 2 * 8 = 64-element chunks
    ids = torch.tensor([5, 0, 3], dtype=torch.int64)
    staged = gather_blocks(cache, ids)
    assert torch.equal(staged, cache.permute(2, 0, 1, 3, 4, 5)[ids])
    other = torch.zeros_like(cache)
    scatter_blocks(other, torch.tensor([1, 2, 6], dtype=torch.int64), staged)
    assert torch.equal(other[:, :, 1], cache[:, :, 5]) and torch.equal(other[:, :, 6], cache[:, :, 3])
    assert not other[:, :, 0].any()


def test_bad_inputs() -> None:
    cache = torch.zeros(2, 2, 4, 4, 1, 8)
    with pytest.raises(KernelInputError, match="int64"):
        gather_blocks(cache, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(KernelInputError, match="staged blocks"):
        scatter_blocks(cache, torch.tensor([0], dtype=torch.int64), torch.zeros(2, 2, 2, 4, 1, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sums_are_the_slot_sums_and_out_is_written(dtype: torch.dtype) -> None:
    from trellis.runtime.kv_copy import slot_sums

    g = torch.Generator().manual_seed(1)
    cache = torch.randn(2, 2, 6, 4, 2, 8, generator=g).to(dtype)
    ids = torch.tensor([4, 1], dtype=torch.int64)
    out = torch.empty(2, 2, 2, 4, 2, 8, dtype=dtype)
    sums = torch.zeros(2, dtype=torch.int64)
    assert gather_blocks(cache, ids, out=out, sums=sums) is out
    assert torch.equal(sums, slot_sums(out))  # the kernel's checksums are the CPU path's
    back, again = torch.zeros_like(cache), torch.zeros(2, dtype=torch.int64)
    scatter_blocks(back, ids, out, sums=again)
    assert torch.equal(again, sums) and torch.equal(back[:, :, 4], cache[:, :, 4])

"""The cache <-> store slab copies: one gather / scatter, each (stage, rank) its own layers x heads,
so a block written by one TP x PP split reads back exactly under another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trellis.core.kv_store_api import SlotLayout
from trellis.core.plan import KVCopy
from trellis.runtime.kv_copy import RankSlice, SlabError, SlabView, load_blocks, save_blocks, slot_runs

LAYERS, HEADS, DIM, BLOCK = 4, 4, 8, 16
LAYOUT = SlotLayout(LAYERS, HEADS, DIM, BLOCK, "float32")
CPU = torch.device("cpu")


def make_slab(tmp_path: Path, num_slots: int = 8) -> SlabView:
    path = tmp_path / "slab"
    path.write_bytes(bytes(num_slots * LAYOUT.slot_bytes))
    return SlabView(str(path), LAYOUT, CPU)


def cache(layers: int, heads: int, num_blocks: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, num_blocks, BLOCK, heads, DIM, generator=g)


def test_slot_runs() -> None:
    assert slot_runs([3, 4, 5, 9, 2, 3]) == [(0, 3, 3), (3, 9, 1), (4, 2, 2)]
    assert slot_runs([]) == []


def test_whole_block_round_trip(tmp_path: Path) -> None:
    slab = make_slab(tmp_path)
    part = RankSlice((0, LAYERS), (0, HEADS), LAYOUT)
    src = cache(LAYERS, HEADS)
    moved = save_blocks(src, slab, part, [KVCopy((1, 4), (5, 2))], num_blocks=6)
    assert moved == 2 * LAYOUT.slot_bytes
    dst = torch.zeros_like(src)
    load_blocks(dst, slab, part, [KVCopy((0, 3), (5, 2))], num_blocks=6)
    assert torch.equal(dst[:, :, 0], src[:, :, 1]) and torch.equal(dst[:, :, 3], src[:, :, 4])
    assert not dst[:, :, 1].any()  # nothing else written


@pytest.mark.parametrize(("writer", "reader"), [((2, 2), (1, 1)), ((1, 1), (2, 2)), ((1, 2), (4, 1))])
def test_one_split_writes_another_reads(
    tmp_path: Path, writer: tuple[int, int], reader: tuple[int, int]
) -> None:
    """(tp, pp) splits: rank r of stage s holds layers of stage s and heads of rank r."""
    slab = make_slab(tmp_path)
    full = cache(LAYERS, HEADS, seed=7)

    def parts(tp: int, pp: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        per_l, per_h = LAYERS // pp, HEADS // tp
        return [
            ((s * per_l, (s + 1) * per_l), (r * per_h, (r + 1) * per_h)) for s in range(pp) for r in range(tp)
        ]

    for (l0, l1), (h0, h1) in parts(*writer):
        mine = full[l0:l1, :, :, :, h0:h1].contiguous()
        save_blocks(mine, slab, RankSlice((l0, l1), (h0, h1), LAYOUT), [KVCopy((2, 3), (0, 1))], 6)
    for (l0, l1), (h0, h1) in parts(*reader):
        got = torch.zeros(l1 - l0, 2, 6, BLOCK, h1 - h0, DIM)
        load_blocks(got, slab, RankSlice((l0, l1), (h0, h1), LAYOUT), [KVCopy((4, 5), (0, 1))], 6)
        assert torch.equal(got[:, :, 4], full[l0:l1, :, 2, :, h0:h1])
        assert torch.equal(got[:, :, 5], full[l0:l1, :, 3, :, h0:h1])


def test_bad_ids_are_refused(tmp_path: Path) -> None:
    slab = make_slab(tmp_path, num_slots=2)
    part = RankSlice((0, LAYERS), (0, HEADS), LAYOUT)
    with pytest.raises(SlabError, match="store slot outside"):
        save_blocks(cache(LAYERS, HEADS), slab, part, [KVCopy((0,), (2,))], 6)
    with pytest.raises(SlabError, match="cache block outside"):
        load_blocks(cache(LAYERS, HEADS), slab, part, [KVCopy((6,), (0,))], 6)


def test_missing_slab_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SlabError, match="cannot open the KV store's slab"):
        SlabView(str(tmp_path / "gone"), LAYOUT, CPU)


def test_only_a_tmpfs_slab_is_pinned() -> None:
    from trellis.runtime.kv_copy import on_tmpfs

    assert not on_tmpfs("/proc/self/status")  # procfs
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    tmpfs = [f.split()[1] for f in mounts if len(f.split()) > 2 and f.split()[2] == "tmpfs"]
    if tmpfs:  # a file inside any tmpfs mount point
        assert on_tmpfs(tmpfs[0].rstrip("/") + "/trellis-kv-probe")

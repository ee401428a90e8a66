"""The KV store's GPU path: the block gather/scatter kernel, copies through a pinned shared-memory
slab, and an engine on CUDA whose prompt's KV comes back from a real kv_store service (token-exact
against transformers). Run on a GPU machine: pytest -m gpu tests/gpu."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint, reference_generate
from tests.kv_store_fixtures import start_store, store_spec, wait_store_up
from trellis.core.engine_config import EngineConfig
from trellis.core.kv_store_api import SlotLayout
from trellis.core.plan import KVCopy
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.runtime.kernels import gather_blocks, scatter_blocks
from trellis.runtime.kv_copy import RankSlice, SlabView, load_blocks, save_blocks
from trellis.runtime.kv_setup import StoreUse

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_kernel_matches_indexing_on_cuda() -> None:
    cache = torch.randn(4, 2, 50, 16, 8, 128, dtype=torch.bfloat16, device=CUDA)
    ids = torch.tensor([7, 3, 49, 0], dtype=torch.int64, device=CUDA)
    staged = gather_blocks(cache, ids)
    assert torch.equal(staged, cache.permute(2, 0, 1, 3, 4, 5)[ids])
    other = torch.zeros_like(cache)
    scatter_blocks(other, ids, staged)
    assert torch.equal(other[:, :, ids], cache[:, :, ids])


@pytest.mark.parametrize("where", ["/dev/shm", None])  # a tmpfs (pinned), and a disk file (not pinnable)
def test_slab_round_trip(tmp_path: Path, where: str | None) -> None:
    layout = SlotLayout(4, 8, 128, 16, "bfloat16")
    folder = Path(tempfile.mkdtemp(dir=where)) if where else tmp_path
    path = folder / "slab"
    path.write_bytes(bytes(6 * layout.slot_bytes))
    slab = SlabView(str(path), layout, CUDA)
    assert slab.pinned == (where is not None)  # only a tmpfs slab is registered
    try:
        part = RankSlice((0, 4), (0, 8), layout)
        cache = torch.randn(4, 2, 10, 16, 8, 128, dtype=torch.bfloat16, device=CUDA)
        save_blocks(cache, slab, part, [KVCopy((1, 2, 9), (4, 5, 0))], 10)
        torch.cuda.synchronize()
        back = torch.zeros_like(cache)
        load_blocks(back, slab, part, [KVCopy((0, 3, 4), (4, 5, 0))], 10)
        torch.cuda.synchronize()
        assert torch.equal(back[:, :, 0], cache[:, :, 1]) and torch.equal(back[:, :, 4], cache[:, :, 9])
        half = RankSlice((2, 4), (4, 8), layout)  # another split's rank reads its own part
        mine = torch.zeros(2, 2, 10, 16, 4, 128, dtype=torch.bfloat16, device=CUDA)
        load_blocks(mine, slab, half, [KVCopy((6,), (5,))], 10)
        torch.cuda.synchronize()
        assert torch.equal(mine[:, :, 6], cache[2:4, :, 2, :, 4:8])
    finally:
        slab.close()
        path.unlink()


def test_engine_on_cuda_reads_the_store_exactly(tmp_path: Path) -> None:
    ckpt = make_checkpoint("llama-gqa", tmp_path / "ckpt", seed=5)
    spec, address = store_spec(ckpt, tmp_path, shm_dir=tempfile.mkdtemp(dir="/dev/shm"))  # pinned
    proc = start_store(spec)
    try:
        wait_store_up(address, proc)
        prompt = list(range(3, 120))
        greedy = SamplingParams(max_tokens=12, ignore_eos=True)
        args = EngineArgs(
            model=str(ckpt),
            device="cuda",
            dtype="float32",
            engine=EngineConfig(num_blocks=256),
            kv_store=StoreUse(address, write_through=True),
        )
        with Engine(args) as e:
            (first,) = e.generate([prompt], greedy)
            time.sleep(1.0)  # the puts commit after a copy-only plan
            e.reset_prefix_cache()
            (again,) = e.generate([prompt], greedy)
            assert e.stats()["store_loaded_blocks"] == (len(prompt) - 1) // 16
        want = reference_generate(ckpt, [prompt], 12)[0]
        assert first.token_ids == want and again.token_ids == want
    finally:
        proc.terminate()
        proc.wait(timeout=30)

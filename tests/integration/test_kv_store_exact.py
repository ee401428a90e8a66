"""KV from the store is exact: a replica of one TP x PP split writes a prompt's blocks to a real
kv_store service; a replica of ANOTHER split, with none of them cached, loads them (each rank its
own layers x heads) and must give transformers' greedy tokens and first-step logits.

A chain of engines, one store: (1,1) writes A; (2,1) reads A and writes B; (1,2) reads B and writes
C; (1,1) reads C. Each reader must have loaded blocks from the store (not recomputed them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint, reference_generate, reference_logits
from tests.integration.engine_cases import LOGITS_RTOL, make_prompts, relative_error, small_cpu_env
from tests.kv_store_fixtures import start_store, store_spec, wait_store_up
from trellis.core.engine_config import EngineConfig
from trellis.core.kv_names import fingerprint_of
from trellis.core.model_config import load_model_config
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.runtime.kv_setup import StoreUse
from trellis.wire.kv_store_client import KVStoreClient

NEW_TOKENS = 8
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
PREFIX, SUFFIX = 96, 21  # six 16-token blocks shared, then a tail of the reader's own
BLOCKS = PREFIX // 16
CHAIN = (((1, 1), (2, 1)), ((2, 1), (1, 2)), ((1, 2), (1, 1)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("kvx") / "ckpt", seed=11)


@pytest.fixture(scope="module")
def store(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    spec, address = store_spec(checkpoint, tmp_path_factory.mktemp("kvstore"), capacity_bytes=64 << 20)
    proc = start_store(spec)
    try:
        wait_store_up(address, proc)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _wait_stored(address: str, hashes: list[int]) -> int:
    client = KVStoreClient(address, 1.0)
    try:
        end = time.monotonic() + 30
        while (run := (await client.lookup(hashes)).total) < len(hashes) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        return run
    finally:
        await client.close()


def engine(checkpoint: Path, split: tuple[int, int], address: str) -> Engine:
    tp, pp = split
    return Engine(
        EngineArgs(
            model=str(checkpoint),
            tp=tp,
            pp=pp,
            return_logits=True,
            engine=EngineConfig(num_blocks=64),
            kv_store=StoreUse(address, write_through=True),
        )
    )


def test_blocks_written_by_one_split_serve_another(checkpoint: Path, store: str) -> None:
    cfg = load_model_config(checkpoint)
    fp = fingerprint_of(cfg, checkpoint.name, "float32", 16)
    bases = make_prompts(cfg.vocab_size, (PREFIX + SUFFIX,) * 4, seed=2)
    tails = make_prompts(cfg.vocab_size, (SUFFIX,) * 3, seed=3)
    written = bases[0]
    with small_cpu_env():
        with engine(checkpoint, CHAIN[0][0], store) as e:
            e.generate([written], GREEDY)
            assert asyncio.run(_wait_stored(store, fp.block_hashes(written)[:BLOCKS])) == BLOCKS
        for i, (writer, reader) in enumerate(CHAIN):
            prompt = written[:PREFIX] + tails[i]
            with engine(checkpoint, reader, store) as e:
                (got,) = e.generate([prompt], GREEDY)
                stats = e.stats()
                assert stats["store_loaded_blocks"] == BLOCKS, (writer, reader, stats)
                assert stats["store_voided_loads"] == 0
                if i + 1 < len(CHAIN):  # the next reader's prefix, written by this split
                    written = bases[i + 1]
                    e.generate([written], GREEDY)
                    assert asyncio.run(_wait_stored(store, fp.block_hashes(written)[:BLOCKS])) == BLOCKS
            want = reference_generate(checkpoint, [prompt], NEW_TOKENS)[0]
            assert got.token_ids == want, (writer, reader)
            err = relative_error(got.first_logits, reference_logits(checkpoint, prompt))
            assert err < LOGITS_RTOL, (writer, reader, err)

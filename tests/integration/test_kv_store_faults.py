"""The store is a soft dependency: kill -9 it under load and every request still finishes with the
same tokens (recomputed); restart it and it serves its disk tier again, rebuilt from the files."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.checkpoints import make_checkpoint
from tests.integration.engine_cases import make_prompts, small_cpu_env
from tests.kv_store_fixtures import start_store, store_spec, wait_store_up
from trellis.core.engine_config import EngineConfig
from trellis.core.kv_names import fingerprint_of
from trellis.core.model_config import load_model_config
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.runtime.kv_setup import StoreUse
from trellis.wire.kv_store_client import KVStoreClient

GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PREFIX = 64  # four blocks every prompt shares with one other


async def lookup(address: str, hashes: list[int], *, want: int, timeout_s: float = 30) -> int:
    """The store's run of ``hashes`` once it reaches ``want`` (or the timeout), waiting for it to come up."""
    client = KVStoreClient(address, 1.0)
    end = time.monotonic() + timeout_s
    run = 0
    try:
        while time.monotonic() < end:
            try:
                run = (await client.lookup(hashes)).total
                if run >= want:
                    break
            except Exception:  # the store is (re)starting
                pass
            await asyncio.sleep(0.1)
        return run
    finally:
        await client.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("kvf") / "ckpt", seed=4)


def test_kill_store_under_load_then_restart(checkpoint: Path, tmp_path: Path) -> None:
    cfg = load_model_config(checkpoint)
    fp = fingerprint_of(cfg, checkpoint.name, "float32", 16)
    spec, address = store_spec(
        checkpoint,
        tmp_path,
        disk_path=str(tmp_path / "disk"),
        disk_capacity_bytes=64 << 20,
    )
    heads = make_prompts(cfg.vocab_size, (PREFIX,) * 8, seed=1)
    tails = make_prompts(cfg.vocab_size, (9,) * 16, seed=2)
    prompts = [heads[i // 2] + tails[i] for i in range(16)]
    store = start_store(spec)
    wait_store_up(address, store)
    try:
        with (
            small_cpu_env(),
            Engine(
                EngineArgs(
                    model=str(checkpoint),
                    engine=EngineConfig(num_blocks=128),
                    kv_store=StoreUse(address, write_through=True, rpc_timeout_s=0.5),
                )
            ) as e,
        ):
            want = [c.token_ids for c in e.generate(prompts, GREEDY)]
            first = fp.block_hashes(prompts[0])[: PREFIX // 16]
            assert asyncio.run(lookup(address, first, want=len(first))) == len(first)
            e.reset_prefix_cache()

            killer = threading.Timer(0.05, lambda: os.kill(store.pid, signal.SIGKILL))
            killer.start()
            got = [c.token_ids for c in e.generate(prompts, GREEDY)]  # the store dies in the middle
            killer.join()
            store.wait(timeout=10)
            assert got == want  # every request finished, none wrong
            e.reset_prefix_cache()
            assert [c.token_ids for c in e.generate(prompts, GREEDY)] == want  # with the store gone
            assert e.stats()["kv_agent_errors"] > 0

            store = start_store(spec)  # rebuilds its index from the disk tier
            assert asyncio.run(lookup(address, first, want=len(first))) == len(first)
            time.sleep(1.5)  # the agent's back-off, then it reads the new instance's Info
            e.reset_prefix_cache()
            loaded = e.stats()["store_loaded_blocks"]
            assert [c.token_ids for c in e.generate(prompts, GREEDY)] == want
            assert e.stats()["store_loaded_blocks"] > loaded  # served from the restarted store
            assert e.stats()["store_voided_loads"] == 0
    finally:
        store.kill()
        store.wait(timeout=10)

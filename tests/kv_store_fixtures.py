"""A real kv_store service for the tests: its spec file, its process, and waiting until it serves."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from trellis.core.model_config import load_model_config
from trellis.core.net import free_ports
from trellis.wire.kv_store_client import KVStoreClient


def store_spec(checkpoint: Path, folder: Path, **kv_store: Any) -> tuple[Path, str]:
    """A spec for a store of ``checkpoint`` (float32, its slab under ``folder`` unless ``shm_dir`` is
    given); returns the spec's path and the store's address."""
    port, stage_port = free_ports(2)
    layers = [0, load_model_config(checkpoint).num_hidden_layers]
    spec = {
        "model": {"path": str(checkpoint), "dtype": "float32"},
        "replicas": [{"name": "unused", "stages": [{"layers": layers, "port": stage_port}]}],
        "kv_store": {"port": port, "capacity_bytes": 32 << 20, "shm_dir": str(folder), **kv_store},
    }
    path = folder / "kv-store-spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, f"127.0.0.1:{port}"


def start_store(spec: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "services.kv_store", "--spec", str(spec)])


def wait_store_up(address: str, proc: subprocess.Popen | None = None, timeout_s: float = 60.0) -> None:
    """Until the store answers Info; fails if ``proc`` exits first or the timeout passes."""
    asyncio.run(_wait_up(address, proc, timeout_s))


async def _wait_up(address: str, proc: subprocess.Popen | None, timeout_s: float) -> None:
    client = KVStoreClient(address, 1.0)
    end = time.monotonic() + timeout_s
    try:
        while True:
            assert proc is None or proc.poll() is None, "the kv_store service exited while starting"
            try:
                await client.info()
                return
            except Exception:  # not listening yet
                if time.monotonic() > end:
                    raise AssertionError(f"no kv_store in {timeout_s:.0f} s") from None
                await asyncio.sleep(0.1)
    finally:
        await client.close()

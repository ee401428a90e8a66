"""The KV store service for real: a subprocess, its gRPC API through KVStoreClient, its slab mapped.

Put -> commit -> lookup -> acquire, the bytes read back through a memmap of the slab; kill -9 and
restart: the disk tier is rebuilt and serves the same bytes; bad hash bytes are INVALID_ARGUMENT;
SIGTERM stops it cleanly and unlinks the slab; a spec without kv_store is one line and exit 2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core.net import free_ports
from trellis.v1 import kv_store_pb2, kv_store_pb2_grpc
from trellis.wire.kv_store_client import KVStoreClient

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
RPC_S = 5.0
SLOT_BYTES = 32 * 2 * 16 * 8 * 128 * 2  # llama-3-8b, bfloat16, block 16: 2 MiB


def spec_dict(tmp: Path, port: int, *, kv: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"preset": "llama-3-8b", "load_format": "dummy", "dtype": "bfloat16"},
        "replicas": [{"name": "r0", "stages": [{"layers": [0, 32]}]}],
        "engine": {"block_size": 16},
    }
    if kv:
        spec["kv_store"] = {
            "name": "kvt",
            "port": port,
            "capacity_bytes": 4 * SLOT_BYTES,
            "shm_dir": str(tmp / "shm"),
            "disk_path": str(tmp / "disk"),
            "disk_capacity_bytes": 8 * SLOT_BYTES,
        }
    return spec


def start(spec_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.kv_store", "--spec", str(spec_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_serving(address: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                f"the store exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"the store at {address} never became SERVING")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30.0))


@pytest.fixture
def store_spec(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    (tmp_path / "shm").mkdir()
    (port,) = free_ports(1)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, port)))
    yield path, f"127.0.0.1:{port}"


def slab(info: Any) -> np.memmap:
    return np.memmap(info.slab_path, dtype=np.uint8, mode="r+", shape=(info.num_slots, SLOT_BYTES))


def test_put_read_back_kill_restart_and_bad_bytes(store_spec: tuple[Path, str], tmp_path: Path) -> None:
    spec_path, address = store_spec
    hashes = [0x1111, 0x2222, 0x3333]
    payloads = [np.random.default_rng(i).integers(0, 256, SLOT_BYTES, dtype=np.uint8) for i in range(3)]
    proc = start(spec_path)
    try:
        wait_serving(address, proc)

        async def first_life() -> tuple[Any, Any]:
            c = KVStoreClient(address, RPC_S)
            try:
                info = await c.info()
                assert (info.num_slots, info.layout.slot_bytes, info.name) == (4, SLOT_BYTES, "kvt")
                t = await c.begin_put(hashes, [0, *hashes[:-1]], 10.0)
                assert all(s >= 0 for s in t.slots)
                mm = slab(info)
                for slot, data in zip(t.slots, payloads, strict=True):
                    mm[slot] = data
                mm.flush()
                del mm
                assert await c.commit_put(t.put_id, hashes) == 3
                assert (await c.begin_put(hashes[:1], [0], 10.0)).slots == (-1,)  # never written twice
                run_ = await c.lookup([*hashes, 0x4444])
                assert (run_.host, run_.total) == (3, 3)
                lease = await c.acquire(hashes, 5.0)
                mm = slab(info)
                assert all((mm[s] == p).all() for s, p in zip(lease.slots, payloads, strict=True))
                del mm
                assert await c.release(lease.lease_id)
                deadline = time.monotonic() + 10
                while (await c.stats()).disk_blocks < 3:
                    assert time.monotonic() < deadline, "the disk tier never got the blocks"
                    await asyncio.sleep(0.05)
                return info, lease
            finally:
                await c.close()

        info, old_lease = run(first_life())
    finally:
        proc.kill()
        proc.wait(10)
    assert Path(info.slab_path).exists()  # kill -9: nobody unlinked it

    proc = start(spec_path)
    try:
        wait_serving(address, proc)
        assert not Path(info.slab_path).exists()  # the dead instance's slab was removed at start

        async def second_life() -> Any:
            c = KVStoreClient(address, RPC_S)
            try:
                info2 = await c.info()
                assert info2.instance_id != info.instance_id
                run_ = await c.lookup(hashes)
                assert (run_.host, run_.total) == (0, 3)
                assert not await c.release(old_lease.lease_id)  # another instance's lease
                lease = await c.acquire(hashes, 5.0)
                assert lease.num_blocks == 3
                mm = slab(info2)
                assert all((mm[s] == p).all() for s, p in zip(lease.slots, payloads, strict=True))
                del mm
                return info2
            finally:
                await c.close()

        info2 = run(second_life())
        with grpc.insecure_channel(address) as ch:
            stub = kv_store_pb2_grpc.KVStoreStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Lookup(kv_store_pb2.KVLookupRequest(hashes=b"1234567"), timeout=RPC_S)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "7 bytes is not a whole number of 8-byte" in (e.value.details() or "")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not Path(info2.slab_path).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_spec_without_kv_store_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict(tmp_path, 0, kv=False)))
    out = subprocess.run(
        [sys.executable, "-m", "services.kv_store", "--spec", str(path)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        env={**os.environ},
    )
    assert out.returncode == 2
    assert out.stderr.decode().strip() == "kv_store: error: the spec has no kv_store section"

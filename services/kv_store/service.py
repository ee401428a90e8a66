"""The KV store service's life cycle: build the store, serve it, sweep it, stop it cleanly.

`serve(spec, cfg)` builds the KVStore from spec.kv_store and the model's fingerprint (the same
`fingerprint_of` as the router and the workers), serves trellis.v1.KVStore (+ health) on
kv_store.host:port, /metrics on kv_store.metrics_port when nonzero, sweeps expired leases and
puts periodically (each call also sweeps lazily), and on SIGTERM / SIGINT stops the server,
writes what is queued for disk and unlinks the slab. With a redis registry the store's block
events are published to the block index under ``kv_store:{name}@{instance_id}:{tier}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from prometheus_client import CollectorRegistry

from services.kv_store.servicer import KVStoreServicer
from trellis.core import log
from trellis.core.kv_names import fingerprint_of
from trellis.core.model_config import ModelConfig
from trellis.core.spec import DeploySpec, KVStoreSpec
from trellis.kv_store import KVStore
from trellis.metrics.http_server import MetricsServer, start_metrics_server
from trellis.metrics.kv_store_collector import KVStoreCollector
from trellis.registry import Registry, open_registry
from trellis.registry.block_publisher import BlockPublisher
from trellis.registry.locations import store_location
from trellis.v1 import kv_store_pb2_grpc
from trellis.wire.server import build_server

STOP_GRACE_S = 2.0
MAX_SWEEP_PERIOD_S = 1.0


def sweep_period(kv: KVStoreSpec) -> float:
    """Often enough that an expired put or lease is reclaimed well within its own timeout."""
    return min(MAX_SWEEP_PERIOD_S, kv.put_timeout_s / 4, kv.lease_ttl_s / 4)


async def _sweep_forever(store: KVStore, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        try:
            store.sweep()
        except Exception:  # a sweep bug must not end the service; the lazy sweeps still run
            log.get().exception("kv store: periodic sweep failed")


class Publishers:
    """The store's two index locations (host, disk), fed from any thread via the loop."""

    def __init__(self, registry: Registry, store: KVStore, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = registry
        self._loop = loop
        name, iid = store.spec.name, store.instance_id
        self.tiers = {t: BlockPublisher(registry, store_location(name, iid, t)) for t in ("host", "disk")}
        for p in self.tiers.values():
            p.start()
        self.tiers["disk"].added(store.blocks("disk"))  # what the disk tier rebuilt at start

    def on_blocks(self, tier: str, added: list[int], removed: list[int]) -> None:
        self._loop.call_soon_threadsafe(self._apply, tier, added, removed)

    def _apply(self, tier: str, added: list[int], removed: list[int]) -> None:
        pub = self.tiers[tier]
        if removed:
            pub.removed(removed)
        if added:
            pub.added(added)

    async def close(self) -> None:
        for p in self.tiers.values():
            await p.close()
        await self.registry.close()


async def start_metrics(store: KVStore, spec: DeploySpec) -> MetricsServer | None:
    kv = store.spec
    registry = CollectorRegistry()
    registry.register(KVStoreCollector(store.stats, model_name=spec.model.name, store=kv.name))
    return await start_metrics_server(kv.host, kv.metrics_port, registry, where="kv_store.metrics_port")


def build_store(spec: DeploySpec, cfg: ModelConfig) -> KVStore:
    """The store of spec.kv_store for the spec's model (ConfigError: capacity, shm_dir, disk)."""
    assert spec.kv_store is not None
    fp = fingerprint_of(cfg, spec.model.name, spec.model.dtype, spec.engine.block_size)
    return KVStore(spec.kv_store, fp)


async def serve(spec: DeploySpec, cfg: ModelConfig) -> int:
    kv = spec.kv_store
    assert kv is not None
    logger = log.get()
    store = build_store(spec, cfg)
    publishers: Publishers | None = None
    metrics: MetricsServer | None = None
    sweeper: asyncio.Task[None] | None = None
    try:
        server = build_server(
            kv.host,
            kv.port,
            lambda s: kv_store_pb2_grpc.add_KVStoreServicer_to_server(KVStoreServicer(store), s),
            field="kv_store.port",
        )
        metrics = await start_metrics(store, spec)
        if spec.registry.startswith("redis://"):
            publishers = Publishers(open_registry(spec.registry, spec), store, asyncio.get_running_loop())
            store.on_blocks = publishers.on_blocks
        await server.start()
        sweeper = asyncio.create_task(_sweep_forever(store, sweep_period(kv)), name="kv-store-sweep")
        await server.set_serving(True)
        logger.info(
            "kv store serving",
            address=f"{kv.host}:{server.port}",
            instance_id=store.instance_id,
            slots=store.slots.num_slots,
            slot_bytes=store.layout.slot_bytes,
            slab=str(store.slab.path),
            disk_path=kv.disk_path,
            disk_blocks_rebuilt=store.rebuilt,
            index="off" if publishers is None else "redis",
        )
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("kv store stopping")
        await server.stop(grace=STOP_GRACE_S)
        return 0
    finally:
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        store.on_blocks = None
        if publishers is not None:
            await publishers.close()
        if metrics is not None:
            await metrics.close()
        await asyncio.to_thread(store.close)  # the disk writes still queued, then the slab's unlink
        logger.info("kv store stopped", slab=str(store.slab.path))

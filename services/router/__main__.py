"""The router service: the public API of a mesh.

python -m services.router --spec SPEC [--registry redis://HOST:PORT/DB] [--port PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from tokenizers import Tokenizer

from services.router.servicer import RouterServicer
from trellis.core import log
from trellis.core.errors import ConfigError
from trellis.core.kv_names import fingerprint_of
from trellis.core.model_config import ModelConfig, load_model_source
from trellis.core.request import RequestLimits
from trellis.core.spec import DeploySpec, SpecError, load
from trellis.core.telemetry import setup_tracing
from trellis.core.tokenizer import TokenizerMissing, load_tokenizer
from trellis.metrics.http_server import start_metrics_server
from trellis.metrics.router_metrics import RouterMetrics
from trellis.registry import RedisRegistry, Registry, open_registry
from trellis.routing.kv_aware import BlockLocator, KVAwarePolicy
from trellis.routing.kv_locators import HeadQueryLocator
from trellis.routing.pd_policy import PDPolicy
from trellis.routing.policy import least_load
from trellis.routing.replicas import ReplicaSet
from trellis.routing.router import Router
from trellis.routing.transfers import Transfers
from trellis.v1 import router_pb2_grpc
from trellis.wire.server import build_server
from trellis.wire.stage_client import GrpcStageClient

STOP_GRACE_S = 5.0  # in-flight streams get this long to finish when the router stops
LOCATOR_DEADLINE_S = 0.03  # kv-aware: how long a decision waits for the heads and the store


def _model(spec: DeploySpec) -> tuple[ModelConfig, Tokenizer | None, str]:
    """The model's config, its tokenizer (None for a preset or a checkpoint without one), the name
    clients know it by (spec.model.name: served_model_name, else the directory's name)."""
    cfg = load_model_source(spec.model.path, spec.model.preset)
    if spec.model.preset is not None:
        return cfg, None, spec.model.name
    try:
        tok = load_tokenizer(spec.model.tokenizer or spec.model.path)
    except TokenizerMissing:
        tok = None
    return cfg, tok, spec.model.name


def _policy(
    spec: DeploySpec,
    cfg: ModelConfig,
    registry: Registry,
    replicas: ReplicaSet,
    metrics: RouterMetrics,
    closers: list[Callable[[], Awaitable[None]]],
) -> PDPolicy:
    """spec.router.policy as a policy, wrapped for P/D (replicas of role prefill / decode: it pairs
    them; with none, the policy decides alone). kv-aware asks the block index: the Redis registry
    itself, or (embedded registry: nothing shared between processes) the heads and the store."""
    max_local = spec.router.max_local_prefill_tokens
    if spec.router.policy != "kv-aware":
        return PDPolicy(least_load, max_local_prefill_tokens=max_local)
    fingerprint = fingerprint_of(cfg, spec.model.name, spec.model.dtype, spec.engine.block_size)
    locator: BlockLocator
    if isinstance(registry, RedisRegistry):
        locator = registry
    else:
        store = None
        if spec.kv_store is not None:  # the store's client only where there is a store
            from trellis.wire.kv_store_client import KVStoreClient

            kv = spec.kv_store
            store = KVStoreClient(f"{kv.host}:{kv.port}", timeout_s=LOCATOR_DEADLINE_S)
            closers.append(store.close)
        locator = HeadQueryLocator(
            replicas,
            store,
            store_name=spec.kv_store.name if spec.kv_store else "kv0",
            deadline_s=LOCATOR_DEADLINE_S,
        )
    log.get().info("router policy kv-aware", fingerprint=fingerprint.key, canary=fingerprint.canary())
    kv = KVAwarePolicy(
        locator,
        fingerprint,
        speculative_ttl_s=spec.router.speculative_ttl_s,
        locator_timeout_s=LOCATOR_DEADLINE_S + 0.02,
        metrics=metrics,
    )
    return PDPolicy(kv, max_local_prefill_tokens=max_local)


async def serve(spec: DeploySpec, registry_url: str, host: str, port: int) -> int:
    logger = log.get()
    cfg, tok, name = _model(spec)
    metrics = RouterMetrics(spec.model.name)  # on a registry of its own, served on router.metrics_port
    metrics_server = await start_metrics_server(
        host, spec.router.metrics_port, metrics.registry, where="router.metrics_port"
    )
    limits = RequestLimits(
        vocab_size=cfg.vocab_size, max_model_len=spec.model.max_model_len or cfg.max_position_embeddings
    )
    registry = open_registry(registry_url, spec)
    replicas = ReplicaSet(registry, GrpcStageClient)
    await replicas.start()
    closers: list[Callable[[], Awaitable[None]]] = []
    policy = _policy(spec, cfg, registry, replicas, metrics, closers)
    transfers = Transfers(  # P/D: the transfer records in the registry (a soft dependency)
        registry,
        timeout_s=spec.router.handoff_timeout_s,
        opened_by=f"router@{socket.gethostname()}:{os.getpid()}",
        sink=metrics,
    )
    router = Router(
        replicas,
        limits,
        tok,
        model_name=name,
        max_queue=spec.router.max_queue,
        policy=policy,
        metrics=metrics,
        transfers=transfers,
    )
    server = build_server(
        host,
        port,
        lambda s: router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(router), s),
        field="router.port",
    )
    await server.start()
    http = None
    if spec.router.http_port:  # FastAPI is imported only where the HTTP API is on
        from services.router.http_api import start_http_api

        http = await start_http_api(spec, router, host, STOP_GRACE_S)  # before SERVING: ready means both
    await server.set_serving(True)
    logger.info("router serving", address=f"{host}:{server.port}", registry=registry_url.split("@")[-1])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("router stopping")
    await asyncio.gather(server.stop(grace=STOP_GRACE_S), http.stop() if http else asyncio.sleep(0))
    await transfers.drain(STOP_GRACE_S)  # the aborts and record closes of the last streams
    await replicas.close()
    for close in closers:
        await close()
    await registry.close()
    if metrics_server is not None:
        await metrics_server.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m services.router")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--registry", help="override the spec's registry (embedded or redis://HOST:PORT/DB)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    try:
        spec = load(args.spec)
        spec.check_model()  # a spec its replicas cannot run is refused here, not served
    except SpecError as e:
        print(f"router: error: {e}", file=sys.stderr)
        return 2
    log.configure("router")
    try:
        setup_tracing("trellis-router")
    except ConfigError as e:  # TRELLIS_TRACE names no exporter, or the OTLP one is not installed
        print(f"router: error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(
            serve(
                spec,
                args.registry or spec.registry,
                args.host or spec.router.host,
                spec.router.port if args.port is None else args.port,
            )
        )
    except ConfigError as e:  # a model that cannot be served, a port that cannot be bound
        print(f"router: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

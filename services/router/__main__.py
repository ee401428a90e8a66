"""The router service: the public API of a mesh.

python -m services.router --spec SPEC [--registry redis://HOST:PORT/DB] [--port PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tokenizers import Tokenizer

from services.router.servicer import RouterServicer
from trellis.core import log
from trellis.core.errors import ModelError
from trellis.core.model_config import ModelConfig, load_model_source
from trellis.core.request import RequestLimits
from trellis.core.spec import DeploySpec, SpecError, load
from trellis.core.telemetry import setup_tracing
from trellis.core.tokenizer import TokenizerMissing, load_tokenizer
from trellis.registry import open_registry
from trellis.routing.replicas import ReplicaSet
from trellis.routing.router import Router
from trellis.v1 import router_pb2_grpc
from trellis.wire.server import build_server
from trellis.wire.stage_client import GrpcStageClient

STOP_GRACE_S = 5.0  # in-flight streams get this long to finish when the router stops


def _model(spec: DeploySpec) -> tuple[ModelConfig, Tokenizer | None, str]:
    """The model's config, its tokenizer (None for a preset or a checkpoint without one), its name."""
    cfg = load_model_source(spec.model.path, spec.model.preset)
    if spec.model.preset is not None:
        return cfg, None, spec.model.preset
    try:
        tok = load_tokenizer(spec.model.tokenizer or spec.model.path)
    except TokenizerMissing:
        tok = None
    return cfg, tok, spec.model.path


async def serve(spec: DeploySpec, registry_url: str, host: str, port: int) -> int:
    logger = log.get()
    cfg, tok, name = _model(spec)
    limits = RequestLimits(
        vocab_size=cfg.vocab_size, max_model_len=spec.model.max_model_len or cfg.max_position_embeddings
    )
    registry = open_registry(registry_url, spec)
    replicas = ReplicaSet(registry, GrpcStageClient)
    await replicas.start()
    router = Router(replicas, limits, tok, model_name=name, max_queue=spec.router.max_queue)
    server = build_server(
        host, port, lambda s: router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(router), s)
    )
    await server.start()
    await server.set_serving(True)
    logger.info("router serving", address=f"{host}:{server.port}", registry=registry_url.split("@")[-1])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("router stopping")
    await server.stop(grace=STOP_GRACE_S)
    await replicas.close()
    await registry.close()
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
    setup_tracing("trellis-router")
    try:
        return asyncio.run(
            serve(
                spec,
                args.registry or spec.registry,
                args.host or spec.router.host,
                spec.router.port if args.port is None else args.port,
            )
        )
    except ModelError as e:
        print(f"router: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The stage worker service: one stage (TP group) of one replica.

    python -m services.stage_worker --spec SPEC --replica R --stage S

R is the replica's name or index in the spec. Rank 0 of the stage is this process; it starts
the stage's other TP ranks itself, one process each.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from trellis.core import log
from trellis.core.errors import ConfigError
from trellis.core.processes import exit_now
from trellis.core.spec import DeploySpec, SpecError, load
from trellis.core.telemetry import flush_tracing, setup_tracing
from trellis.transport import ucx

if TYPE_CHECKING:  # imported when needed: a bad spec is refused before torch loads
    from services.stage_worker.service import StageService
    from trellis.metrics.http_server import MetricsServer


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m services.stage_worker")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--replica", required=True, help="replica name or index")
    ap.add_argument("--stage", type=int, required=True)
    args = ap.parse_args()
    try:
        spec = load(args.spec)
        names = [r.name for r in spec.replicas]
        idx = names.index(args.replica) if args.replica in names else int(args.replica)
        if not 0 <= idx < len(names):
            raise ValueError
        if not 0 <= args.stage < len(spec.replicas[idx].stages):
            raise SpecError(
                f"--stage {args.stage}: replica {names[idx]} has {len(spec.replicas[idx].stages)} stages"
            )
        cfg = spec.check_model()  # before any process starts: a bad layout is one line, not a crash later
    except ValueError as e:
        msg = (
            str(e)
            if isinstance(e, SpecError)
            else f"--replica {args.replica}: no such replica ({', '.join(names)})"
        )
        print(f"stage_worker: error: {msg}", file=sys.stderr)
        return 2
    from trellis.runtime.bootstrap import cuda_problem  # torch, now that the spec is known good

    if problem := cuda_problem(spec, only=(idx, args.stage)):
        print(f"stage_worker: error: {problem}", file=sys.stderr)
        return 2
    log.configure("stage_worker", replica=names[idx], stage=args.stage, rank=0)
    try:
        setup_tracing(f"trellis-stage-{names[idx]}-{args.stage}")
    except ConfigError as e:  # TRELLIS_TRACE names no exporter, or the OTLP one is not installed
        print(f"stage_worker: error: {e}", file=sys.stderr)
        return 2
    from services.stage_worker.service import StageService

    try:
        service = StageService(spec, idx, args.stage, cfg)
    except (SpecError, ValueError) as e:
        print(f"stage_worker: error: {e}", file=sys.stderr)
        return 2
    try:
        code = asyncio.run(serve(service, spec, idx, args.stage))
    except ConfigError as e:  # e.g. the metrics port is taken
        print(f"stage_worker: error: {e}", file=sys.stderr)
        code = 2
    except ucx.LinkClosed as e:  # the successor never came up within engine.link_timeout_s
        print(f"stage_worker: error: {e}", file=sys.stderr)
        code = 1
    finally:
        ucx.shutdown()  # its notifier thread is no daemon: the process would never exit
    flush_tracing()  # exit_now skips the exit hooks that would send the spans still batched
    # Everything is closed and logged by now. After a TP peer died, the compute thread may still
    # sit in an NCCL collective until NCCL's own timeout (minutes): it must not hold the exit.
    exit_now(code)


async def serve(service: StageService, spec: DeploySpec, replica: int, stage: int) -> int:
    """The service's life cycle behind its gRPC server (its servicer, health, error statuses)."""
    from services.stage_worker.servicer import StageWorkerServicer
    from trellis.v1 import stage_pb2_grpc
    from trellis.wire.server import build_server

    st = spec.replicas[replica].stages[stage]
    server = build_server(
        st.host,
        st.port,
        lambda s: stage_pb2_grpc.add_StageWorkerServicer_to_server(StageWorkerServicer(service), s),
        field=f"replicas[{replica}].stages[{stage}].port",
    )
    metrics = await start_metrics(service, spec, replica, stage)  # first: a taken port stops us here
    try:
        return await service.run(server)
    finally:
        if metrics is not None:
            await metrics.close()


async def start_metrics(
    service: StageService, spec: DeploySpec, replica: int, stage: int
) -> MetricsServer | None:
    """The leader's /metrics on its stages[].metrics_port (None when 0), read from its stats when
    scraped; ConfigError if the port is taken."""
    from prometheus_client import CollectorRegistry

    from trellis.metrics.http_server import start_metrics_server
    from trellis.metrics.stage_collector import StageCollector

    st = spec.replicas[replica].stages[stage]
    registry = CollectorRegistry()
    registry.register(
        StageCollector(
            service.stats, model_name=spec.model.name, replica=spec.replicas[replica].name, stage=stage
        )
    )
    where = f"replicas[{replica}].stages[{stage}].metrics_port"
    return await start_metrics_server(st.host, st.metrics_port, registry, where=where)


if __name__ == "__main__":
    sys.exit(main())

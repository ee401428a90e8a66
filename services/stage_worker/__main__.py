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
from trellis.core.processes import exit_now
from trellis.core.spec import DeploySpec, SpecError, load
from trellis.core.telemetry import setup_tracing
from trellis.transport import ucx

if TYPE_CHECKING:  # imported when needed: a bad spec is refused before torch loads
    from services.stage_worker.service import StageService


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
    log.configure("stage_worker", replica=names[idx], stage=args.stage, rank=0)
    setup_tracing(f"trellis-stage-{names[idx]}-{args.stage}")
    from services.stage_worker.service import StageService

    try:
        service = StageService(spec, idx, args.stage, cfg)
    except (SpecError, ValueError) as e:
        print(f"stage_worker: error: {e}", file=sys.stderr)
        return 2
    try:
        code = asyncio.run(serve(service, spec, idx, args.stage))
    finally:
        ucx.shutdown()  # its notifier thread is no daemon: the process would never exit
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
    )
    return await service.run(server)


if __name__ == "__main__":
    sys.exit(main())

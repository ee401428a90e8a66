"""A non-head stage leader as a process: load, link into the ring over UCX, serve until stopped.

    python -m trellis.runtime.stage_proc --launch JSON --listen-port P --next HOST:PORT

The offline engine starts one per stage after the first; the mesh's stage worker service runs
the same loop next to its gRPC server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from trellis.core import log
from trellis.core.errors import ModelError
from trellis.runtime.executor import StageExecutor
from trellis.runtime.handoff import HandoffError
from trellis.runtime.launch import StageLaunch
from trellis.runtime.rank import die_with_parent, dump_stacks_if_hung
from trellis.runtime.stage_loop import StageEnd, serve_stage
from trellis.transport import ucx
from trellis.transport.ucx import LinkClosed, Listener, connect

LINK_TIMEOUT_S = 1800.0  # a successor may take long to load a large shard


async def run_stage(launch: StageLaunch, listen_port: int, next_host: str, next_port: int) -> int:
    """Serve until the ring stops; the exit code (0: stopped cleanly)."""
    logger = log.get()
    executor = StageExecutor(launch)
    await executor.start()
    device = executor.ctx.device
    listener = Listener(listen_port, device)
    logger.info("stage loaded", layers=list(launch.layers), ucx_port=listener.port)
    outbound = await connect(next_host, next_port, device, timeout=LINK_TIMEOUT_S)
    inbound = await listener.accept(timeout=LINK_TIMEOUT_S)
    try:
        await executor.peers_linked()
        end = await serve_stage(executor, inbound, outbound)
        logger.info("stage stopped", reason=end.reason)
    except LinkClosed as e:  # a neighbour went away (it failed, or the head gave up): one line
        end = StageEnd(False, f"ring broken: {e}")
        logger.error("ring broken", error=str(e))
    finally:
        await executor.stop()
        await inbound.close()
        await outbound.close()
        listener.close()
    return 0 if end.stopped else 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launch", required=True)
    ap.add_argument("--listen-port", type=int, required=True)
    ap.add_argument("--next", required=True, help="HOST:PORT of the successor (the head for the last stage)")
    ap.add_argument("--die-with-parent", action="store_true")
    args = ap.parse_args()
    if args.die_with_parent:
        die_with_parent()
    launch = StageLaunch.from_json(args.launch)
    dump_stacks_if_hung()
    log.configure("stage_worker", replica=launch.replica, stage=launch.stage, rank=0)
    host, port = args.next.rsplit(":", 1)
    try:
        code = asyncio.run(run_stage(launch, args.listen_port, host, int(port)))
    except (ModelError, HandoffError) as e:  # the head sees the stage exit and names it; one line here
        log.get().error("stage failed to start", error=str(e))
        sys.exit(1)
    finally:
        ucx.shutdown()
    if code:  # a failed stage's compute thread may be stuck in a collective: do not wait for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()

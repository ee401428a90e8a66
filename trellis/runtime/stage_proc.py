"""A non-head stage leader as a process: load, link into the ring over UCX, serve until stopped.

    python -m trellis.runtime.stage_proc --launch JSON

It listens for its predecessor on the launch's ucx_ports[0] and links to its successor at
next_host:next_ucx_ports[0] (the head, for the last stage). The offline engine starts one per
stage after the first (trellis.core.processes.spawn_module: it dies with the engine); the mesh's
stage worker service runs the same loop next to its gRPC server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from trellis.core import log
from trellis.core.errors import ModelError
from trellis.core.processes import exit_now
from trellis.runtime.bootstrap import link_ring
from trellis.runtime.executor import StageExecutor
from trellis.runtime.handoff import HandoffError
from trellis.runtime.launch import StageLaunch
from trellis.runtime.rank import dump_stacks_if_hung
from trellis.runtime.stage_loop import StageEnd, serve_stage
from trellis.transport import ucx
from trellis.transport.ucx import LinkClosed, Listener


async def run_stage(launch: StageLaunch) -> int:
    """Serve until the ring stops; the exit code (0: stopped cleanly)."""
    logger = log.get()
    executor = StageExecutor(launch)
    await executor.start()
    listener = Listener(launch.ucx_ports[0], executor.ctx.device)
    logger.info("stage loaded", layers=list(launch.layers), ucx_port=launch.ucx_ports[0])
    outbound = inbound = None
    try:
        outbound, inbound = await link_ring(executor, listener)
        end = await serve_stage(executor, inbound, outbound)
        logger.info("stage stopped", reason=end.reason)
    except LinkClosed as e:  # a neighbour went away (it failed, or the head gave up): one line
        end = StageEnd(False, f"ring broken: {e}")
        logger.error("ring broken", error=str(e))
    finally:
        await executor.stop()
        for link in (inbound, outbound):
            if link is not None:
                await link.close()
        listener.close()
    return 0 if end.stopped else 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launch", required=True)
    args = ap.parse_args()
    launch = StageLaunch.from_json(args.launch)
    dump_stacks_if_hung()
    log.configure("stage_worker", replica=launch.replica, stage=launch.stage, rank=0)
    try:
        code = asyncio.run(run_stage(launch))
    except (ModelError, HandoffError) as e:  # the head sees the stage exit and names it; one line here
        log.get().error("stage failed to start", error=str(e))
        sys.exit(1)
    finally:
        ucx.shutdown()
    if code:  # a failed stage's compute thread may be stuck in a collective: do not wait for it
        exit_now(code)


if __name__ == "__main__":
    main()

"""A TP peer (rank > 0) of a stage: runs whatever plan its leader broadcasts, until told to stop.

python -m services.stage_worker.peer --rank R --launch '<StageLaunch JSON>'
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from services.stage_worker.launch import StageLaunch
from services.stage_worker.model.errors import ModelError
from services.stage_worker.rank import die_with_parent, dump_stacks_if_hung, start_rank, stop_rank
from trellis import log
from trellis.rpc.plan_codec import decode_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--launch", required=True)
    args = ap.parse_args()
    die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; a peer stops when its leader says so.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    launch = StageLaunch.from_json(args.launch)
    dump_stacks_if_hung()
    logger = log.configure("stage_worker", replica=launch.replica, stage=launch.stage, rank=args.rank)
    try:
        ctx = start_rank(launch, args.rank)
    except ModelError as e:  # its leader reports the stage as failed; one line here, no traceback
        logger.error("rank failed to start", error=str(e))
        sys.exit(1)
    logger.info("peer ready", layers=list(launch.layers))
    while (msg := ctx.control.recv()) is not None:
        header, hidden = msg
        ctx.runner.execute(decode_plan(header), hidden)
    logger.info("peer stopping")
    stop_rank(ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: an NCCL communicator left to exit must not block it


if __name__ == "__main__":
    main()

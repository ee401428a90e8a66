"""A TP peer (rank > 0) of a stage: runs whatever plan its leader broadcasts, until told to stop.

python -m trellis.runtime.peer --rank R --launch '<StageLaunch JSON>'

With several stages the peer also moves its own slice of the hidden states (handoff.py): for each
plan, in the order its leader broadcasts them, it receives its slice from rank R of the previous
stage, the TP group all-gathers, and after the layers it sends its slice on to rank R of the next.
"""

from __future__ import annotations

import argparse
import signal
import sys

from trellis.core import log
from trellis.core.errors import ModelError
from trellis.core.processes import exit_now
from trellis.runtime.handoff import HandoffError, column_slice
from trellis.runtime.launch import StageLaunch
from trellis.runtime.peer_links import PeerLinks
from trellis.runtime.rank import RankContext, dump_stacks_if_hung, start_rank, stop_rank
from trellis.transport.ucx import LinkClosed
from trellis.wire.plan_codec import decode_plan


def open_links(ctx: RankContext, rank: int) -> PeerLinks | None:
    """This rank's links to the neighbouring stages, once every rank of the stage has its own."""
    if not ctx.launch.sliced_handoff:
        return None
    links = PeerLinks(ctx.launch, rank, ctx.device)
    try:
        links.open(ctx.launch.engine.link_timeout_s)
    except Exception as e:  # also ucxx's own errors (e.g. a taken port): the leader must hear of it
        why = str(e) or ("timed out" if isinstance(e, TimeoutError) else type(e).__name__)
        log.get().error("peer cannot link to its neighbouring stages", error=why)
        ctx.control.all_linked(False)  # the leader fails the stage with a clear message
        exit_now(1)
    ctx.control.all_linked(True)
    return links


def serve(ctx: RankContext, rank: int, links: PeerLinks | None) -> None:
    tp = ctx.launch.tp
    while (msg := ctx.control.recv()) is not None:
        header, hidden_shape = msg
        plan = decode_plan(header)
        hidden = None
        if hidden_shape is not None:  # the plan's input: this rank's slice came on its own link
            rows, cols = hidden_shape
            hidden = ctx.control.gather_columns(links.recv_slice(plan.step_id, (rows, cols // tp)))
        out = ctx.runner.execute(plan, hidden)
        if links is not None and links.outbound is not None:
            links.send_slice(plan.step_id, column_slice(out, rank, tp))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--launch", required=True)
    args = ap.parse_args()  # started by spawn_module: it dies with its leader
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
    links = open_links(ctx, args.rank)
    logger.info("peer ready", layers=list(launch.layers))
    try:
        serve(ctx, args.rank, links)
    except (LinkClosed, TimeoutError, HandoffError) as e:  # the ring is broken: its leader fails it
        logger.error("peer hand-off failed", error=str(e) or "timed out")
        exit_now(1)
    moved = {}  # what this rank's own links carried: 1/tp of the hidden states of every plan
    if links is not None:
        moved = {
            "slices_received": links.slices_received,
            "slice_bytes_received": links.bytes_received,
            "slice_bytes_sent": links.bytes_sent,
        }
        links.close()
    logger.info("peer stopping", **moved)
    stop_rank(ctx)
    exit_now(0)


if __name__ == "__main__":
    main()

"""The rules of the sliced PP hand-off that the spec, the launcher and the engine share.

Kept free of torch and of services: trellis.core.spec checks a spec with them before anything starts.
The tensor side of the hand-off is trellis/runtime/handoff.py.
"""

from __future__ import annotations


def handoff_ranks(tp: int, num_stages: int) -> int:
    """How many TP ranks of a stage listen on a UCX port of their own, rank r on the stage's
    ucx_port + r. With TP > 1 in a replica of several stages, all of them: each hands its 1/tp
    column slice of the hidden states to the same rank of the next stage. Else the leader alone."""
    return tp if tp > 1 and num_stages > 1 else 1


def rank_ucx_ports(ucx_port: int, tp: int, num_stages: int) -> tuple[int, ...]:
    """Where each listening TP rank of a stage whose leader listens on `ucx_port` listens."""
    return tuple(ucx_port + r for r in range(handoff_ranks(tp, num_stages)))


def sliced_handoff_problem(hidden_size: int, tp: int) -> str | None:
    """Why `tp` ranks cannot slice hidden states of `hidden_size` columns (None: they can)."""
    if tp > 1 and hidden_size % tp:
        return (
            f"hidden_size {hidden_size} is not a multiple of the TP size {tp}: each TP rank hands "
            f"1/{tp} of the hidden states to the next stage"
        )
    return None

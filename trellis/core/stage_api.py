"""The plain data of a stage's control API: what a replica's head takes and gives back.

Pure types, below both the wire (which converts them to and from stage_pb2) and the router (which
uses them through the StageClient protocol, trellis/routing/stage_client.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from trellis.core.handoff_api import HandoffRef
from trellis.core.plan import TokenLogprob
from trellis.core.sampling import SamplingParams


class StageHealth(enum.Enum):
    """What a stage's health check says (see trellis/routing/replicas.py for what the router does).

    SERVING: it takes new work. DRAINING: it answers, but NOT_SERVING: it takes no new work (starting,
    or draining: its admitted requests still stream). DOWN: it does not answer within the deadline.
    """

    SERVING = "serving"
    DRAINING = "draining"
    DOWN = "down"


DRAINING = "is draining"  # in a head's UNAVAILABLE refusal of a new request: the router tries another


def draining_refusal(replica: str) -> str:
    """What a draining head answers a new request (UNAVAILABLE): nothing ran, so it can go elsewhere."""
    return f"replica {replica} {DRAINING}"


@dataclass(frozen=True)
class StageRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # validated, max_tokens resolved
    trace_context: tuple[tuple[str, str], ...] = ()  # W3C trace headers of the caller's span
    handoff: HandoffRef | None = None  # either half of a disaggregated request


@dataclass(frozen=True)
class StageChunk:
    token_ids: tuple[int, ...]
    finish_reason: str = ""  # set on the last chunk only
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when the request asked (sampling.logprobs)
    block_sums: tuple[int, ...] = ()  # with finish_reason "handoff": P's checksum of each slot it copied


@dataclass(frozen=True)
class StageStats:
    """A snapshot of one stage (its service builds it; the router reads it over the wire); the
    scheduler's figures only on a head that is up (else 0)."""

    replica: str
    stage: int
    num_blocks: int = 0
    free_blocks: int = 0
    running: int = 0
    waiting: int = 0
    in_flight_steps: int = 0
    steps: int = 0
    generated_tokens: int = 0
    draining: bool = False
    ready: bool = False
    stage_busy_s: tuple[float, ...] = ()  # each stage's compute seconds, stage 0 first
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache / found there
    prefix_hit_tokens: int = 0
    preemptions: int = 0
    # Every stage: the payload bytes on the leader's UCX links, the seconds its sends took.
    handoff_bytes_sent: int = 0
    handoff_bytes_received: int = 0
    handoff_seconds: float = 0.0
    # The head: KVFingerprint.canary() of its block names (0: unknown); see trellis/core/kv_names.py.
    kv_canary: int = 0
    # The head's use of the KV store: blocks loaded at admission, loads voided (recomputed), blocks
    # committed to the store, store calls that failed (each a fallback to recompute).
    store_loaded_blocks: int = 0
    store_voided_loads: int = 0
    store_committed_blocks: int = 0
    store_errors: int = 0
    # P/D hand-offs (trellis/core/handoff_api.py), on the head: as prefill replica, then as decode.
    pd_prefills: int = 0  # prefill halves submitted here (P)
    pd_fallbacks: int = (
        0  # prefill halves decoded here after all: no target, a refused or failed copy, a deadline (P)
    )
    pd_blocks_sent: int = 0  # KV blocks copied to decode replicas, confirmed (P)
    pd_reserved: int = 0  # hand-off reservations made (D)
    pd_committed: int = 0  # decode halves that found their reservation (D)
    pd_recomputed: int = 0  # decode halves that did not, recomputed here (D)
    pd_voided: int = 0  # hand-off loads voided (checksum or copy failure) and recomputed (D)
    pd_blocks_loaded: int = 0  # KV blocks loaded from staging slots and checked (D)
    # D's staging slots now: free, held by a reservation, quarantined after an abandoned transfer
    # (free + held + quarantined = engine.handoff_slots once its hand-off slab exists, else all 0).
    pd_slots_free: int = 0
    pd_slots_held: int = 0
    pd_slots_quarantined: int = 0

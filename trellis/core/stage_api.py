"""The plain data of a stage's control API: what a replica's head takes and gives back.

Pure types, below both the wire (which converts them to and from stage_pb2) and the router (which
uses them through the StageClient protocol, trellis/routing/stage_client.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.core.sampling import SamplingParams


@dataclass(frozen=True)
class StageRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # validated, max_tokens resolved
    trace_context: tuple[tuple[str, str], ...] = ()  # W3C trace headers of the caller's span


@dataclass(frozen=True)
class StageChunk:
    token_ids: tuple[int, ...]
    finish_reason: str = ""  # set on the last chunk only


@dataclass(frozen=True)
class StageStats:
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

"""The scheduler's settings and errors (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trellis.core.engine_config import EngineConfig


class SchedulerConfigError(ValueError):
    """A bad scheduler setting, told in one line."""


class InvalidRequestError(ValueError):
    """A request the scheduler can never serve (e.g. a prompt too long), told in one line."""


class SchedulerError(RuntimeError):
    """A step result that does not match the plan it answers."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int
    max_num_seqs: int  # sequences per micro-batch
    max_num_batched_tokens: int  # tokens per micro-batch (the step's budget)
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    enable_prefix_caching: bool = True
    max_in_flight: int = 1  # outstanding micro-batches: the number of pipeline stages
    # Greedy decode bursts: with one stage and nobody waiting, a step of pure greedy decodes may
    # run up to this many tokens per sequence on the device before the host looks again.
    decode_burst: int = 1
    admission_watermark: float = 0.01  # share of blocks kept free when admitting beside running seqs
    cache_key: str | None = None  # roots every block name: the KVFingerprint key (trellis.core.kv_names)

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {low}, got {getattr(self, name)}"
            for name, low in (
                ("num_blocks", 1),
                ("block_size", 1),
                ("max_num_seqs", 1),
                ("max_num_batched_tokens", 1),
                ("max_model_len", 2),
                ("max_in_flight", 1),
                ("decode_burst", 1),
            )
            if getattr(self, name) < low
        ]
        if not 0.0 <= self.admission_watermark < 1.0:
            problems.append(f"admission_watermark must be in [0, 1), got {self.admission_watermark}")
        if problems:
            raise SchedulerConfigError("scheduler config: " + "; ".join(problems))


def scheduler_config(
    engine: EngineConfig,
    *,
    num_blocks: int,
    max_model_len: int,
    eos_token_ids: Sequence[int],
    num_stages: int,
    cache_key: str | None = None,
) -> SchedulerConfig:
    """The head's scheduler settings: the engine's knobs under the same names, plus what the ring
    agreed on (num_blocks: its stages' minimum) and what the model says."""
    return SchedulerConfig(
        num_blocks=num_blocks,
        block_size=engine.block_size,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids=tuple(eos_token_ids),
        enable_prefix_caching=engine.enable_prefix_caching,
        max_in_flight=engine.in_flight(num_stages),
        decode_burst=engine.decode_burst,
        cache_key=cache_key,
    )

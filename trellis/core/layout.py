"""How a model's layers split into pipeline stages, and sizing of the paged KV cache."""

from __future__ import annotations

import math

from trellis.core.engine_config import EngineConfig
from trellis.core.errors import ModelError
from trellis.core.model_config import ModelConfig
from trellis.core.spec import balanced_layers


def split_layers(num_layers: int, pp: int) -> tuple[tuple[int, int], ...]:
    """The balanced split of trellis.core.spec, refused with a ModelError where PP does not fit."""
    if pp < 1:
        raise ModelError(f"PP must be >= 1, got {pp}")
    if pp > num_layers:
        raise ModelError(f"PP {pp} is larger than the model's {num_layers} layers")
    return balanced_layers(num_layers, pp)


def default_num_blocks(cfg: ModelConfig, *, block_size: int, max_model_len: int, max_num_seqs: int) -> int:
    """A CPU default: room for every sequence at full length, capped at 64 full-length sequences."""
    per_seq = math.ceil(max_model_len / block_size)
    return per_seq * min(max_num_seqs, 64) + 1


def stage_num_blocks(
    engine: EngineConfig, cfg: ModelConfig, *, device: str, max_model_len: int
) -> int | None:
    """The KV blocks a stage allocates: engine.num_blocks where set; else None on CUDA (the runner
    fits the GPU) and default_num_blocks on CPU. The one place that reads "unset"."""
    if engine.num_blocks is not None or device == "cuda":
        return engine.num_blocks
    return default_num_blocks(
        cfg, block_size=engine.block_size, max_model_len=max_model_len, max_num_seqs=engine.max_num_seqs
    )

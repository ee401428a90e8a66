"""Every engine knob, once: the one configuration a deploy spec, `EngineArgs` and every rank share.

The spec's `engine:` section is parsed from this dataclass's own fields and types, the offline
engine takes it whole, and a stage's processes get it whole in their StageLaunch JSON; the
scheduler's and the runner's settings are derived from it, so each knob has one name everywhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from trellis.core.errors import ConfigError

MAX_SEED = 2**63


@dataclass(frozen=True)
class EngineConfig:
    """Valid by construction: __post_init__ checks every field's type and range (ConfigError, the
    field named), so whoever holds an EngineConfig need not check it again."""

    block_size: int = 16  # tokens per KV block
    # KV blocks per stage. None: as many as fit the GPU (gpu_memory_utilization) on CUDA, the CPU
    # default (trellis.core.layout.stage_num_blocks) on CPU; a ring runs with its stages' minimum.
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.85  # share of GPU memory the weights and KV cache may take
    max_num_seqs: int = 256  # sequences per micro-batch, hence the largest CUDA graph
    max_num_batched_tokens: int = 2048  # token budget of one step; longer prompts are chunked
    enable_prefix_caching: bool = True
    seed: int = 0  # of dummy weights and of sampling without a per-request seed
    cuda_graphs: bool = True  # decode steps as CUDA graphs (CUDA stages only)
    one_shot_max_bytes: int = 0  # TP all-reduces up to this size over peer memory (0: NCCL only)
    decode_burst: int = 1  # greedy decode steps per plan when nobody waits (one-stage replicas)
    max_in_flight: int | None = None  # micro-batches in flight; None: the number of stages
    link_timeout_s: float = 1800.0  # linking the ring: a successor may take long to load its shard
    stop_timeout_s: float = 30.0  # a stage's TP peers to stop once told
    lease_ttl_s: float = 3.0  # a registered stage's lease (Redis registry)
    load_report_s: float = 0.5  # how often a head reports its replica's load to the registry
    # SIGTERM or Drain: how long the admitted requests may take to finish (then the rest are cut).
    drain_grace_s: float = 30.0
    # A decode replica's hand-off slab (P/D): staging slots, one whole-model KV block each, in a
    # shared-memory file under handoff_dir. 0: as many as two prompts of max_model_len need.
    handoff_slots: int = 0
    handoff_dir: str = "/dev/shm"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f"engine.{f.name}", getattr(self, f.name), hints[f.name])
        for name, low in _MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"engine.{name}: must be >= {low}, got {value!r}")
        for name in _POSITIVE:
            if not getattr(self, name) > 0:
                raise ConfigError(f"engine.{name}: must be > 0, got {getattr(self, name)!r}")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"engine.gpu_memory_utilization: must be in [0.05, 1], got {self.gpu_memory_utilization!r}"
            )
        if self.seed >= MAX_SEED:
            raise ConfigError(f"engine.seed: must be < 2^63, got {self.seed}")

    def in_flight(self, num_stages: int) -> int:
        """Micro-batches in flight in a ring of `num_stages` stages."""
        return self.max_in_flight or num_stages

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> EngineConfig:
        """The config a mapping describes (missing knobs take their defaults); an unknown or
        mistyped knob is a ConfigError naming it."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(f"engine: expected a mapping, got {type(raw).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ConfigError(f"engine.{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
        return cls(**raw)


_MINIMUMS = {
    "block_size": 1,
    "num_blocks": 1,
    "max_num_seqs": 1,
    "max_num_batched_tokens": 1,
    "seed": 0,
    "one_shot_max_bytes": 0,
    "decode_burst": 1,
    "max_in_flight": 1,
    "handoff_slots": 0,
}
_POSITIVE = ("link_timeout_s", "stop_timeout_s", "lease_ttl_s", "load_report_s", "drain_grace_s")


def _check_type(where: str, value: Any, hint: Any) -> None:
    """int, float, bool and `X | None` fields; a bool is no int, an int is a float."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in args:
        return
    kind = next(a for a in args if a is not type(None))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")

"""How one request samples its tokens, and the one default of max_tokens (pure data)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 16  # a request that does not say how many tokens it wants gets this many


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # per-request seed: the same tokens whatever the TP x PP split
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def problems(self) -> list[str]:
        """What is wrong with these values, one phrase each (empty when valid)."""
        out = []
        if not self.temperature >= 0.0:
            out.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens <= 0:
            out.append(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            out.append(f"seed must be in [0, 2^63), got {self.seed}")
        return out

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
    # None: no log-probabilities; k >= 0: each new token's logprob plus its top k alternatives.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

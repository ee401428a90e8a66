"""What moves between stages each step: the step plan down the pipe, sampled ids back to the head.

Pure data, no torch, no protobuf (``trellis.wire.plan_codec`` puts these on the wire). A request's
data (prompt, sampling) travels once, in the plan of its first step; after that each step
carries only diffs: the tokens to feed, and the blocks appended to (or replacing part of) the
sequence's block table. Every stage applies the same diffs, so every stage holds the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # per-request seed: the same tokens whatever the TP x PP split
    max_tokens: int = 16
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


@dataclass(frozen=True)
class NewRequest:
    """Sent once, in the plan of the request's first step."""

    seq_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a step."""

    seq_id: int
    start_pos: int  # tokens of this sequence already in the KV cache
    token_ids: tuple[int, ...]  # tokens fed this step, at positions start_pos, start_pos + 1, ...
    block_table_start: int  # the stage sets table[block_table_start:] = new_blocks
    new_blocks: tuple[int, ...]
    sample: bool  # True when the last fed token's logits give the next token (not a prefill chunk)
    output_index: int = 0  # tokens generated so far; with the seed it fixes the sampler's noise


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    seqs: tuple[SeqStep, ...]
    new_requests: tuple[NewRequest, ...] = ()
    finished: tuple[int, ...] = ()  # sequences whose state every stage drops before this step
    return_logits: bool = False  # the last stage sends the sampled rows' full logits back (tests, logprobs)
    # A decode burst: every sequence is a greedy decode, and the stage runs this many steps in a
    # row, feeding each sampled token back on the device; blocks for all of them are in the plan.
    decode_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class StepResult:
    """The last stage's answer for one step: per sequence with sample=True, one sampled token (or
    `steps` of them after a decode burst)."""

    step_id: int
    seq_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # `steps` tokens per sequence, sequence-major
    steps: int = 1
    logits: Any = None  # float32 [len(seq_ids), vocab] when the plan asked for them (a torch tensor)

"""What a KV block is called, by every service alike: the model fingerprint that roots the chain.

Block i of a prompt is named ``h_i = H(h_{i-1} || tokens of block i)`` (trellis.core.hashing); the
chain is rooted in a fingerprint of everything that makes two caches' bytes interchangeable: the
model, the KV dtype, the number of KV heads, the head dim, the rope, the block size and the layout
version. The router, the stage workers and the KV store compute it with this one function from the
same spec, so a block named by one is the same block for the others.

Which layers and which KV heads a stored copy holds is NOT part of the name: it is an attribute of
the copy, so a copy written at TP 2 serves a reader at TP 1 (each rank reads its own heads).

The canary: each service hashes the same fixed prompt; at start-up a worker reports its canary's
last hash and the router (and the store) compare it with their own. A mismatch means their names
would silently disagree, so KV-aware routing and the store are refused with one log line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from trellis.core import hashing
from trellis.core.model_config import ModelConfig

LAYOUT_VERSION = 1  # bump when a block's bytes change meaning (slot layout, K/V order)
CANARY_BLOCKS = 4  # the canary prompt: this many blocks of the fixed ids 1..64 (below every vocab)


@dataclass(frozen=True)
class KVFingerprint:
    model: str  # the served model's name (spec.model.name)
    dtype: str  # of the KV cache, e.g. "bfloat16"
    num_kv_heads: int  # of the whole model (not of a rank)
    head_dim: int
    num_layers: int
    rope: str  # theta and scaling, as text
    block_size: int
    layout_version: int = LAYOUT_VERSION

    @property
    def key(self) -> str:
        """The root key of every block name (canonical JSON: the same text in every process)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def block_hashes(self, token_ids: tuple[int, ...] | list[int]) -> list[int]:
        """The names of every full block of ``token_ids`` under this fingerprint."""
        return hashing.block_hashes(token_ids, self.block_size, self.key)

    def canary(self) -> int:
        """The last block name of the fixed canary prompt: equal in two processes iff their names agree."""
        tokens = [1 + i % 64 for i in range(CANARY_BLOCKS * self.block_size)]
        return self.block_hashes(tokens)[-1]


def fingerprint_of(cfg: ModelConfig, model_name: str, dtype: str, block_size: int) -> KVFingerprint:
    """The one fingerprint function (router, workers, store): from the model config and the spec."""
    scaling = cfg.rope_scaling
    rope = f"theta={cfg.rope_theta!r};scaling={'none' if scaling is None else repr(asdict(scaling))}"
    return KVFingerprint(
        model=model_name,
        dtype=dtype,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        num_layers=cfg.num_hidden_layers,
        rope=rope,
        block_size=block_size,
    )


def kv_heads_of_rank(cfg: ModelConfig, tp: int, rank: int) -> tuple[int, int]:
    """[first, end) of the model's KV heads that TP rank ``rank`` holds.

    With at least as many KV heads as ranks each rank holds kv_heads / tp of them; with fewer, the
    heads are replicated and rank r holds head r // (tp / kv_heads) (its copy is the same bytes).
    """
    kv = cfg.num_key_value_heads
    if kv >= tp:
        per = kv // tp
        return rank * per, (rank + 1) * per
    head = rank // (tp // kv)
    return head, head + 1

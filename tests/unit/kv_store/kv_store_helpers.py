"""Shared by the KV store's unit tests: a tiny fingerprint (256-byte slots) and an injected clock."""

from __future__ import annotations

from collections.abc import Callable

from trellis.core.kv_names import KVFingerprint
from trellis.kv_store import KVStore

FP = KVFingerprint(
    model="tiny", dtype="float16", num_kv_heads=2, head_dim=4, num_layers=2, rope="r", block_size=4
)
SLOT_BYTES = 2 * 2 * 4 * 2 * 4 * 2  # layers x K|V x block x heads x head_dim x 2 bytes = 256


class Clock:
    """An injected clock (unix-like seconds) the test advances by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


MakeStore = Callable[..., KVStore]

"""P/D disaggregation's replica choice: one replica (aggregated), or a prefill and a decode replica.

`PDPolicy` wraps the policy of the spec (least-load or kv-aware). With no healthy replica of role
prefill or decode among those it is given, the inner policy alone decides, exactly as before.
Otherwise:
- D, the decode replica: the inner policy's choice among roles decode and both (kv-aware: its
  estimate, which also tells how much of the prompt D or the KV store holds; least-load: nothing);
- D's uncached suffix (prompt tokens past what it or the store holds) at most
  `max_local_prefill_tokens`: D alone, aggregated (a short prefill is not worth a hand-off);
- else P: among roles prefill and both, D excluded, naming KV blocks as D does, the least estimated
  TTFT (kv-aware) or the least load; the answer is `Pair(P, D)`. No such P: D alone;
- no decode candidate at all (only prefill replicas up): the inner policy's choice among them,
  aggregated (a prefill replica decodes too when it must).
Invariants: the answer is one of the replicas given, or a Pair of two distinct ones; two replicas
whose KV canaries are both known and differ name blocks differently and are never paired (one
error line per pair of canaries).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from trellis.core import log
from trellis.routing.kv_aware import KVAwarePolicy, KVCandidate, KVEstimates
from trellis.routing.policy import ReplicaPolicy, least_load

DECODE_ROLES = ("decode", "both")
PREFILL_ROLES = ("prefill", "both")


class PDCandidate(KVCandidate, Protocol):
    """What this policy reads of a replica (trellis.routing.replicas.Replica has it all)."""

    @property
    def role(self) -> str: ...


R = TypeVar("R", bound=PDCandidate)


@dataclass(frozen=True)
class Pair(Generic[R]):
    """A disaggregated request's replicas: P prefills the prompt and samples the first token, D
    decodes the rest from the KV P copied (trellis/routing/handoff_stream.py)."""

    prefill: R
    decode: R

    @property
    def name(self) -> str:
        return f"{self.prefill.name}->{self.decode.name}"


class PDPolicy:
    def __init__(self, inner: ReplicaPolicy, *, max_local_prefill_tokens: int) -> None:
        if max_local_prefill_tokens < 0:
            raise ValueError(f"max_local_prefill_tokens: must be >= 0, got {max_local_prefill_tokens}")
        self.inner = inner
        self.kv = inner if isinstance(inner, KVAwarePolicy) else None
        self.max_local_prefill_tokens = max_local_prefill_tokens
        self._bad_pairs: dict[tuple[str, str], tuple[int, int]] = {}  # (P, D) -> canaries logged
        self._log = log.get()

    def __call__(self, replicas: Sequence[R], prompt_ids: Sequence[int]) -> R | Awaitable[R | Pair[R]]:
        if not any(r.role in ("prefill", "decode") for r in replicas):
            return self.inner(replicas, prompt_ids)  # untouched: sync or async as the inner one is
        return self._choose(replicas, prompt_ids)

    async def _choose(self, replicas: Sequence[R], prompt_ids: Sequence[int]) -> R | Pair[R]:
        decode = [r for r in replicas if r.role in DECODE_ROLES]
        if not decode:
            return await self._inner(replicas, prompt_ids)
        found = None if self.kv is None else await self.kv.estimates(replicas, prompt_ids)
        if found is not None:
            d_est = found.fastest(decode)
            d, cached = d_est.replica, d_est.hit_blocks * found.block_size
        elif self.kv is not None:  # kv-aware without an answer goes by least load, as it would alone
            d, cached = least_load(decode, prompt_ids), 0
        else:
            d, cached = await self._inner(decode, prompt_ids), 0
        if len(prompt_ids) - cached <= self.max_local_prefill_tokens:
            self._decided(found, d)
            return d
        prefill = [r for r in replicas if r.role in PREFILL_ROLES and r.name != d.name]
        prefill = [p for p in prefill if self._same_names(p, d)]
        if not prefill:
            self._decided(found, d)
            return d
        p = found.fastest(prefill).replica if found is not None else least_load(prefill, prompt_ids)
        self._decided(found, p)
        self._decided(found, d)  # D will name the prompt's blocks too, once they are copied
        return Pair(p, d)

    async def _inner(self, replicas: Sequence[R], prompt_ids: Sequence[int]) -> R:
        choice = self.inner(replicas, prompt_ids)
        return await choice if inspect.isawaitable(choice) else choice

    def _decided(self, found: KVEstimates[R] | None, r: R) -> None:
        if found is not None and self.kv is not None:
            self.kv.decided(found, found.by_name[r.name])

    def _same_names(self, p: R, d: R) -> bool:
        """False when both canaries are known and differ: P's copies would land under other names."""
        pc, dc = p.kv_canary, d.kv_canary
        if not pc or not dc or pc == dc:
            self._bad_pairs.pop((p.name, d.name), None)
            return True
        if self._bad_pairs.get((p.name, d.name)) != (pc, dc):
            self._bad_pairs[(p.name, d.name)] = (pc, dc)
            self._log.error(
                "prefill and decode replicas name KV blocks differently; not paired",
                prefill=p.name,
                decode=d.name,
                prefill_canary=pc,
                decode_canary=dc,
            )
        return False

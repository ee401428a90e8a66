"""KV-aware replica choice: the replica with the least estimated time to first token.

For each healthy replica r, from the prompt's block names (its KVFingerprint) and one question to
the block index (a `BlockLocator`: the Redis registry, or trellis.routing.kv_locators):
- local: the leading run r holds (any of r's locations: the instance id does not matter here), or
  that this policy just sent it (trellis.routing.speculative), whichever is longer;
- store: the leading run the KV store holds (host tier, or host-or-disk; disk blocks cost more);
- TTFT(r) = (queued prefill tokens + uncached tokens) / prefill rate + store blocks fetched x
  fetch time + decode load x decode step time (`TTFTModel`), where the queued prefill is what r
  reports waiting (x an assumed prompt size: the report has no token counts) and the decode load
  is its running batch or this router's requests in flight there, whichever is larger.
The least TTFT wins; ties go to the least load, then the first name.

Invariants:
- the policy always answers one of the replicas it was given;
- a replica whose reported KV canary is nonzero and differs from ours names blocks differently:
  it is treated as holding nothing (nor can it use the store), and one error line says so;
- a locator that fails or misses its deadline costs that request its KV preference, never the
  request: it goes by least-load; one warning when failures start, one info line when they end;
- no prometheus here: decisions are reported to a `KVDecisionSink` (trellis.metrics.router_metrics).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from trellis.core import log
from trellis.core.kv_names import KVFingerprint
from trellis.registry import Location, ReplicaLoad, parse_location
from trellis.routing.policy import least_load
from trellis.routing.speculative import SpeculativeHolds

DEFAULT_LOCATOR_TIMEOUT_S = 0.05


class BlockLocator(Protocol):
    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per location, the leading run of ``hashes`` it holds (0-length runs left out)."""
        ...


class KVCandidate(Protocol):
    """What this policy reads of a replica (trellis.routing.replicas.Replica has it all)."""

    @property
    def name(self) -> str: ...

    @property
    def load(self) -> int: ...

    @property
    def outstanding(self) -> int: ...

    @property
    def reported(self) -> ReplicaLoad | None: ...

    @property
    def kv_canary(self) -> int: ...


class KVDecisionSink(Protocol):
    def kv_decision(self, replica: str, predicted_hit_blocks: int, prompt_blocks: int) -> None: ...

    def kv_fallback(self, reason: str) -> None: ...


R = TypeVar("R", bound=KVCandidate)


@dataclass(frozen=True)
class TTFTModel:
    """The rates of the TTFT estimate. Units: tokens per second, seconds per block, seconds per
    running sequence, tokens per queued request."""

    prefill_tokens_per_s: float = 8000.0  # one replica's prefill throughput
    host_fetch_s_per_block: float = 0.0002  # a block from the store's host tier into the cache
    disk_fetch_s_per_block: float = 0.002  # a block from the store's disk tier
    decode_step_s: float = 0.0005  # what each running sequence adds to the wait for a first token
    waiting_request_tokens: int = 512  # prefill assumed per request the replica reports waiting

    def ttft_s(
        self,
        *,
        queued_tokens: int,
        uncached_tokens: int,
        host_blocks: int,
        disk_blocks: int,
        decode_load: int,
    ) -> float:
        return (
            (queued_tokens + uncached_tokens) / self.prefill_tokens_per_s
            + host_blocks * self.host_fetch_s_per_block
            + disk_blocks * self.disk_fetch_s_per_block
            + decode_load * self.decode_step_s
        )


@dataclass(frozen=True)
class _Runs:
    """The locator's answer, folded: per replica name, and the store's tiers."""

    local: dict[str, int]
    store_host: int
    store_any: int  # host or disk (>= store_host)


@dataclass(frozen=True)
class KVEstimate(Generic[R]):
    """What sending one prompt to one replica is expected to cost."""

    replica: R
    hit_blocks: int  # prompt blocks expected held there or in the store (not recomputed)
    ttft_s: float


@dataclass(frozen=True)
class KVEstimates(Generic[R]):
    """One prompt's estimates, by replica name."""

    hashes: list[int]  # the prompt's block names
    by_name: dict[str, KVEstimate[R]]
    block_size: int  # tokens per block

    def fastest(self, among: Sequence[R]) -> KVEstimate[R]:
        """The least TTFT among these replicas (estimated here); ties: the least load, the first name."""
        return min(
            (self.by_name[r.name] for r in among), key=lambda e: (e.ttft_s, e.replica.load, e.replica.name)
        )


class KVAwarePolicy:
    def __init__(
        self,
        locator: BlockLocator,
        fingerprint: KVFingerprint,
        *,
        cost: TTFTModel | None = None,
        speculative_ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        locator_timeout_s: float = DEFAULT_LOCATOR_TIMEOUT_S,
        metrics: KVDecisionSink | None = None,
    ) -> None:
        self.locator = locator
        self.fingerprint = fingerprint
        self.block_size = fingerprint.block_size
        self.canary = fingerprint.canary()
        self.cost = cost or TTFTModel()
        self.clock = clock
        self.locator_timeout_s = locator_timeout_s
        self.metrics = metrics
        self.speculative = SpeculativeHolds(speculative_ttl_s, clock)
        self._parsed: dict[str, Location | None] = {}
        self._bad_canaries: dict[str, int] = {}  # replica -> the mismatched canary already logged
        self._failing = False
        self._log = log.get()

    async def __call__(self, replicas: Sequence[R], prompt_ids: Sequence[int]) -> R:
        found = await self.estimates(replicas, prompt_ids)
        if found is None:
            return least_load(replicas, prompt_ids)
        best = found.fastest(replicas)
        self.decided(found, best)
        return best.replica

    async def estimates(self, replicas: Sequence[R], prompt_ids: Sequence[int]) -> KVEstimates[R] | None:
        """Every replica's estimate for this prompt (one locator call), or None when the policy
        knows nothing of it (no full block, no replica that names blocks as we do, the locator
        failed): then it is least-load's choice."""
        hashes = self.fingerprint.block_hashes(prompt_ids)
        usable = [r for r in replicas if self._canary_ok(r)]
        if not hashes or not usable:
            return None
        runs = await self._runs(hashes)
        if runs is None:
            return None
        self.speculative.expire()
        usable_names = {r.name for r in usable}
        tokens = len(prompt_ids)
        by_name: dict[str, KVEstimate[R]] = {}
        for r in replicas:
            hit, ttft = self._estimate(r, r.name in usable_names, hashes, tokens, runs)
            by_name[r.name] = KVEstimate(r, hit, ttft)
        return KVEstimates(hashes, by_name, self.block_size)

    def decided(self, found: KVEstimates[R], chosen: KVEstimate[R]) -> None:
        """The prompt goes to chosen: it counts as held there a while, and the decision is reported."""
        self.speculative.record(chosen.replica.name, found.hashes)
        if self.metrics is not None:
            self.metrics.kv_decision(chosen.replica.name, chosen.hit_blocks, len(found.hashes))

    def _estimate(
        self, r: KVCandidate, usable: bool, hashes: list[int], tokens: int, runs: _Runs
    ) -> tuple[int, float]:
        """(blocks expected to hit, estimated TTFT in seconds) of sending the prompt to r."""
        local = store = host = 0
        if usable:
            local = max(runs.local.get(r.name, 0), self.speculative.run(r.name, hashes))
            store = runs.store_any
            host = runs.store_host
        hit = max(local, store)
        fetched_host = max(0, min(host, hit) - local)
        fetched_disk = max(0, hit - max(local, host))
        uncached = max(0, tokens - hit * self.block_size)
        reported = r.reported
        waiting = reported.waiting if reported else 0
        running = reported.running if reported else 0
        ttft = self.cost.ttft_s(
            queued_tokens=waiting * self.cost.waiting_request_tokens,
            uncached_tokens=uncached,
            host_blocks=fetched_host,
            disk_blocks=fetched_disk,
            decode_load=max(r.outstanding, running),
        )
        return hit, ttft

    async def _runs(self, hashes: list[int]) -> _Runs | None:
        """The locator's answer, folded by replica and store tier; None if it failed (logged)."""
        try:
            async with asyncio.timeout(self.locator_timeout_s):
                found = await self.locator.leading_runs(hashes)
        except Exception as e:  # the index is an optimisation: least-load serves without it
            reason = "timeout" if isinstance(e, TimeoutError) else "error"
            if self.metrics is not None:
                self.metrics.kv_fallback(reason)
            if not self._failing:
                self._failing = True
                self._log.warning(
                    "block index unavailable; routing by least load", reason=reason, error=str(e) or reason
                )
            return None
        if self._failing:
            self._failing = False
            self._log.info("block index available again; routing by KV")
        local: dict[str, int] = {}
        host = any_tier = 0
        for location, run in found.items():
            where = self._parse(location)
            if where is None:
                continue
            if not where.is_store:
                local[where.name] = max(local.get(where.name, 0), run)
            elif where.tier == "host":
                host = max(host, run)
            else:
                any_tier = max(any_tier, run)
        return _Runs(local, host, max(host, any_tier))

    def _parse(self, location: str) -> Location | None:
        if location not in self._parsed:
            if len(self._parsed) > 4096:  # locations of dead instances would pile up
                self._parsed.clear()
            self._parsed[location] = parse_location(location)
        return self._parsed[location]

    def _canary_ok(self, r: KVCandidate) -> bool:
        theirs = r.kv_canary
        if not theirs or theirs == self.canary:
            self._bad_canaries.pop(r.name, None)
            return True
        if self._bad_canaries.get(r.name) != theirs:
            self._bad_canaries[r.name] = theirs
            self._log.error(
                "replica names KV blocks differently; no KV-aware routing to it",
                replica=r.name,
                replica_canary=theirs,
                router_canary=self.canary,
            )
        return False

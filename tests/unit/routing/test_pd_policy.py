"""PDPolicy: aggregated or a prefill/decode pair, by roles, D's uncached suffix, load, KV and canaries."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from trellis.core.kv_names import KVFingerprint
from trellis.registry import EmbeddedRegistry, RegistryUnavailableError, ReplicaLoad
from trellis.routing.kv_aware import KVAwarePolicy
from trellis.routing.pd_policy import Pair, PDPolicy
from trellis.routing.policy import least_load

FP = KVFingerprint("m", "bfloat16", 2, 16, 2, "theta=1e4", 16)
LONG = tuple(range(1, 1025))  # 64 blocks of 16
SHORT = tuple(range(1, 65))  # 4 blocks
HASHES = FP.block_hashes(LONG)


@dataclass
class Cand:
    name: str
    role: str = "both"
    outstanding: int = 0
    reported: ReplicaLoad | None = None
    kv_canary: int = 0

    @property
    def load(self) -> int:
        return self.outstanding + (self.reported.waiting if self.reported else 0)


def pick(policy: PDPolicy, replicas: Sequence[Cand], prompt: Sequence[int]) -> Cand | Pair[Cand]:
    answer = policy(replicas, prompt)
    if inspect.isawaitable(answer):
        return asyncio.run(_wait(answer))
    return answer


async def _wait(answer: object) -> Cand | Pair[Cand]:
    return await answer  # type: ignore[misc, no-any-return]


def pd(max_local: int = 512) -> PDPolicy:
    return PDPolicy(least_load, max_local_prefill_tokens=max_local)


def test_without_prefill_or_decode_roles_the_inner_policy_decides_alone() -> None:
    reps = [Cand("a", outstanding=2), Cand("b", outstanding=1), Cand("c", outstanding=1)]
    answer = pd(0)(reps, LONG)
    assert not inspect.isawaitable(answer)  # least-load stays a plain call
    assert answer is least_load(reps, LONG)


def test_a_long_prompt_is_paired_and_a_short_one_runs_on_the_decode_replica() -> None:
    p, d = Cand("p", "prefill"), Cand("d", "decode")
    assert pick(pd(512), [p, d], SHORT) is d  # 64 tokens <= 512: aggregated on D
    assert pick(pd(64), [p, d], SHORT) is d  # exactly the limit: still local
    pair = pick(pd(63), [p, d], SHORT)
    assert pair == Pair(p, d) and isinstance(pair, Pair) and pair.name == "p->d"
    assert pick(pd(512), [p, d], LONG) == Pair(p, d)


def test_decode_and_prefill_go_by_least_load_among_their_roles() -> None:
    reps = [
        Cand("d1", "decode", outstanding=3),
        Cand("d2", "decode", outstanding=1),
        Cand("p1", "prefill", outstanding=2),
        Cand("p2", "prefill", reported=ReplicaLoad("p2", waiting=5)),
        Cand("b", "both", outstanding=1),
    ]
    # D: d2 and b tie at 1, the first name wins (b); P: the least loaded other than b (d2 is no P).
    assert pick(pd(0), reps, LONG) == Pair(reps[2], reps[4])
    reps[4].outstanding = 9  # now D is d2; b is a prefill candidate again but busier than p1
    assert pick(pd(0), reps, LONG) == Pair(reps[2], reps[1])


def test_a_both_replica_is_never_paired_with_itself_and_no_prefill_candidate_means_aggregated() -> None:
    b, d = Cand("b", "both"), Cand("d", "decode", outstanding=1)
    assert pick(pd(0), [b, d], LONG) is b  # b decodes (least load), d cannot prefill: aggregated
    b.outstanding = 2
    assert pick(pd(0), [b, d], LONG) == Pair(b, d)  # d decodes now, b prefills
    only_decode = [Cand("d1", "decode"), Cand("d2", "decode", outstanding=1)]
    assert pick(pd(0), only_decode, LONG) is only_decode[0]


def test_only_prefill_replicas_up_runs_aggregated_on_one_of_them() -> None:
    reps = [Cand("p1", "prefill", outstanding=1), Cand("p2", "prefill")]
    assert pick(pd(0), reps, LONG) is reps[1]


def test_replicas_naming_blocks_differently_are_never_paired_and_it_is_said_once() -> None:
    d = Cand("d", "decode", kv_canary=7)
    bad, good = Cand("p1", "prefill", kv_canary=9), Cand("p2", "prefill", kv_canary=7, outstanding=4)
    policy = pd(0)
    with capture_logs() as logs:
        assert pick(policy, [bad, d], LONG) is d  # the only P names blocks otherwise: aggregated
        assert pick(policy, [bad, d], LONG) is d
        assert pick(policy, [bad, good, d], LONG) == Pair(good, d)  # a busier P that matches
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["prefill"] == "p1" and errors[0]["decode_canary"] == 7
    unknown = Cand("p3", "prefill", kv_canary=0)  # 0: not known yet, so not refused
    assert pick(policy, [unknown, d], LONG) == Pair(unknown, d)


def test_max_local_prefill_tokens_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_local_prefill_tokens"):
        PDPolicy(least_load, max_local_prefill_tokens=-1)


class Broken:
    async def leading_runs(self, hashes: Sequence[int]) -> dict[str, int]:
        raise RegistryUnavailableError("registry down")


def kv_pd(locator: object, max_local: int) -> tuple[PDPolicy, KVAwarePolicy]:
    kv = KVAwarePolicy(locator, FP, speculative_ttl_s=2.0)  # type: ignore[arg-type]
    return PDPolicy(kv, max_local_prefill_tokens=max_local), kv


def test_kv_aware_knows_what_the_decode_replica_holds() -> None:
    async def main() -> None:
        reg = EmbeddedRegistry()
        await reg.add_blocks("d@i1", HASHES[:60])  # d holds 960 of the 1024 tokens
        policy, _ = kv_pd(reg, 64)
        p, d = Cand("p", "prefill"), Cand("d", "decode")
        assert await policy([p, d], LONG) is d  # 64 uncached tokens: local
        policy, _ = kv_pd(reg, 63)
        assert await policy([p, d], LONG) == Pair(p, d)

        # Which P: the one holding the prefix wins over an idler one (the TTFT estimate).
        reg2 = EmbeddedRegistry()
        await reg2.add_blocks("p2@i1", HASHES)
        policy, kv = kv_pd(reg2, 0)
        p1, p2 = Cand("p1", "prefill"), Cand("p2", "prefill", outstanding=1)
        assert await policy([p1, p2, d], LONG) == Pair(p2, d)
        # Both count as holding the prompt a while: P prefilled it, D got its blocks.
        assert kv.speculative.run("p2", HASHES) == 64 and kv.speculative.run("d", HASHES) == 64

    asyncio.run(main())


def test_kv_aware_without_its_locator_pairs_by_least_load() -> None:
    async def main() -> None:
        policy, _ = kv_pd(Broken(), 512)
        p, d1, d2 = Cand("p", "prefill"), Cand("d1", "decode", outstanding=1), Cand("d2", "decode")
        assert await policy([p, d1, d2], LONG) == Pair(p, d2)  # nothing cached is known: 1024 > 512
        assert await policy([p, d1, d2], SHORT) is d2

    asyncio.run(main())

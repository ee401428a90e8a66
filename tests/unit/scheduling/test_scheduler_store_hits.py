"""Admission with a KV store lease: which blocks are loaded, when a load is voided, and that every
lease comes back exactly once (loaded, unused, or its request gone)."""

from __future__ import annotations

from trellis.core.plan import StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.scheduling.block_manager import BlockEvent, BlockEventKind
from trellis.scheduling.scheduler import Scheduler, SchedulerConfig
from trellis.scheduling.sequence import StoreHit

B = 4
GREEDY = SamplingParams(max_tokens=3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scheduler(clock: Clock, num_blocks: int = 64) -> Scheduler:
    cfg = SchedulerConfig(
        num_blocks=num_blocks, block_size=B, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128
    )
    return Scheduler(cfg, clock=clock)


def hit(first: int, n: int, *, expires: float = 1030.0, slab: str = "/slab-a", lease: str = "L") -> StoreHit:
    return StoreHit(lease, first, tuple(range(100, 100 + n)), expires, slab)


def answer(plan: StepPlan, *, kv_failed: bool = False) -> StepResult:
    sampled = [s.seq_id for s in plan.seqs if s.sample]
    return StepResult(plan.step_id, tuple(sampled), tuple(7 for _ in sampled), kv_failed=kv_failed)


def test_loads_the_leased_blocks_and_leaves_one_token() -> None:
    clock = Clock()
    s = scheduler(clock)
    prompt = tuple(range(1, 14))  # 13 tokens: 3 full blocks, and the last token must be computed
    s.add(0, prompt, GREEDY, store_hit=hit(0, 3))
    plan = s.schedule()
    assert plan is not None and plan.kv_slab == "/slab-a"
    (load,) = plan.kv_loads
    table = s.block_table(0)
    assert load.block_ids == table[:3] and load.slots == (100, 101, 102)
    (step,) = plan.seqs
    assert step.start_pos == 12 and step.token_ids == (13,)
    assert s.take_released_leases() == []  # held until the step returns
    updates = s.complete(answer(plan))
    assert updates[0].new_token_ids == (7,)
    assert s.take_released_leases() == ["L"]
    assert s.stats()["store_loaded_blocks"] == 3


def test_a_full_prompt_hit_still_computes_its_last_block() -> None:
    s = scheduler(Clock())
    s.add(0, tuple(range(1, 13)), GREEDY, store_hit=hit(0, 3))  # 12 tokens = 3 blocks, all in the store
    plan = s.schedule()
    assert plan is not None
    assert len(plan.kv_loads[0].block_ids) == 2 and plan.seqs[0].start_pos == 8


def test_a_failed_copy_voids_the_step_and_recomputes_without_the_store() -> None:
    clock = Clock()
    s = scheduler(clock)
    s.add(0, tuple(range(1, 14)), GREEDY, store_hit=hit(0, 3))
    plan = s.schedule()
    assert plan is not None
    assert s.complete(answer(plan, kv_failed=True)) == []  # nothing emitted
    assert s.take_released_leases() == ["L"]
    again = s.schedule()
    assert again is not None and not again.kv_loads
    assert again.seqs[0].start_pos == 0 and len(again.seqs[0].token_ids) == 13
    assert s.stats()["store_voided_loads"] == 1 and s.stats()["preemptions"] == 0


def test_a_lease_that_expired_before_the_step_returned_voids_it() -> None:
    clock = Clock()
    s = scheduler(clock)
    s.add(0, tuple(range(1, 14)), GREEDY, store_hit=hit(0, 3, expires=1005.0))
    plan = s.schedule()
    assert plan is not None and plan.kv_loads
    clock.now = 1006.0
    assert s.complete(answer(plan)) == []
    assert s.schedule().seqs[0].start_pos == 0  # type: ignore[union-attr]


def test_a_lease_near_expiry_is_not_loaded_from_but_released() -> None:
    clock = Clock()
    s = scheduler(clock)
    s.add(0, tuple(range(1, 14)), GREEDY, store_hit=hit(0, 3, expires=1001.0))
    plan = s.schedule()
    assert plan is not None and not plan.kv_loads and plan.seqs[0].start_pos == 0
    assert s.take_released_leases() == ["L"]


def test_local_blocks_come_first_and_only_the_rest_is_loaded() -> None:
    s = scheduler(Clock())
    prompt = tuple(range(1, 18))  # 17 tokens: 4 full blocks
    s.add(0, prompt, GREEDY)
    first = s.schedule()
    assert first is not None
    s.complete(answer(first))  # blocks 0..3 are now cached here
    s.abort(0)
    s.add(1, (*prompt, 50, 51, 52, 53), GREEDY, store_hit=hit(2, 3))  # store holds blocks 2, 3, 4
    plan = s.schedule()
    assert plan is not None
    (load,) = plan.kv_loads
    assert load.slots == (102,)  # only block 4: blocks 0..3 are local
    assert plan.seqs[0].start_pos == 20


def test_one_slab_per_plan() -> None:
    s = scheduler(Clock())
    s.add(0, tuple(range(1, 14)), GREEDY, store_hit=hit(0, 3, slab="/a", lease="A"))
    s.add(1, tuple(range(30, 43)), GREEDY, store_hit=hit(0, 3, slab="/b", lease="B"))
    plan = s.schedule()
    assert plan is not None and plan.kv_slab == "/a" and len(plan.kv_loads) == 1
    assert s.take_released_leases() == ["B"]  # seq 1 recomputes; its lease goes back now


def test_a_request_aborted_before_admission_gives_its_lease_back() -> None:
    s = scheduler(Clock(), num_blocks=4)
    s.add(0, tuple(range(1, 14)), GREEDY)  # takes every block
    s.add(1, tuple(range(30, 43)), GREEDY, store_hit=hit(0, 3))
    s.schedule()
    s.abort(1)
    assert s.take_released_leases() == ["L"]


def test_block_events() -> None:
    s = scheduler(Clock())
    seen: list[BlockEvent] = []
    s.block_manager.add_listener(seen.append)
    s.add(0, tuple(range(1, 10)), GREEDY)
    plan = s.schedule()
    assert plan is not None
    s.complete(answer(plan))
    reg = [e for e in seen if e.kind is BlockEventKind.REGISTERED]
    assert len(reg) == 1 and len(reg[0].hashes) == 2 and reg[0].parents == (0, reg[0].hashes[0])
    s.add(1, tuple(range(1, 10)), GREEDY)
    s.schedule()
    hits = [e for e in seen if e.kind is BlockEventKind.HIT]
    assert hits and hits[0].hashes == reg[0].hashes
    assert s.block_manager.cached_run(reg[0].hashes) == 2


def test_reset_prefix_cache_forgets_free_blocks_only() -> None:
    s = scheduler(Clock())
    s.add(0, tuple(range(1, 10)), GREEDY)
    plan = s.schedule()
    assert plan is not None
    s.complete(answer(plan))
    bm = s.block_manager
    names = s._seqs[0].block_hashes[:2]
    assert bm.reset_prefix_cache() == 0  # seq 0 still holds its blocks
    s.abort(0)
    seen: list[BlockEvent] = []
    bm.add_listener(seen.append)
    assert bm.reset_prefix_cache() == 2
    assert bm.cached_run(names) == 0 and seen[0].kind is BlockEventKind.EVICTED
    assert bm.num_free_blocks == bm.num_blocks

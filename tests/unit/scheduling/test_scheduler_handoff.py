"""P/D in the scheduler: the prefill side copies each block once it is complete and finishes with
the checksums; the decode side reserves, commits, loads the staged blocks before its first step and
voids a load whose checksums differ (then recomputes). Nothing leaks: free blocks and staging slots
come back on every path."""

from __future__ import annotations

import pytest

from trellis.core.handoff_api import QUARANTINE_S, HandoffError, HandoffTarget
from trellis.core.plan import StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.scheduling.pd_requests import NoRoomError
from trellis.scheduling.scheduler import Scheduler, SchedulerConfig
from trellis.scheduling.sequence import FinishReason, HandoffOut
from trellis.scheduling.staging_slots import StagingSlots

B = 4
GREEDY = SamplingParams(max_tokens=5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scheduler(clock: Clock, *, budget: int = 64, num_blocks: int = 32, slots: int = 16) -> Scheduler:
    cfg = SchedulerConfig(
        num_blocks=num_blocks, block_size=B, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=128
    )
    s = Scheduler(cfg, clock=clock)
    s.handoffs.staging = StagingSlots(slots, clock)
    s.handoffs.slab = "/dev/shm/d-slab"
    return s


def answer(plan: StepPlan, token: int = 7, sums: tuple[int, ...] | None = None) -> StepResult:
    """A result whose checksums are the slot numbers plus 1000 (what a fake copy would sum)."""
    sampled = [s.seq_id for s in plan.seqs if s.sample]
    if sums is None:
        sums = tuple(1000 + slot for c in plan.summed_copies for slot in c.slots)
    return StepResult(plan.step_id, tuple(sampled), tuple(token for _ in sampled), kv_sums=sums)


def target(first: int, n: int, deadline: float = 2000.0) -> HandoffTarget:
    return HandoffTarget("/dev/shm/d-slab", first, tuple(range(50, 50 + n)), B, "fp", deadline)


def test_prefill_side_sends_each_block_after_the_step_that_completes_it() -> None:
    s = scheduler(Clock(), budget=8)
    prompt = tuple(range(1, 15))  # 14 tokens: 3 full blocks and a partial one
    s.add(0, prompt, GREEDY, handoff=HandoffOut("t1"))
    assert s.attach(0, target(0, 4))
    p1 = s.schedule()
    assert p1 is not None
    (send,) = p1.kv_sends  # chunk 1 feeds tokens 0..7: blocks 0 and 1 complete in it
    assert (
        send.slots == (50, 51) and send.block_ids == s.block_table(0)[:2] and send.slab == "/dev/shm/d-slab"
    )
    assert s.complete(answer(p1)) == []
    p2 = s.schedule()
    assert p2 is not None and p2.kv_sends[0].slots == (52, 53)  # the rest, the partial block too
    (update,) = s.complete(answer(p2))
    assert update.finished and update.finish_reason is FinishReason.HANDOFF
    assert update.new_token_ids == (7,) and update.block_sums == (1050, 1051, 1052, 1053)
    assert s.stats()["free_blocks"] == 32 and not s.has_work()


def test_prefill_waits_for_its_target_then_copies_in_a_plan_of_its_own() -> None:
    s = scheduler(Clock())
    s.add(0, tuple(range(1, 10)), GREEDY, handoff=HandoffOut("t1"))
    p1 = s.schedule()
    assert p1 is not None and p1.kv_sends == ()
    (first,) = s.complete(answer(p1))
    assert first.new_token_ids == (7,) and not first.finished
    assert s.schedule() is None  # parked: never decoded here
    s.attach(0, target(1, 2))  # D holds block 0 already
    p2 = s.schedule()
    assert p2 is not None and p2.seqs == () and p2.kv_sends[0].slots == (50, 51)
    (done,) = s.complete(answer(p2))
    assert done.finished and done.new_token_ids == () and done.block_sums == (1050, 1051)


def test_no_target_decodes_here_and_a_failed_copy_too() -> None:
    s = scheduler(Clock())
    s.add(0, tuple(range(1, 10)), GREEDY, handoff=HandoffOut("t1"))
    s.attach(0, None)
    p1 = s.schedule()
    assert p1 is not None
    s.complete(answer(p1))
    p2 = s.schedule()
    assert p2 is not None and p2.seqs[0].token_ids == (7,)  # decoding here
    s2 = scheduler(Clock())
    s2.add(0, tuple(range(1, 10)), GREEDY, handoff=HandoffOut("t2"))
    s2.attach(0, target(0, 3))
    p = s2.schedule()
    assert p is not None
    failed = StepResult(p.step_id, (0,), (7,), kv_failed=True)
    (u,) = s2.complete(failed)
    assert not u.finished
    nxt = s2.schedule()
    assert nxt is not None and nxt.seqs[0].token_ids == (7,) and nxt.kv_sends == ()


def test_a_target_of_another_shape_is_refused_and_decoded_here() -> None:
    s = scheduler(Clock())
    s.add(0, tuple(range(1, 10)), GREEDY, handoff=HandoffOut("t1"))
    with pytest.raises(HandoffError):
        s.attach(0, target(0, 2))  # 9 tokens are 3 blocks
    with pytest.raises(HandoffError):
        s.attach(0, target(3, 0))  # no slot: nothing would ever finish it
    p = s.schedule()
    assert p is not None and p.kv_sends == ()


def test_a_target_past_its_deadline_is_not_written() -> None:
    clock = Clock()
    s = scheduler(clock)
    s.add(0, tuple(range(1, 10)), GREEDY, handoff=HandoffOut("t1"))
    s.attach(0, target(0, 3, deadline=1000.5))
    p = s.schedule()
    assert p is not None and p.kv_sends == ()


def test_decode_side_reserves_loads_and_checks() -> None:
    clock = Clock()
    s = scheduler(clock)
    prompt = tuple(range(1, 11))  # 10 tokens: 3 blocks
    first, slots = s.reserve(5, prompt, "t1", 1030.0, [])
    assert first == 0 and len(slots) == 3
    assert s.stats()["free_blocks"] == 29 and s.schedule() is None  # reserved, not runnable
    s.commit(5, prompt, GREEDY, 9, tuple(1000 + x for x in slots))
    p = s.schedule()
    assert p is not None
    (load,) = p.kv_loads
    assert load.slab == "/dev/shm/d-slab" and load.slots == slots and load.block_ids == s.block_table(5)
    (step,) = p.seqs
    assert step.start_pos == 10 and step.token_ids == (9,) and step.output_index == 1
    (u,) = s.complete(answer(p, token=3))
    assert u.new_token_ids == (3,)
    assert s.handoffs.staging is not None and s.handoffs.staging.counts()["free"] == 16


def test_decode_side_voids_a_load_whose_checksums_differ_and_recomputes() -> None:
    s = scheduler(Clock())
    prompt = tuple(range(1, 11))
    _, slots = s.reserve(5, prompt, "t1", 1030.0, [])
    s.commit(5, prompt, GREEDY, 9, tuple(1000 + x for x in slots))
    p = s.schedule()
    assert p is not None
    bad = (*(1000 + x for x in slots[:-1]), 0)
    assert s.complete(answer(p, sums=bad)) == []  # nothing streamed from the bad bytes
    again = s.schedule()
    assert again is not None and again.kv_loads == ()
    (step,) = again.seqs
    assert step.start_pos == 0 and step.token_ids == (*prompt, 9)  # prompt + the first token
    (u,) = s.complete(answer(again, token=3))
    assert u.new_token_ids == (3,)


def test_reservations_need_room_and_give_it_back() -> None:
    clock = Clock()
    s = scheduler(clock, num_blocks=8, slots=6)
    s.reserve(1, tuple(range(1, 14)), "t1", 1030.0, [])  # 4 blocks, 4 slots
    with pytest.raises(NoRoomError, match="blocks free"):
        s.reserve(2, tuple(range(1, 21)), "t2", 1030.0, [])  # 5 blocks > the 4 left
    with pytest.raises(NoRoomError, match="staging slots"):
        s.reserve(3, tuple(range(1, 10)), "t3", 1030.0, [])  # 3 slots > the 2 left
    assert s.drop_reserved(1) and not s.drop_reserved(1)
    assert s.stats()["free_blocks"] == 8
    staging = s.handoffs.staging
    assert staging is not None and staging.counts() == {"free": 2, "held": 0, "quarantined": 4}
    clock.now = 1030.0 + QUARANTINE_S
    assert staging.num_free == 6


def test_commit_checks_the_reservation() -> None:
    s = scheduler(Clock())
    prompt = tuple(range(1, 11))
    s.reserve(5, prompt, "t1", 1030.0, [])
    with pytest.raises(HandoffError):
        s.commit(5, prompt[:-1], GREEDY, 9, (1, 2, 3))
    with pytest.raises(HandoffError):
        s.commit(5, prompt, GREEDY, 9, (1, 2))
    with pytest.raises(HandoffError):
        s.commit(6, prompt, GREEDY, 9, (1, 2, 3))


def test_staging_slots_come_back_in_order() -> None:
    clock = Clock()
    slots = StagingSlots(8, clock)
    a = slots.take(4)
    assert a == (0, 1, 2, 3)
    slots.release(a)
    b = slots.take(3)
    assert b == (0, 1, 2)  # the lowest, ascending: one run, whatever order they came back in
    slots.release((2, 0, 1), not_before=clock.now + 1)  # quarantined, then thawed
    assert slots.take(6) is None  # 5 free now
    clock.now += 2
    assert slots.take(5) == (0, 1, 2, 3, 4)


def test_an_aborted_reservation_is_quarantined_past_the_abort_not_the_deadline() -> None:
    clock = Clock()
    s = scheduler(clock, slots=4)
    s.reserve(1, tuple(range(1, 14)), "t1", 1030.0, [])
    assert s.drop_reserved(1, aborted_at=1001.0)
    staging = s.handoffs.staging
    assert staging is not None and staging.counts()["quarantined"] == 4
    clock.now = 1001.0 + QUARANTINE_S
    assert staging.num_free == 4  # not 1030 + 5

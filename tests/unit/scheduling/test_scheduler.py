"""The scheduler driven by a fake pipeline whose output depends on reading the right KV slots.

The fake model keeps, per seq, a block table rebuilt from the plans' diffs exactly as a stage
does, and a KV cache where slot (block, offset) holds a digest of every token up to that position
(as a transformer's KV depends on the whole prefix). Each step reads the previous position's
digest through the table, so a wrong table, a block overwritten by another sequence, or a prefix
block shared before it was computed changes the tokens. Every sequence must produce exactly what
it produces when run alone.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from trellis.core.plan import StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.scheduling.scheduler import (
    InvalidRequestError,
    Scheduler,
    SchedulerConfig,
    SchedulerConfigError,
    SchedulerError,
)

VOCAB = 40
EOS = 0
DIGEST_SEED = 12345
MAX_TICKS = 200_000


def mix(digest: int, token: int) -> int:
    return (digest * 1_000_003 + token + 1) % (2**61 - 1)


def run_alone(prompt: tuple[int, ...], sp: SamplingParams, cfg: SchedulerConfig) -> tuple[list[int], str]:
    """The reference: the fake model generating for one sequence with the whole machine to itself."""
    digest = DIGEST_SEED
    for token in prompt:
        digest = mix(digest, token)
    out: list[int] = []
    while True:
        token = digest % VOCAB
        out.append(token)
        total = len(prompt) + len(out)
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in cfg.eos_token_ids):
            return out, "stop"
        if len(out) >= sp.max_tokens or total >= cfg.max_model_len:
            return out, "length"
        if total > cfg.num_blocks * cfg.block_size:
            return out, "too_long"
        digest = mix(digest, token)


class FakeStages:
    """What the whole pipeline does with a plan, checking every diff against the scheduler."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.block_size = sched.config.block_size
        self.kv: dict[int, int] = {}  # slot -> digest of the tokens up to that position
        self.tables: dict[int, list[int]] = {}
        self.known: dict[int, list[int]] = {}  # prompt + sampled tokens, as the stages know them
        self.prompt_len: dict[int, int] = {}

    def slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, plan: StepPlan) -> StepResult:
        for sid in plan.finished:
            del self.tables[sid], self.known[sid], self.prompt_len[sid]
        for req in plan.new_requests:
            assert req.seq_id not in self.tables, f"seq {req.seq_id} announced twice"
            self.tables[req.seq_id], self.known[req.seq_id] = [], list(req.prompt_ids)
            self.prompt_len[req.seq_id] = len(req.prompt_ids)
        owners = self._block_owners()
        seq_ids, tokens = [], []
        for step in plan.seqs:
            table, known = self.tables[step.seq_id], self.known[step.seq_id]
            assert step.block_table_start <= len(table), "a diff must not leave a hole in the table"
            table[step.block_table_start :] = step.new_blocks
            assert tuple(table) == self.sched.block_table(step.seq_id)  # the stage's table is current
            end = step.start_pos + len(step.token_ids)
            assert step.token_ids and step.token_ids == tuple(known[step.start_pos : end])
            assert step.sample == (end == len(known))  # only the chunk reaching the end samples
            assert step.output_index == len(known) - self.prompt_len[step.seq_id]
            digest = self.kv[self.slot(table, step.start_pos - 1)] if step.start_pos else DIGEST_SEED
            for pos, token in enumerate(step.token_ids, start=step.start_pos):
                block = table[pos // self.block_size]
                assert owners[block] == [step.seq_id], f"seq {step.seq_id} writes shared block {block}"
                assert self.sched.block_manager.ref_count(block) == 1
                digest = mix(digest, token)
                self.kv[self.slot(table, pos)] = digest
            if step.sample:
                seq_ids.append(step.seq_id)
                tokens.append(digest % VOCAB)
                known.append(tokens[-1])
                # A decode burst feeds each sampled token back, in slots the plan already holds.
                for pos in range(end, end + plan.decode_steps - 1):
                    assert owners[table[pos // self.block_size]] == [step.seq_id]
                    digest = mix(digest, known[-1])
                    self.kv[self.slot(table, pos)] = digest
                    tokens.append(digest % VOCAB)
                    known.append(tokens[-1])
            else:
                assert plan.decode_steps == 1, "a burst holds only decodes"
        return StepResult(plan.step_id, tuple(seq_ids), tuple(tokens), steps=plan.decode_steps)

    def _block_owners(self) -> dict[int, list[int]]:
        """Block -> the live seqs whose current table (per the scheduler) holds it."""
        owners: dict[int, list[int]] = {}
        for sid in self.tables:
            try:
                table = self.sched.block_table(sid)
            except KeyError:
                continue  # finished; the next plan tells the stages
            for block in table:
                owners.setdefault(block, []).append(sid)
        return owners


@dataclass
class Request:
    tick: int
    seq_id: int
    prompt: tuple[int, ...]
    sampling: SamplingParams


@dataclass
class Outcome:
    plans: list[StepPlan] = field(default_factory=list)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    aborted: set[int] = field(default_factory=set)
    sched: Scheduler | None = None


def simulate(cfg: SchedulerConfig, requests: list[Request], aborts: dict[int, int], seed: int) -> Outcome:
    """Drive schedule()/run/complete() in a random but seeded interleaving; check every invariant."""
    rng = random.Random(seed)
    sched = Scheduler(cfg)
    stages = FakeStages(sched)
    out = Outcome(sched=sched)
    pending = deque(sorted(requests, key=lambda r: r.tick))
    to_run: deque[StepPlan] = deque()
    results: list[StepResult] = []
    outstanding: dict[int, StepPlan] = {}
    in_flight: set[int] = set()
    announced: set[int] = set()
    listed_finished: set[int] = set()
    tick = 0
    while pending or sched.has_work():
        tick += 1
        assert tick < MAX_TICKS, "no progress"
        while pending and pending[0].tick <= tick:
            req = pending.popleft()
            sched.add(req.seq_id, req.prompt, req.sampling)
            out.outputs[req.seq_id] = []
        if tick in aborts:
            sched.abort(aborts[tick])
            if aborts[tick] in out.outputs and aborts[tick] not in out.reasons:
                out.aborted.add(aborts[tick])  # it was live: nothing more may come for it
        roll = rng.random()
        if roll < 0.45:
            plan = sched.schedule()
            if plan is None:
                assert sched.num_in_flight() > 0 or not sched.has_work(), "idle pipeline got no plan"
                continue
            assert plan.step_id == len(out.plans)
            assert plan.num_tokens <= cfg.max_num_batched_tokens and len(plan.seqs) <= cfg.max_num_seqs
            ids = [s.seq_id for s in plan.seqs]
            assert len(set(ids)) == len(ids) and in_flight.isdisjoint(ids), "seq in two plans"
            assert sched.num_in_flight() <= cfg.max_in_flight
            for req in plan.new_requests:
                assert req.seq_id not in announced and req.seq_id in ids
                announced.add(req.seq_id)
            assert announced.issuperset(ids)
            for sid in plan.finished:
                assert sid in announced and sid not in listed_finished and sid not in ids
                assert sid in out.reasons or sid in out.aborted
                listed_finished.add(sid)
            in_flight.update(ids)
            outstanding[plan.step_id] = plan
            out.plans.append(plan)
            to_run.append(plan)
        elif roll < 0.75 and to_run:
            results.append(stages.run(to_run.popleft()))  # stages run plans in issue order
        elif results:
            result = results.pop(0 if rng.random() < 0.6 else rng.randrange(len(results)))
            plan = outstanding.pop(result.step_id)
            in_flight.difference_update(s.seq_id for s in plan.seqs)
            updates = sched.complete(result)
            expected = [sid for sid in result.seq_ids if sid not in out.aborted and sid not in out.reasons]
            assert [u.seq_id for u in updates] == expected
            for upd in updates:
                out.outputs[upd.seq_id].extend(upd.new_token_ids)
                if upd.finished:
                    out.reasons[upd.seq_id] = str(upd.finish_reason)
    stats = sched.stats()
    assert stats["free_blocks"] == cfg.num_blocks and stats["waiting"] == stats["running"] == 0
    assert len(listed_finished) + stats["pending_finished"] == len(announced)
    return out


def check_against_reference(cfg: SchedulerConfig, requests: list[Request], out: Outcome) -> None:
    for req in requests:
        want, reason = run_alone(req.prompt, req.sampling, cfg)
        got = out.outputs[req.seq_id]
        if req.seq_id in out.aborted and req.seq_id not in out.reasons:
            assert got == want[: len(got)], f"seq {req.seq_id} diverged before its abort"
        else:
            assert (got, out.reasons[req.seq_id]) == (want, reason), f"seq {req.seq_id} diverged"


def random_workload(rng: random.Random, cfg: SchedulerConfig, n: int) -> list[Request]:
    """Prompts drawn from a few shared prefixes (so the prefix cache matters) plus random tails."""
    limit = min(cfg.max_model_len - 1, cfg.num_blocks * cfg.block_size)
    bases = [tuple(rng.randrange(1, VOCAB) for _ in range(rng.randint(1, limit))) for _ in range(3)]
    requests = []
    for seq_id in range(n):
        prompt = bases[rng.randrange(3)][: rng.randint(1, limit)] if rng.random() < 0.6 else ()
        prompt += tuple(rng.randrange(VOCAB) for _ in range(rng.randint(0 if prompt else 1, 6)))
        sampling = SamplingParams(
            max_tokens=rng.randint(1, 24),
            stop_token_ids=(rng.randrange(VOCAB),) if rng.random() < 0.3 else (),
            ignore_eos=rng.random() < 0.3,
        )
        requests.append(Request(rng.randint(0, 60), seq_id, prompt[:limit], sampling))
    return requests


def random_config(rng: random.Random, max_in_flight: int, decode_burst: int = 1) -> SchedulerConfig:
    block_size = rng.choice([1, 2, 4, 8])
    return SchedulerConfig(
        num_blocks=rng.randint(max(4, 24 // block_size), 96 // block_size),  # often scarce: preemption
        block_size=block_size,
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.choice([1, 3, 8, 16, 64]),
        max_model_len=rng.choice([16, 32, 48]),
        eos_token_ids=(EOS,),
        enable_prefix_caching=rng.random() < 0.7,
        max_in_flight=max_in_flight,
        admission_watermark=rng.choice([0.0, 0.1]),
        decode_burst=decode_burst,
    )


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_match_running_alone(seed: int, max_in_flight: int) -> None:
    rng = random.Random(seed * 10 + max_in_flight)
    cfg = random_config(rng, max_in_flight)
    requests = random_workload(rng, cfg, n=rng.randint(5, 30))
    aborts = {rng.randint(1, 400): rng.randrange(len(requests)) for _ in range(rng.randint(0, 4))}
    out = simulate(cfg, requests, aborts, seed)
    check_against_reference(cfg, requests, out)


@pytest.mark.parametrize("seed", range(40))
def test_decode_bursts_give_the_same_outputs(seed: int) -> None:
    """Greedy decode bursts (several steps on the device per plan) change nothing a client sees."""
    rng = random.Random(seed * 7 + 1)
    cfg = random_config(rng, max_in_flight=1, decode_burst=rng.choice([2, 4, 8]))
    requests = random_workload(rng, cfg, n=rng.randint(3, 20))
    aborts = {rng.randint(1, 400): rng.randrange(len(requests)) for _ in range(rng.randint(0, 2))}
    out = simulate(cfg, requests, aborts, seed)
    check_against_reference(cfg, requests, out)


def test_bursts_run_when_nobody_waits_and_stop_at_max_tokens() -> None:
    cfg = config(decode_burst=4, max_num_seqs=8, num_blocks=64)
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    requests = [Request(0, i, (3, 1, 4, 1, 5)[: i + 2], sp) for i in range(3)]
    out = simulate(cfg, requests, {}, seed=0)
    check_against_reference(cfg, requests, out)
    # the prefill step samples 1 token, then bursts of 4, 4 and the last 1 (never past max_tokens)
    assert [p.decode_steps for p in out.plans] == [1, 4, 4, 1]


def test_same_calls_give_the_same_plans() -> None:
    rng = random.Random(7)
    cfg = random_config(rng, 2)
    requests = random_workload(rng, cfg, n=20)
    first = simulate(cfg, requests, {30: 3}, seed=5).plans
    assert first == simulate(cfg, requests, {30: 3}, seed=5).plans


def config(**overrides: object) -> SchedulerConfig:
    base: dict[str, object] = dict(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
        eos_token_ids=(EOS,), admission_watermark=0.0,
    )  # fmt: skip
    return SchedulerConfig(**{**base, **overrides})  # type: ignore[arg-type]


LONG = SamplingParams(max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_scarce_blocks_preempt_and_outputs_stay_the_same(max_in_flight: int) -> None:
    cfg = config(num_blocks=12, max_model_len=48, max_in_flight=max_in_flight)
    requests = [Request(0, i, tuple(range(1 + i, 11 + i)), LONG) for i in range(6)]
    out = simulate(cfg, requests, {}, seed=max_in_flight)
    assert out.sched is not None and out.sched.stats()["preemptions"] > 0
    check_against_reference(cfg, requests, out)


def test_preempted_seq_resends_its_whole_table_but_not_its_request() -> None:
    sched = Scheduler(config(num_blocks=3, block_size=2, max_model_len=32, enable_prefix_caching=False))
    stages = FakeStages(sched)
    sched.add(0, [1, 2, 3], LONG)  # 2 blocks
    sched.add(1, [4], LONG)  # 1 block
    plans = []
    while sched.stats()["preemptions"] == 0:
        plans.append(sched.schedule())
        assert plans[-1] is not None
        sched.complete(stages.run(plans[-1]))
    assert sched.stats()["waiting"] == 1  # seq 1, the newer one, gave its block to seq 0
    while (plan := sched.schedule()) is not None and all(s.seq_id != 1 for s in plan.seqs):
        sched.complete(stages.run(plan))
    assert plan is not None
    (resumed,) = [s for s in plan.seqs if s.seq_id == 1]
    assert resumed.start_pos == 0 and resumed.block_table_start == 0
    assert len(resumed.token_ids) == 1 + resumed.output_index  # prompt + outputs so far
    assert resumed.output_index > 0 and plan.new_requests == ()


def test_an_older_seq_waits_for_a_newer_one_in_flight_rather_than_preempting_itself() -> None:
    cfg = config(num_blocks=3, block_size=2, max_num_seqs=1, max_in_flight=2, enable_prefix_caching=False)
    sched = Scheduler(cfg)
    stages = FakeStages(sched)
    sched.add(0, [1, 2], LONG)  # 1 block
    sched.add(1, [3, 4, 5, 6], LONG)  # 2 blocks: the cache is full
    older, newer = sched.schedule(), sched.schedule()
    assert older is not None and newer is not None
    sched.complete(stages.run(older))
    result = stages.run(newer)
    assert sched.schedule() is None  # seq 0 needs a block; seq 1 holds them but is in flight
    assert sched.stats()["preemptions"] == 0
    sched.complete(result)
    plan = sched.schedule()  # now seq 1 is preemptable, and it is the newer one
    assert plan is not None and [s.seq_id for s in plan.seqs] == [0]
    assert sched.stats()["preemptions"] == 1 and sched.stats()["waiting"] == 1


def test_chunked_prefill_respects_the_budget_and_samples_once() -> None:
    cfg = config(max_num_batched_tokens=8)
    sched = Scheduler(cfg)
    stages = FakeStages(sched)
    sched.add(0, list(range(1, 31)), SamplingParams(max_tokens=2, ignore_eos=True))
    chunks = []
    while (plan := sched.schedule()) is not None:
        assert plan.num_tokens <= 8
        chunks.append((plan.seqs[0].start_pos, len(plan.seqs[0].token_ids), plan.seqs[0].sample))
        sched.complete(stages.run(plan))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 8, False), (24, 6, True), (30, 1, True)]


def test_decodes_go_first_then_prefill_takes_the_rest_of_the_budget() -> None:
    sched = Scheduler(config(max_num_batched_tokens=10, max_in_flight=2))
    stages = FakeStages(sched)
    sched.add(0, list(range(1, 31)), LONG)
    sched.add(1, [1, 2], LONG)
    chunk, short = sched.schedule(), sched.schedule()  # seq 0's first chunk; seq 1 behind it
    assert chunk is not None and short is not None
    assert [(s.seq_id, len(s.token_ids)) for s in short.seqs] == [(1, 2)]
    sched.complete(stages.run(chunk))
    sched.complete(stages.run(short))
    plan = sched.schedule()  # seq 1 decodes, though it arrived after seq 0 (still prefilling)
    assert plan is not None
    assert [(s.seq_id, len(s.token_ids), s.sample) for s in plan.seqs] == [(1, 1, True), (0, 9, False)]
    sched.add(2, [3, 4, 5], LONG)
    nxt = sched.schedule()
    assert nxt is not None and [s.seq_id for s in nxt.seqs] == [2]
    assert sched.schedule() is None  # two plans in flight


def test_in_flight_plans_are_disjoint_and_capped() -> None:
    sched = Scheduler(config(max_num_seqs=2, max_in_flight=2))
    for i in range(5):
        sched.add(i, [i + 1, i + 2], LONG)
    first, second = sched.schedule(), sched.schedule()
    assert first is not None and second is not None
    assert [s.seq_id for s in first.seqs] == [0, 1] and [s.seq_id for s in second.seqs] == [2, 3]
    assert sched.schedule() is None and sched.num_in_flight() == 2
    sched.complete(StepResult(second.step_id, (2, 3), (5, 6)))  # out of order is fine
    third = sched.schedule()
    assert third is not None and [s.seq_id for s in third.seqs] == [2, 3]  # 0, 1 still in flight


def test_prefix_is_shared_only_after_its_step_completed() -> None:
    sched = Scheduler(config(max_in_flight=2))
    stages = FakeStages(sched)
    prefix = list(range(1, 17))  # 4 full blocks
    sched.add(0, prefix, LONG)
    first = sched.schedule()
    assert first is not None
    sched.add(1, [*prefix, 30], LONG)
    early = sched.schedule()  # seq 0's KV is not written yet: no sharing
    assert early is not None and early.seqs[0].start_pos == 0
    sched.complete(stages.run(first))
    sched.complete(stages.run(early))
    sched.add(2, [*prefix, 31, 32], LONG)
    plan = sched.schedule()
    assert plan is not None
    (late,) = [s for s in plan.seqs if s.seq_id == 2]
    assert late.start_pos == 16 and late.token_ids == (31, 32)
    assert late.new_blocks[:4] == sched.block_table(0)[:4]  # shared entries are in the diff too
    assert sched.stats()["prefix_hit_tokens"] == 16


def test_aborts_free_blocks_now_or_when_the_step_returns() -> None:
    sched = Scheduler(config(max_num_seqs=1, max_in_flight=2))
    stages = FakeStages(sched)
    sched.add(0, [1, 2, 3, 4, 5], LONG)
    sched.add(1, [6, 7, 8], LONG)
    sched.add(2, [9], LONG)
    plan0, plan1 = sched.schedule(), sched.schedule()
    assert plan0 is not None and plan1 is not None
    result0 = stages.run(plan0)
    sched.complete(stages.run(plan1))
    sched.abort(1)  # not in flight: freed now
    assert sched.stats()["free_blocks"] == 64 - 2
    sched.abort(0)  # in flight: freed when its step returns, and its token is dropped
    sched.abort(2)  # never scheduled: just gone
    sched.abort(2)  # idempotent
    assert sched.stats()["free_blocks"] == 64 - 2
    assert sched.complete(result0) == []
    assert sched.stats()["free_blocks"] == 64 and not sched.has_work()
    sched.add(3, [1], LONG)
    plan = sched.schedule()
    assert plan is not None and sorted(plan.finished) == [0, 1]  # 2 was never announced


def test_length_limits_and_cache_smaller_than_context() -> None:
    for cfg, prompt, reason in [
        (config(max_model_len=8), [1, 2, 3, 4, 5], "length"),
        (config(num_blocks=2, block_size=4, max_model_len=32), [1, 2, 3, 4, 5], "too_long"),
    ]:
        out = simulate(cfg, [Request(0, 0, tuple(prompt), LONG)], {}, seed=0)
        assert out.reasons[0] == reason and len(prompt) + len(out.outputs[0]) in (8, 9)
        check_against_reference(cfg, [Request(0, 0, tuple(prompt), LONG)], out)


def test_stop_and_eos_tokens_finish_with_stop() -> None:
    cfg = config()
    want, _ = run_alone((1, 2, 3), SamplingParams(max_tokens=30, ignore_eos=True), cfg)
    stop = want[3]
    sampling = SamplingParams(max_tokens=30, stop_token_ids=(stop,), ignore_eos=True)
    out = simulate(cfg, [Request(0, 0, (1, 2, 3), sampling)], {}, seed=0)
    assert out.reasons[0] == "stop" and out.outputs[0][-1] == stop
    eos_cfg = config(eos_token_ids=(stop,))
    out = simulate(eos_cfg, [Request(0, 0, (1, 2, 3), SamplingParams(max_tokens=30))], {}, seed=0)
    assert out.reasons[0] == "stop" and out.outputs[0][-1] == stop


def test_requests_that_can_never_run_are_rejected_clearly() -> None:
    sched = Scheduler(config(max_model_len=512, num_blocks=200))
    with pytest.raises(InvalidRequestError, match=r"^the prompt has 600 tokens; the context is 512$"):
        sched.add(0, [1] * 600, LONG)
    with pytest.raises(ValueError, match="the prompt has 512 tokens; the context is 512"):
        sched.add(0, [1] * 512, LONG)
    with pytest.raises(ValueError, match="needs 10 KV blocks, the cache holds 8"):
        Scheduler(config(num_blocks=8)).add(0, [1] * 40, LONG)
    with pytest.raises(ValueError, match="the prompt is empty"):
        sched.add(0, [], LONG)
    with pytest.raises(ValueError, match="token id -1"):
        sched.add(0, [1, -1], LONG)
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        sched.add(0, [1], SamplingParams(max_tokens=0))
    sched.add(0, [1], LONG)
    with pytest.raises(ValueError, match="seq 0 is already scheduled"):
        sched.add(0, [1], LONG)
    assert sched.stats()["waiting"] == 1


def test_bad_results_and_configs_are_refused() -> None:
    sched = Scheduler(config())
    sched.add(0, [1, 2], LONG)
    plan = sched.schedule()
    assert plan is not None
    with pytest.raises(SchedulerError, match="step 9, which is not outstanding"):
        sched.complete(StepResult(9, (0,), (1,)))
    with pytest.raises(SchedulerError, match=r"result seqs \[5\] do not match the sampled seqs \[0\]"):
        sched.complete(StepResult(plan.step_id, (5,), (1,)))
    assert sched.complete(StepResult(plan.step_id, (0,), (1,)))[0].new_token_ids == (1,)
    with pytest.raises(SchedulerConfigError, match="block_size must be >= 1, got 0; max_in_flight"):
        config(block_size=0, max_in_flight=0)

"""Step plans and results to and from protobuf bytes, for the UCX planes and the TP broadcast."""

from __future__ import annotations

from collections.abc import Iterable

from trellis.core.plan import KVCopy, NewRequest, SeqStep, StepPlan, StepResult, TokenLogprob
from trellis.core.sampling import SamplingParams
from trellis.v1 import plan_pb2, sampling_pb2


def sampling_to_pb(p: SamplingParams) -> sampling_pb2.SamplingParams:
    msg = sampling_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        max_tokens=p.max_tokens,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def sampling_from_pb(m: sampling_pb2.SamplingParams, *, default_max_tokens: int = 16) -> SamplingParams:
    """Unset optional fields take their defaults: top_p 1, max_tokens the server's default."""
    return SamplingParams(
        temperature=m.temperature,
        top_p=m.top_p if m.HasField("top_p") else 1.0,
        top_k=m.top_k,
        seed=m.seed if m.HasField("seed") else None,
        max_tokens=m.max_tokens if m.HasField("max_tokens") else default_max_tokens,
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        logprobs=m.logprobs if m.HasField("logprobs") else None,
    )


def logprob_to_pb(lp: TokenLogprob) -> sampling_pb2.TokenLogprob:
    return sampling_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_ids=[t for t, _ in lp.top],
        top_logprobs=[v for _, v in lp.top],
    )


def logprob_from_pb(m: sampling_pb2.TokenLogprob) -> TokenLogprob:
    if len(m.top_ids) != len(m.top_logprobs):
        raise ValueError(f"a token logprob has {len(m.top_ids)} top ids but {len(m.top_logprobs)} values")
    return TokenLogprob(m.token_id, m.logprob, tuple(zip(m.top_ids, m.top_logprobs, strict=True)))


def logprobs_from_pb(ms: Iterable[sampling_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(logprob_from_pb(m) for m in ms)


def plan_to_pb(plan: StepPlan) -> plan_pb2.StepPlan:
    return plan_pb2.StepPlan(
        step_id=plan.step_id,
        seqs=[
            plan_pb2.SeqStep(
                seq_id=s.seq_id,
                start_pos=s.start_pos,
                token_ids=s.token_ids,
                block_table_start=s.block_table_start,
                new_blocks=s.new_blocks,
                sample=s.sample,
                output_index=s.output_index,
            )
            for s in plan.seqs
        ],
        new_requests=[
            plan_pb2.NewRequest(seq_id=r.seq_id, prompt_ids=r.prompt_ids, sampling=sampling_to_pb(r.sampling))
            for r in plan.new_requests
        ],
        finished=plan.finished,
        return_logits=plan.return_logits,
        decode_steps=plan.decode_steps,
        kv_slab=plan.kv_slab,
        kv_loads=[_copy_to_pb(c) for c in plan.kv_loads],
        kv_saves=[_copy_to_pb(c) for c in plan.kv_saves],
        kv_sends=[_copy_to_pb(c) for c in plan.kv_sends],
    )


def plan_from_pb(m: plan_pb2.StepPlan) -> StepPlan:
    return StepPlan(
        step_id=m.step_id,
        seqs=tuple(
            SeqStep(
                seq_id=s.seq_id,
                start_pos=s.start_pos,
                token_ids=tuple(s.token_ids),
                block_table_start=s.block_table_start,
                new_blocks=tuple(s.new_blocks),
                sample=s.sample,
                output_index=s.output_index,
            )
            for s in m.seqs
        ),
        new_requests=tuple(
            NewRequest(seq_id=r.seq_id, prompt_ids=tuple(r.prompt_ids), sampling=sampling_from_pb(r.sampling))
            for r in m.new_requests
        ),
        finished=tuple(m.finished),
        return_logits=m.return_logits,
        decode_steps=m.decode_steps or 1,
        kv_slab=m.kv_slab,
        kv_loads=tuple(_copy_from_pb(c) for c in m.kv_loads),
        kv_saves=tuple(_copy_from_pb(c) for c in m.kv_saves),
        kv_sends=tuple(_copy_from_pb(c) for c in m.kv_sends),
    )


def _copy_to_pb(c: KVCopy) -> plan_pb2.KVCopy:
    return plan_pb2.KVCopy(block_ids=c.block_ids, slots=c.slots, slab=c.slab)


def _copy_from_pb(m: plan_pb2.KVCopy) -> KVCopy:
    if len(m.block_ids) != len(m.slots):
        raise ValueError(f"a KV copy lists {len(m.block_ids)} blocks but {len(m.slots)} store slots")
    return KVCopy(tuple(m.block_ids), tuple(m.slots), m.slab)


def encode_plan(plan: StepPlan) -> bytes:
    return plan_to_pb(plan).SerializeToString()


def decode_plan(data: bytes) -> StepPlan:
    m = plan_pb2.StepPlan()
    m.ParseFromString(data)
    return plan_from_pb(m)


def result_to_pb(r: StepResult) -> plan_pb2.StepResult:
    """The result's header; only the rows that asked for logprobs carry them (by row index)."""
    return plan_pb2.StepResult(
        step_id=r.step_id,
        seq_ids=r.seq_ids,
        token_ids=r.token_ids,
        steps=r.steps,
        logprobs=[
            plan_pb2.RowLogprob(row=i, logprob=logprob_to_pb(lp))
            for i, lp in enumerate(r.logprobs)
            if lp is not None
        ],
        kv_failed=r.kv_failed,
        kv_sums=r.kv_sums,
    )


def result_from_pb(m: plan_pb2.StepResult) -> StepResult:
    token_ids = tuple(m.token_ids)
    logprobs: list[TokenLogprob | None] = [None] * len(token_ids) if m.logprobs else []
    for row in m.logprobs:
        if not 0 <= row.row < len(token_ids):
            raise ValueError(f"a logprob row {row.row} is outside the result's {len(token_ids)} tokens")
        logprobs[row.row] = logprob_from_pb(row.logprob)
    return StepResult(
        step_id=m.step_id,
        seq_ids=tuple(m.seq_ids),
        token_ids=token_ids,
        steps=m.steps or 1,
        logprobs=tuple(logprobs),
        kv_failed=m.kv_failed,
        kv_sums=tuple(m.kv_sums),
    )

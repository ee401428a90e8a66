"""Log-probabilities, computed on the last stage only for the rows that ask: the sampler against
torch.log_softmax, the runner on a tiny checkpoint against transformers, the wire codecs, the
request rule, and the scheduler never bursting a request that asks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint, reference_logits
from trellis.core.errors import InvalidRequest
from trellis.core.model_config import load_model_config
from trellis.core.plan import NewRequest, SeqStep, StepPlan, StepResult, TokenLogprob
from trellis.core.request import MAX_LOGPROBS, RequestLimits, check_request
from trellis.core.sampling import SamplingParams
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import PlanError, StageRunner
from trellis.runtime.sampler import Sampler, sample_tokens
from trellis.scheduling.scheduler import Scheduler, SchedulerConfig
from trellis.wire import pipe
from trellis.wire.plan_codec import (
    decode_plan,
    encode_plan,
    logprob_from_pb,
    logprob_to_pb,
    result_from_pb,
    result_to_pb,
)

ATOL = 1e-5


def check_against(logits: torch.Tensor, lp: TokenLogprob, k: int) -> None:
    """lp is log_softmax(logits)[token] with the k best (id, logprob) of the raw distribution."""
    want = torch.log_softmax(logits.double(), dim=-1)
    assert lp.logprob == pytest.approx(want[lp.token_id].item(), abs=ATOL)
    values, ids = want.topk(k)
    assert [t for t, _ in lp.top] == ids.tolist()
    assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=ATOL)


# ---- the sampler ----------------------------------------------------------------------------------


def test_sampler_reports_log_softmax_of_the_raw_logits_only_for_rows_that_ask() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 4
    params = [
        SamplingParams(logprobs=3),
        SamplingParams(),  # asks for none
        SamplingParams(temperature=0.7, top_p=0.9, seed=11, logprobs=MAX_LOGPROBS),
        SamplingParams(temperature=2.0, top_k=5, logprobs=0),  # the token's own logprob only
        SamplingParams(temperature=1.0, seed=3),
    ]
    tokens, logprobs = Sampler(1, torch.device("cpu")).sample(logits, params, [0, 1, 2, 3, 4])
    assert len(logprobs) == 5 and logprobs[1] is None and logprobs[4] is None
    for row in (0, 2, 3):
        lp = logprobs[row]
        assert lp is not None and lp.token_id == tokens[row]
        check_against(logits[row], lp, params[row].logprobs or 0)
    assert logprobs[0].token_id == logits[0].argmax().item()  # greedy: the best is the token itself
    assert logprobs[0].top[0] == (tokens[0], pytest.approx(logprobs[0].logprob))


def test_asking_for_logprobs_does_not_change_the_tokens() -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    plain = [SamplingParams(temperature=0.9, seed=s) for s in (1, 2)] + [
        SamplingParams(temperature=1.3),
        SamplingParams(),
    ]
    asking = [dataclasses.replace(p, logprobs=5) for p in plain]
    for index in range(20):
        a = sample_tokens(logits, plain, [index] * 4, torch.Generator().manual_seed(9))
        b, lps = Sampler(9, torch.device("cpu")).sample(logits, asking, [index] * 4)
        assert a == b and [lp.token_id for lp in lps if lp is not None] == b


def test_no_row_asking_gives_no_logprobs() -> None:
    _, logprobs = Sampler(0, torch.device("cpu")).sample(torch.randn(3, 10), [SamplingParams()] * 3, [0] * 3)
    assert logprobs == ()


# ---- the runner, against transformers -------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("logprobs") / "ckpt")


def test_runner_logprobs_match_transformers(ckpt: Path) -> None:
    cfg = load_model_config(ckpt)
    runner = StageRunner(
        cfg,
        layers=(0, cfg.num_hidden_layers),
        tp=TPGroup.single(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=4,
        num_blocks=32,
        model_path=str(ckpt),
    )
    prompts = [(5, 9, 2, 7, 1, 3), (8, 8, 4)]
    sampling = [SamplingParams(logprobs=4), SamplingParams()]
    new = tuple(NewRequest(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling, strict=True)))
    seqs = (SeqStep(0, 0, prompts[0], 0, (0, 1), True), SeqStep(1, 0, prompts[1], 0, (2,), True))
    out = runner.execute(StepPlan(0, seqs, new), None)
    assert isinstance(out, StepResult) and out.logprobs[1] is None
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    check_against(reference_logits(ckpt, prompts[0]), first, 4)  # transformers' own logits
    check_against(runner.last_logits[0], first, 4)
    # A decode step: the sequence's sampling came once, in its NewRequest.
    token = out.token_ids[0]
    decode = runner.execute(StepPlan(1, (SeqStep(0, 6, (token,), 2, (), True, output_index=1),)), None)
    assert isinstance(decode, StepResult) and len(decode.logprobs) == 1 and decode.logprobs[0] is not None
    check_against(reference_logits(ckpt, (*prompts[0], token)), decode.logprobs[0], 4)
    # A burst cannot report logprobs; the scheduler never makes one for such a sequence.
    burst = StepPlan(2, (SeqStep(0, 7, (decode.token_ids[0],), 2, (), True, output_index=2),), decode_steps=2)
    with pytest.raises(PlanError, match="logprobs"):
        runner.execute(burst, None)


# ---- the wire -----------------------------------------------------------------------------------


def test_results_and_plans_carry_logprobs_over_the_wire() -> None:
    lp = TokenLogprob(7, -0.5, ((7, -0.5), (2, -1.25)))
    result = StepResult(3, (1, 2, 4), (7, 9, 5), logprobs=(lp, None, TokenLogprob(5, -3.0)))
    assert result_from_pb(result_to_pb(result)) == result
    assert result_from_pb(result_to_pb(StepResult(3, (1,), (7,)))).logprobs == ()
    msg = pipe.decode(pipe.encode(pipe.Result(result, (0.1,))))
    assert isinstance(msg, pipe.Result) and msg.result == result
    assert logprob_from_pb(logprob_to_pb(lp)) == lp
    for k in (None, 0, 20):
        sp = SamplingParams(logprobs=k)
        plan = StepPlan(0, (), (NewRequest(1, (1, 2), sp),))
        assert decode_plan(encode_plan(plan)).new_requests[0].sampling.logprobs == k


def test_a_logprob_row_outside_the_result_is_refused() -> None:
    m = result_to_pb(StepResult(0, (1,), (7,), logprobs=(TokenLogprob(7, -1.0),)))
    m.logprobs[0].row = 3
    with pytest.raises(ValueError, match="logprob row 3"):
        result_from_pb(m)


# ---- the request rule and the scheduler -----------------------------------------------------------


@pytest.mark.parametrize("k", [-1, MAX_LOGPROBS + 1])
def test_logprobs_out_of_range_is_refused_naming_the_field(k: int) -> None:
    limits = RequestLimits(vocab_size=100, max_model_len=64)
    with pytest.raises(InvalidRequest, match=r"^sampling\.logprobs must be in \[0, 20\]"):
        check_request([1, 2], SamplingParams(max_tokens=4, logprobs=k), limits)
    for ok in (0, MAX_LOGPROBS, None):
        check_request([1, 2], SamplingParams(max_tokens=4, logprobs=ok), limits)


@pytest.mark.parametrize(("logprobs", "burst"), [(None, 4), (2, 1)])
def test_scheduler_never_bursts_a_request_asking_for_logprobs(logprobs: int | None, burst: int) -> None:
    cfg = SchedulerConfig(
        num_blocks=32, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
        eos_token_ids=(0,), admission_watermark=0.0, decode_burst=4,
    )  # fmt: skip
    sched = Scheduler(cfg)
    sched.add(0, [3, 4, 5], SamplingParams(max_tokens=10, ignore_eos=True, logprobs=logprobs))
    prefill = sched.schedule()
    assert prefill is not None and prefill.decode_steps == 1
    sched.complete(StepResult(prefill.step_id, (0,), (6,)))
    decode = sched.schedule()
    assert decode is not None and decode.decode_steps == burst

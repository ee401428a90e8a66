"""The scheduler's two gates a request it can never serve, a result that does not answer its plan."""

from __future__ import annotations

from trellis.core import log
from trellis.core.plan import SeqStep, StepResult
from trellis.core.request import RequestLimits, prompt_problem, sampling_problem
from trellis.core.sampling import SamplingParams
from trellis.scheduling.block_manager import blocks_for
from trellis.scheduling.scheduler_config import InvalidRequestError, SchedulerConfig, SchedulerError
from trellis.scheduling.sequence import FinishReason, Sequence

TOKEN_ID_LIMIT = 2**31  # token ids are hashed as int32


def check_fits(prompt: tuple[int, ...], sampling: SamplingParams, cfg: SchedulerConfig) -> None:
    """Raise InvalidRequestError for a request that could never be served.

    The one validator's rules (trellis.core.request), with the limits the scheduler knows: a caller
    that skipped validation still cannot queue what could never be served."""
    limits = RequestLimits(vocab_size=TOKEN_ID_LIMIT, max_model_len=cfg.max_model_len)
    if any(not isinstance(t, int) for t in prompt):
        raise InvalidRequestError(
            f"prompt token id {next(t for t in prompt if not isinstance(t, int))!r} is not an integer"
        )
    if problem := prompt_problem(prompt, limits) or sampling_problem(sampling, TOKEN_ID_LIMIT):
        raise InvalidRequestError(problem)
    if len(prompt) > cfg.num_blocks * cfg.block_size:
        need = blocks_for(len(prompt), cfg.block_size)
        raise InvalidRequestError(
            f"prompt of {len(prompt)} tokens needs {need} KV blocks, the cache holds {cfg.num_blocks}"
        )


def sampled_tokens(result: StepResult, steps: tuple[SeqStep, ...], burst: int) -> dict[int, tuple[int, ...]]:
    """The result's seq id -> its tokens, after checking it answers exactly the plan's sampled seqs."""
    if result.steps != burst or len(result.seq_ids) * burst != len(result.token_ids):
        raise SchedulerError(
            f"step {result.step_id}: {len(result.seq_ids)} seq ids and {len(result.token_ids)} tokens "
            f"in {result.steps} steps, but the plan asked for {burst} steps"
        )
    sampled = {
        sid: tuple(result.token_ids[i * burst : (i + 1) * burst]) for i, sid in enumerate(result.seq_ids)
    }
    expected = {s.seq_id for s in steps if s.sample}
    if len(sampled) != len(result.seq_ids) or sampled.keys() != expected:
        raise SchedulerError(
            f"step {result.step_id}: result seqs {sorted(result.seq_ids)} "
            f"do not match the sampled seqs {sorted(expected)}"
        )
    bad = [t for t in result.token_ids if not isinstance(t, int) or not 0 <= t < TOKEN_ID_LIMIT]
    if bad:
        raise SchedulerError(f"step {result.step_id}: token id {bad[0]!r} is not in [0, 2^31)")
    return sampled


def finish_reason(seq: Sequence, token: int, cfg: SchedulerConfig) -> FinishReason | None:
    """Why ``seq`` ends with ``token`` just appended, or None: it goes on."""
    sampling = seq.sampling
    if token in sampling.stop_token_ids:
        return FinishReason.STOP
    if not sampling.ignore_eos and token in cfg.eos_token_ids:
        return FinishReason.STOP
    if len(seq.output_ids) >= sampling.max_tokens or seq.num_tokens >= cfg.max_model_len:
        return FinishReason.LENGTH
    if seq.num_tokens > cfg.num_blocks * cfg.block_size:  # feeding the new token needs one block too many
        log.get(component="scheduler").warning(
            "kv_cache_too_small_for_seq", seq_id=seq.seq_id, num_tokens=seq.num_tokens
        )
        return FinishReason.TOO_LONG
    return None

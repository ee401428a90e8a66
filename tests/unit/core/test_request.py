"""The one request validator (trellis.core.request): each rule, and the room rule for max_tokens."""

from __future__ import annotations

import pytest

from trellis.core.errors import InvalidRequest, TrellisError
from trellis.core.request import (
    MAX_STOP_STRINGS,
    RequestLimits,
    check_request,
    prompt_problem,
    resolve_max_tokens,
    sampling_problem,
    stop_problem,
)
from trellis.core.sampling import DEFAULT_MAX_TOKENS, SamplingParams

LIMITS = RequestLimits(vocab_size=100, max_model_len=64)


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([], "the prompt is empty"),
        (list(range(64)), "the prompt has 64 tokens; the context is 64"),
        ([1, 100], "prompt token id 100 is outside the vocabulary [0, 100)"),
        ([-1], "prompt token id -1 is outside"),
    ],
)
def test_a_bad_prompt_is_named(prompt: list[int], words: str) -> None:
    assert words in prompt_problem(prompt, LIMITS)
    with pytest.raises(InvalidRequest, match="prompt"):
        check_request(prompt, SamplingParams(), LIMITS)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (SamplingParams(temperature=-0.5), "sampling.temperature"),
        (SamplingParams(temperature=float("nan")), "sampling.temperature"),
        (SamplingParams(top_p=0.0), "sampling.top_p"),
        (SamplingParams(top_p=1.5), "sampling.top_p"),
        (SamplingParams(top_k=-1), "sampling.top_k"),
        (SamplingParams(max_tokens=0), "sampling.max_tokens"),
        (SamplingParams(seed=2**63), "sampling.seed"),
        (SamplingParams(stop_token_ids=(5, 100)), "sampling.stop_token_ids"),
    ],
)
def test_bad_sampling_names_its_field(sampling: SamplingParams, field: str) -> None:
    assert sampling_problem(sampling, LIMITS.vocab_size).startswith(field)
    with pytest.raises(InvalidRequest, match=field.replace(".", r"\.")):
        check_request([1, 2, 3], sampling, LIMITS)


def test_stop_strings() -> None:
    assert stop_problem(["a", "b"]) is None
    assert "empty" in stop_problem(["a", ""])
    assert "longer than" in stop_problem(["x" * 1000])
    assert f"at most {MAX_STOP_STRINGS}" in stop_problem(["s"] * (MAX_STOP_STRINGS + 1))


def test_unset_max_tokens_takes_the_default_cut_to_the_room_left() -> None:
    assert resolve_max_tokens(10, None, LIMITS) == DEFAULT_MAX_TOKENS
    assert resolve_max_tokens(60, None, LIMITS) == 4  # 64 - 60 positions left
    assert (
        check_request([1] * 60, SamplingParams(max_tokens=999), LIMITS, max_tokens_given=False).max_tokens
        == 4
    )


def test_given_max_tokens_must_fit_the_context() -> None:
    with pytest.raises(InvalidRequest, match=r"^sampling\.max_tokens 64 is past the context of 64$"):
        check_request([1, 2], SamplingParams(max_tokens=64), LIMITS)
    assert check_request([1] * 10, SamplingParams(max_tokens=54), LIMITS).max_tokens == 54
    with pytest.raises(InvalidRequest, match=r"prompt \(10 tokens\) \+ max_tokens \(55\)"):
        check_request([1] * 10, SamplingParams(max_tokens=55), LIMITS)


def test_a_valid_request_comes_back_unchanged() -> None:
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3, max_tokens=8, stop_token_ids=(2,))
    assert check_request([1, 2, 3], sp, LIMITS) is sp


def test_invalid_request_is_in_the_error_tree() -> None:
    assert issubclass(InvalidRequest, TrellisError) and issubclass(InvalidRequest, ValueError)

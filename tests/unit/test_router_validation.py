"""Router request validation: each malformed request is refused with one line saying what is wrong."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from trellis.routing.validation import (
    MAX_REQUEST_ID_LEN,
    MAX_STOP_STRINGS,
    InvalidRequest,
    Limits,
    check_length,
    check_request,
)
from trellis.v1 import router_pb2

LIMITS = Limits(vocab_size=100, max_model_len=64, default_max_tokens=16, has_tokenizer=True)
NO_TOKENIZER = Limits(vocab_size=100, max_model_len=64, default_max_tokens=16, has_tokenizer=False)


def request(
    edit: Callable[[router_pb2.GenerateRequest], None] = lambda r: None,
) -> router_pb2.GenerateRequest:
    req = router_pb2.GenerateRequest(request_id="req-1")
    req.token_ids.ids.extend([1, 2, 3])
    edit(req)
    return req


def text(value: str) -> Callable[[router_pb2.GenerateRequest], None]:
    def edit(r: router_pb2.GenerateRequest) -> None:
        r.text = value

    return edit


def ids(*values: int) -> Callable[[router_pb2.GenerateRequest], None]:
    def edit(r: router_pb2.GenerateRequest) -> None:
        r.ClearField("token_ids")
        r.token_ids.SetInParent()  # an empty but present token_ids prompt
        r.token_ids.ids.extend(values)

    return edit


def sampling(**fields: object) -> Callable[[router_pb2.GenerateRequest], None]:
    def edit(r: router_pb2.GenerateRequest) -> None:
        for name, value in fields.items():
            if isinstance(value, list):
                getattr(r.sampling, name).extend(value)
            else:
                setattr(r.sampling, name, value)

    return edit


def stop(*strings: str) -> Callable[[router_pb2.GenerateRequest], None]:
    return lambda r: r.stop.extend(strings)


# (case id, edit, the words the message must hold)
MALFORMED: list[tuple[str, Callable[[router_pb2.GenerateRequest], None], str]] = [
    ("no prompt", lambda r: r.ClearField("token_ids"), "prompt is missing"),
    ("empty text", text(""), "prompt text is empty"),
    ("empty token ids", ids(), "token_ids is empty"),
    ("token id past the vocabulary", ids(1, 100), "token id 100 is outside the vocabulary [0, 100)"),
    ("negative token id", ids(-1, 2), "token id -1 is outside the vocabulary"),
    ("negative temperature", sampling(temperature=-0.5), "sampling.temperature must be a finite number >= 0"),
    ("NaN temperature", sampling(temperature=float("nan")), "sampling.temperature"),
    ("infinite temperature", sampling(temperature=float("inf")), "sampling.temperature"),
    ("top_p zero", sampling(top_p=0.0), "sampling.top_p must be in (0, 1]"),
    ("top_p above one", sampling(top_p=1.5), "sampling.top_p must be in (0, 1]"),
    ("top_p NaN", sampling(top_p=float("nan")), "sampling.top_p"),
    ("negative top_k", sampling(top_k=-1), "sampling.top_k must be >= 0"),
    ("max_tokens zero", sampling(max_tokens=0), "sampling.max_tokens must be > 0, got 0"),
    ("negative max_tokens", sampling(max_tokens=-5), "sampling.max_tokens must be > 0, got -5"),
    ("max_tokens past the context", sampling(max_tokens=64), "max_tokens 64 is past the context of 64"),
    ("seed of 2^63", sampling(seed=2**63), "sampling.seed must be < 2^63"),
    ("stop token id past the vocabulary", sampling(stop_token_ids=[5, 100]), "sampling.stop_token_ids: 100"),
    ("negative stop token id", sampling(stop_token_ids=[-3]), "sampling.stop_token_ids: -3"),
    ("empty stop string", stop("ok", ""), "stop contains an empty string"),
    (
        "too many stop strings",
        stop(*(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))),
        f"stop has {MAX_STOP_STRINGS + 1} strings; at most {MAX_STOP_STRINGS}",
    ),
    ("over-long stop string", stop("x" * 1000), "a stop string is longer than"),
    (
        "over-long request id",
        lambda r: setattr(r, "request_id", "r" * (MAX_REQUEST_ID_LEN + 1)),
        f"request_id is longer than {MAX_REQUEST_ID_LEN}",
    ),
]


@pytest.mark.parametrize(("edit", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_requests_are_refused_with_a_reason(
    edit: Callable[[router_pb2.GenerateRequest], None], words: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request(request(edit), LIMITS)
    assert words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: None,
        text("hello"),
        sampling(temperature=0.7, top_p=1.0, top_k=5, seed=2**63 - 1, max_tokens=63, stop_token_ids=[0, 99]),
        stop(*(f"s{i}" for i in range(MAX_STOP_STRINGS))),
        lambda r: setattr(r, "request_id", "r" * MAX_REQUEST_ID_LEN),
        lambda r: setattr(r, "request_id", ""),
    ],
    ids=[
        "token ids",
        "text",
        "every sampling field at its limit",
        "most stop strings",
        "longest id",
        "no id",
    ],
)
def test_good_requests_pass(edit: Callable[[router_pb2.GenerateRequest], None]) -> None:
    check_request(request(edit), LIMITS)


def test_text_and_stop_strings_need_a_tokenizer_but_token_ids_do_not() -> None:
    with pytest.raises(InvalidRequest, match="no tokenizer: send the prompt as token_ids"):
        check_request(request(text("hello")), NO_TOKENIZER)
    with pytest.raises(InvalidRequest, match="stop strings need the model's tokenizer"):
        check_request(request(stop("end")), NO_TOKENIZER)
    check_request(request(sampling(stop_token_ids=[7])), NO_TOKENIZER)


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "expected"),
    [
        (3, None, 16),  # the default
        (60, None, 4),  # the default, cut to what is left of the context
        (3, 61, 61),  # exactly fills the context
        (1, 1, 1),
    ],
)
def test_check_length_gives_the_max_tokens_to_ask_for(
    prompt_len: int, max_tokens: int | None, expected: int
) -> None:
    assert check_length(prompt_len, max_tokens, LIMITS) == expected


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "words"),
    [
        (64, None, "the prompt has 64 tokens; the context is 64"),
        (100, 1, "the prompt has 100 tokens"),
        (3, 62, "prompt (3 tokens) + max_tokens (62) is past the context of 64"),
    ],
)
def test_check_length_refuses_what_cannot_fit(prompt_len: int, max_tokens: int | None, words: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_length(prompt_len, max_tokens, LIMITS)
    assert words in str(err.value)

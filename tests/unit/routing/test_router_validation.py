"""Router request validation: each malformed request is refused with one line saying what is wrong.

The requests go through `Router.generate` with no replica serving: a bad one is InvalidRequest
(before admission), a good one passes validation and is refused only for want of a replica.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from trellis.core.errors import InvalidRequest, Unavailable
from trellis.core.request import MAX_REQUEST_ID_LEN, MAX_STOP_STRINGS, RequestLimits, resolve_max_tokens
from trellis.core.sampling import SamplingParams
from trellis.registry import ReplicaLoad, ReplicaView
from trellis.routing.replicas import ReplicaSet
from trellis.routing.router import Router
from trellis.routing.validation import Prompt, router_problem

LIMITS = RequestLimits(vocab_size=100, max_model_len=64)


@dataclass(frozen=True)
class Request:
    prompt: Prompt | None = (1, 2, 3)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens_given: bool = False
    stop: tuple[str, ...] = ()
    request_id: str = "req-1"


class NoReplicas:
    async def replicas(self) -> dict[str, ReplicaView]:
        return {}

    async def loads(self) -> dict[str, ReplicaLoad]:
        return {}


class WordTokenizer:
    """Enough of a tokenizer for validation: one id per word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> WordTokenizer.Encoding:
        return WordTokenizer.Encoding([1 + len(w) % 50 for w in text.split()])

    @dataclass
    class Encoding:
        ids: list[int]


def route(req: Request, *, has_tokenizer: bool = True) -> None:
    """Run the request through the router's validation; raise what it raises."""

    async def scenario() -> None:
        tokenizer = WordTokenizer() if has_tokenizer else None
        router = Router(
            ReplicaSet(NoReplicas(), lambda a: None), LIMITS, tokenizer, model_name="m", max_queue=8
        )  # type: ignore[arg-type]
        agen = router.generate(
            req.prompt,
            req.sampling,
            max_tokens_given=req.max_tokens_given,
            stop=req.stop,
            request_id=req.request_id,
        )
        await anext(agen)

    asyncio.run(scenario())


def sampling(**fields: object) -> Request:
    return Request(sampling=SamplingParams(**fields), max_tokens_given="max_tokens" in fields)  # type: ignore[arg-type]


# (case id, the request, the words the message must hold)
MALFORMED: list[tuple[str, Request, str]] = [
    ("no prompt", Request(prompt=None), "prompt is missing"),
    ("empty text", Request(prompt=""), "prompt text is empty"),
    ("empty token ids", Request(prompt=()), "token_ids is empty"),
    (
        "token id past the vocabulary",
        Request(prompt=(1, 100)),
        "token id 100 is outside the vocabulary [0, 100)",
    ),
    ("negative token id", Request(prompt=(-1, 2)), "token id -1 is outside the vocabulary"),
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
    ("seed of 2^63", sampling(seed=2**63), "sampling.seed must be in [0, 2^63)"),
    ("stop token id past the vocabulary", sampling(stop_token_ids=(5, 100)), "sampling.stop_token_ids: 100"),
    ("negative stop token id", sampling(stop_token_ids=(-3,)), "sampling.stop_token_ids: -3"),
    ("empty stop string", Request(stop=("ok", "")), "stop contains an empty string"),
    (
        "too many stop strings",
        Request(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))),
        f"stop has {MAX_STOP_STRINGS + 1} strings; at most {MAX_STOP_STRINGS}",
    ),
    ("over-long stop string", Request(stop=("x" * 1000,)), "a stop string is longer than"),
    (
        "over-long request id",
        Request(request_id="r" * (MAX_REQUEST_ID_LEN + 1)),
        f"request_id is longer than {MAX_REQUEST_ID_LEN}",
    ),
    (
        "prompt longer than the context",
        Request(prompt=(5,) * 70),
        "the prompt has 70 tokens; the context is 64",
    ),
    (
        "text longer than the context",
        Request(prompt="ab " * 64),
        "the prompt has 64 tokens; the context is 64",
    ),
    (
        "prompt and max_tokens past the context",
        Request(prompt=(1, 2, 3), sampling=SamplingParams(max_tokens=62), max_tokens_given=True),
        "prompt (3 tokens) + max_tokens (62) is past the context of 64",
    ),
]


@pytest.mark.parametrize("req, words", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_requests_are_refused_with_a_reason(req: Request, words: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        route(req)
    assert words in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "req",
    [
        Request(),
        Request(prompt="hello"),
        sampling(temperature=0.7, top_p=1.0, top_k=5, seed=2**63 - 1, max_tokens=61, stop_token_ids=(0, 99)),
        Request(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS))),
        Request(request_id="r" * MAX_REQUEST_ID_LEN),
        Request(request_id=""),
        Request(prompt=(1,) * 60),  # no max_tokens: the default, cut to the room left
    ],
    ids=[
        "token ids",
        "text",
        "every sampling field at its limit",
        "most stop strings",
        "longest id",
        "no id",
        "nearly full",
    ],
)
def test_good_requests_pass(req: Request) -> None:
    with pytest.raises(Unavailable, match="no replica is serving"):  # past validation, to admission
        route(req)


def test_text_and_stop_strings_need_a_tokenizer_but_token_ids_do_not() -> None:
    with pytest.raises(InvalidRequest, match="no tokenizer: send the prompt as token_ids"):
        route(Request(prompt="hello"), has_tokenizer=False)
    with pytest.raises(InvalidRequest, match="stop strings need the model's tokenizer"):
        route(Request(stop=("end",)), has_tokenizer=False)
    with pytest.raises(Unavailable):
        route(sampling(stop_token_ids=(7,)), has_tokenizer=False)


def test_the_router_only_checks_are_domain_typed() -> None:
    assert router_problem("id", (1, 2), (), has_tokenizer=False) is None
    assert router_problem("id", "text", ("x",), has_tokenizer=True) is None
    assert router_problem("id", None, (), has_tokenizer=True) == "prompt is missing: set text or token_ids"
    assert router_problem("id", [], (), has_tokenizer=True) == "prompt token_ids is empty"


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "expected"),
    [
        (3, None, 16),  # the default
        (60, None, 4),  # the default, cut to what is left of the context
        (3, 61, 61),  # exactly fills the context
        (1, 1, 1),
    ],
)
def test_the_max_tokens_to_ask_for(prompt_len: int, max_tokens: int | None, expected: int) -> None:
    assert resolve_max_tokens(prompt_len, max_tokens, LIMITS) == expected


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "words"),
    [
        (3, 62, "prompt (3 tokens) + max_tokens (62) is past the context of 64"),
        (10, 55, "prompt (10 tokens) + max_tokens (55) is past the context of 64"),
    ],
)
def test_what_cannot_fit_is_refused(prompt_len: int, max_tokens: int | None, words: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        resolve_max_tokens(prompt_len, max_tokens, LIMITS)
    assert words in str(err.value)

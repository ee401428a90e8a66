"""The OpenAI-compatible HTTP adapter over the Router and an in-process fake of the stages.

The official `openai` client talks to the app through httpx's ASGI transport (no socket): the field
mapping onto Router.generate (defaults, seeds per choice, logprobs, stop), the response and stream
shapes, usage, the chat template, and every refusal in OpenAI's error shape with its status.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from services.router.http_api import ApiConfig, HttpApi, create_app
from tests.fake_stages import Mesh, chunks, mesh
from trellis.core.errors import ConfigError, DeadlineExceeded
from trellis.core.plan import TokenLogprob
from trellis.core.request import RequestLimits
from trellis.core.stage_api import StageChunk
from trellis.routing.chat_template import ChatTemplate, load_chat_template

MODEL = "tiny-model"
# A template of the usual kind: bos, one block per message, the assistant's turn opened at the end.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('system must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
Scenario = Callable[[Mesh, httpx.AsyncClient, openai.AsyncOpenAI], Awaitable[None]]


@pytest.fixture(scope="module")
def limits(demo_tokenizer: Tokenizer) -> RequestLimits:
    return RequestLimits(vocab_size=demo_tokenizer.get_vocab_size(), max_model_len=256)


@asynccontextmanager
async def served(
    tokenizer: Tokenizer,
    limits: RequestLimits,
    *,
    names: tuple[str, ...] = ("r1",),
    max_queue: int = 8,
    template: ChatTemplate | None = ChatTemplate(TEMPLATE, "<s>", "</s>"),  # noqa: B008 (frozen)
    api_key: str | None = None,
) -> AsyncIterator[tuple[Mesh, httpx.AsyncClient, openai.AsyncOpenAI]]:
    m = await mesh(names, tokenizer=tokenizer, limits=limits, max_queue=max_queue)
    app = create_app(m.router, ApiConfig(MODEL, template, api_key))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        client = openai.AsyncOpenAI(
            base_url="http://test/v1", api_key=api_key or "none", http_client=http, max_retries=0
        )
        yield m, http, client


def run(tokenizer: Tokenizer, limits: RequestLimits, scenario: Scenario, **kw: object) -> None:
    async def main() -> None:
        async with served(tokenizer, limits, **kw) as (m, http, client):  # type: ignore[arg-type]
            await scenario(m, http, client)

    asyncio.run(main())


def words(tokenizer: Tokenizer, text: str) -> list[StageChunk]:
    """The head's answer: text's tokens one per chunk, finishing by length."""
    return chunks(*([t] for t in tokenizer.encode(text).ids), finish="length")


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


async def error_of(
    http: httpx.AsyncClient, path: str, body: object, **kw: object
) -> tuple[int, dict, httpx.Response]:
    resp = await http.post(path, content=body if isinstance(body, str) else json.dumps(body), **kw)  # type: ignore[arg-type]
    payload = resp.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in payload["error"]["message"] and "Traceback" not in payload["error"]["message"]
    return resp.status_code, payload["error"], resp


def test_a_completion_maps_the_fields_onto_the_router_and_answers_in_openai_shape(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = words(demo_tokenizer, "the cat sat. Then the dog ran")
        out = await client.completions.create(
            model=MODEL, prompt="once", max_tokens=20, top_p=0.9, seed=3, extra_body={"top_k": 5}, user="u"
        )
        assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
        assert [c.text for c in out.choices] == ["the cat sat. Then the dog ran"]
        assert out.choices[0].finish_reason == "length" and out.choices[0].logprobs is None
        prompt = tuple(demo_tokenizer.encode("once").ids)
        assert out.usage is not None
        n_out = len(demo_tokenizer.encode("the cat sat. Then the dog ran").ids)
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), n_out)
        assert out.usage.total_tokens == len(prompt) + n_out
        sent = m.head("r1").requests[0]
        assert sent.prompt_ids == prompt
        # OpenAI's default temperature is 1, not the router's greedy 0.
        assert (sent.sampling.temperature, sent.sampling.top_p, sent.sampling.top_k) == (1.0, 0.9, 5)
        assert (sent.sampling.seed, sent.sampling.max_tokens) == (3, 20)

        await client.completions.create(model=MODEL, prompt=[5, 6, 7], temperature=0)
        ids_request = m.head("r1").requests[1]
        assert ids_request.prompt_ids == (5, 6, 7) and ids_request.sampling.temperature == 0
        assert ids_request.sampling.max_tokens == 16  # the completions default, as OpenAI's

        stopped = await client.completions.create(model=MODEL, prompt="once", stop=". Then", max_tokens=20)
        assert stopped.choices[0].text == "the cat sat" and stopped.choices[0].finish_reason == "stop"

    run(demo_tokenizer, limits, scenario)


def test_n_choices_run_at_once_with_seed_plus_i_and_usage_counts_the_prompt_once(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = words(demo_tokenizer, "the cat sat")
        out = await client.completions.create(model=MODEL, prompt="once", n=3, seed=10, max_tokens=8)
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert all(c.text == "the cat sat" for c in out.choices)
        requests = m.head("r1").requests
        assert sorted(r.sampling.seed for r in requests) == [10, 11, 12]
        assert len({r.request_id for r in requests}) == 3
        prompt = len(demo_tokenizer.encode("once").ids)
        assert out.usage is not None and out.usage.prompt_tokens == prompt
        assert out.usage.completion_tokens == 3 * len(demo_tokenizer.encode("the cat sat").ids)

        batch = await client.completions.create(model=MODEL, prompt=["a b", "once"], n=2, max_tokens=8)
        assert [c.index for c in batch.choices] == [0, 1, 2, 3]
        assert batch.usage is not None
        assert batch.usage.prompt_tokens == len(demo_tokenizer.encode("a b").ids) + prompt
        assert all(r.sampling.seed is None for r in m.head("r1").requests[3:])  # no seed: none made up

    run(demo_tokenizer, limits, scenario)


def test_a_stream_adds_up_to_the_text_and_ends_with_usage_then_done(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = words(demo_tokenizer, "the cat sat. Then the dog")
        stream = await client.completions.create(
            model=MODEL, prompt="once", max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
        got = [c async for c in stream]
        assert "".join(c.choices[0].text for c in got if c.choices) == "the cat sat. Then the dog"
        assert [c.choices[0].finish_reason for c in got if c.choices][-1] == "length"
        assert (
            got[-1].choices == []
            and got[-1].usage is not None
            and got[-1].usage.completion_tokens == len(demo_tokenizer.encode("the cat sat. Then the dog").ids)
        )
        assert all(c.usage is None for c in got[:-1])

        raw = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2},
        )
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = sse_events(raw.text)
        assert events[-1] == "[DONE]"
        chunks_ = [json.loads(e) for e in events[:-1]]
        for index in (0, 1):
            mine = [c["choices"][0] for c in chunks_ if c["choices"][0]["index"] == index]
            assert mine[0]["delta"]["role"] == "assistant"
            assert "".join(c["delta"].get("content", "") for c in mine) == "the cat sat. Then the dog"
            assert mine[-1]["finish_reason"] == "length"
        assert all("usage" not in c for c in chunks_)  # not asked for

    run(demo_tokenizer, limits, scenario)


def test_chat_renders_the_template_and_tokenizes_without_adding_specials(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = words(demo_tokenizer, "the dog ran")
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
        out = await client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=9)  # type: ignore[arg-type]
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
        assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == "the dog ran"
        text = "<s><|system|>be brief</s>\n<|user|>hello</s>\n<|assistant|>"
        sent = m.head("r1").requests[0]
        assert sent.prompt_ids == tuple(demo_tokenizer.encode(text, add_special_tokens=False).ids)
        assert sent.sampling.max_tokens == 9

        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        room = limits.max_model_len - len(m.head("r1").requests[1].prompt_ids)
        assert m.head("r1").requests[1].sampling.max_tokens == room  # chat's default: the room left

        parts = [
            {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}
        ]
        await client.chat.completions.create(model=MODEL, messages=parts, max_tokens=2)  # type: ignore[arg-type]
        assert m.head("r1").requests[2].prompt_ids == tuple(
            demo_tokenizer.encode("<s><|user|>hello</s>\n<|assistant|>", add_special_tokens=False).ids
        )

        wrong = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
        status, error, _ = await error_of(http, "/v1/chat/completions", {"model": MODEL, "messages": wrong})
        assert status == 400 and "system must come first" in error["message"] and error["param"] == "messages"

    run(demo_tokenizer, limits, scenario)


def test_chat_without_a_template_is_a_clear_400(demo_tokenizer: Tokenizer, limits: RequestLimits) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert "no chat template" in e.value.message and not m.head("r1").requests

    run(demo_tokenizer, limits, scenario, template=None)


def test_the_template_renders_as_transformers_does(demo_dir: Path, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    template = load_chat_template(tmp_path)
    assert template is not None and (template.bos_token, template.eos_token) == ("<s>", "</s>")
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(demo_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert template.render(messages) == reference.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    assert load_chat_template(bare) is None  # no tokenizer_config.json: no template
    demo = load_chat_template(demo_dir)  # the demo model ships a plain one, so chat works on it
    assert demo is not None and demo.render([{"role": "user", "content": "q"}]) == "<s>user: q\nassistant:"


@pytest.mark.parametrize(
    ("body", "status", "param", "words_"),
    [
        ({"prompt": "x", "echo": True}, 400, "echo", "echo: not supported"),
        ({"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
        ({"prompt": "x", "best_of": 3}, 400, "best_of", "best_of"),
        ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty"),
        ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "frobnicate: unsupported field"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature must be"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "temperature"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be > 0"),
        ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens", "past the context"),
        ({"prompt": "x", "n": 0}, 400, "n", "n: Input should be greater than or equal to 1"),
        ({"prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
        ({"prompt": ""}, 400, "prompt", "prompt: is empty"),
        ({}, 400, "prompt", "prompt: Field required"),
        ({"prompt": "x", "stop": [""]}, 400, "stop", "stop contains an empty string"),
        ({"prompt": "x", "logprobs": 50}, 400, "logprobs", "logprobs"),
        ({"prompt": "x", "model": "other"}, 404, None, "is not served here"),
    ],
)
def test_bad_completion_requests_get_openai_shaped_errors_and_reach_no_replica(
    demo_tokenizer: Tokenizer, limits: RequestLimits, body: dict, status: int, param: str | None, words_: str
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        got, error, _ = await error_of(http, "/v1/completions", {"model": MODEL, **body})
        assert (got, error["param"]) == (status, param), error
        assert words_ in error["message"]
        assert not m.head("r1").requests
        m.head("r1").chunks = words(demo_tokenizer, "ok")
        fine = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert fine.choices[0].text == "ok"  # the service is still up

    run(demo_tokenizer, limits, scenario)


@pytest.mark.parametrize(
    ("body", "words_"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs: needs logprobs"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0"),
        ({"messages": []}, "messages: is empty"),
    ],
)
def test_bad_chat_requests_get_a_400_naming_the_field(
    demo_tokenizer: Tokenizer, limits: RequestLimits, body: dict, words_: str
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        status, error, _ = await error_of(http, "/v1/chat/completions", {"model": MODEL, **body})
        assert status == 400 and words_ in error["message"], error
        assert not m.head("r1").requests

    run(demo_tokenizer, limits, scenario)


def test_malformed_bodies_and_wrong_routes_are_openai_shaped_too(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        status, error, _ = await error_of(http, "/v1/completions", "{not json")
        assert status == 400 and error["type"] == "invalid_request_error"
        status, error, _ = await error_of(http, "/v1/completions", "[1, 2]")
        assert status == 400
        resp = await http.get("/v1/completions")
        assert resp.status_code == 405 and set(resp.json()) == {"error"}
        resp = await http.get("/v1/nothing")
        assert resp.status_code == 404 and set(resp.json()) == {"error"}

    run(demo_tokenizer, limits, scenario)


def test_shedding_is_429_or_503_with_retry_after_and_a_deadline_is_504(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}

    async def overloaded(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        status, error, resp = await error_of(http, "/v1/completions", body)
        assert status == 429 and resp.headers["retry-after"] == "1" and "limit" in error["message"]
        status, _, resp = await error_of(http, "/v1/completions", {**body, "stream": True})
        assert status == 429  # refused before the stream's headers

    async def no_replica(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        status, error, resp = await error_of(http, "/v1/completions", body)
        assert status == 503 and resp.headers["retry-after"] == "1" and "no replica" in error["message"]

    async def deadline(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").fail = DeadlineExceeded("the request's deadline passed")
        status, error, _ = await error_of(http, "/v1/completions", body)
        assert status == 504 and "deadline" in error["message"]

    run(demo_tokenizer, limits, overloaded, max_queue=0)
    run(demo_tokenizer, limits, no_replica, names=())
    run(demo_tokenizer, limits, deadline)


def test_a_failure_mid_stream_is_the_streams_last_event(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = chunks([5], [6])[:1]  # one chunk, no finish, then the replica fails
        m.head("r1").fail = DeadlineExceeded("the request's deadline passed")
        raw = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
        assert raw.status_code == 200
        events = sse_events(raw.text)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "deadline_exceeded"
        assert m.router.outstanding == 0

    run(demo_tokenizer, limits, scenario)


def test_with_a_key_set_v1_wants_the_bearer_token_and_health_stays_open(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = words(demo_tokenizer, "ok")
        assert (await client.models.list()).data[0].id == MODEL  # the client sends the right key
        assert (await client.completions.create(model=MODEL, prompt="x")).choices[0].text == "ok"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            status, error, resp = await error_of(
                http, "/v1/completions", {"model": MODEL, "prompt": "x"}, headers=headers
            )
            assert status == 401 and error["code"] == "invalid_api_key"
        resp = await http.get("/v1/models")
        assert resp.status_code == 401
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["replicas_serving"] == 1
        assert len(m.head("r1").requests) == 1

    run(demo_tokenizer, limits, scenario, api_key="secret")


def test_models_lists_the_served_name(demo_tokenizer: Tokenizer, limits: RequestLimits) -> None:
    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        models = await client.models.list()
        assert [x.id for x in models.data] == [MODEL] and models.data[0].owned_by == "trellis"
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("other")

    run(demo_tokenizer, limits, scenario)


def test_logprobs_are_asked_for_and_rendered_in_both_shapes(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    ids = demo_tokenizer.encode("the cat").ids
    lps = tuple(TokenLogprob(t, -0.5, ((t, -0.5), (1 if t != 1 else 2, -1.5))) for t in ids)

    async def scenario(m: Mesh, http: httpx.AsyncClient, client: openai.AsyncOpenAI) -> None:
        m.head("r1").chunks = [StageChunk(tuple(ids), "length", lps)]
        out = await client.completions.create(model=MODEL, prompt="x", logprobs=2, max_tokens=4)
        assert m.head("r1").requests[0].sampling.logprobs == 2
        got = out.choices[0].logprobs
        assert got is not None and got.token_logprobs == [-0.5] * len(ids)
        assert "".join(got.tokens or []) == "the cat"
        assert got.top_logprobs is not None and len(got.top_logprobs[0]) == 2

        chat = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            logprobs=True,
            top_logprobs=1,
            max_tokens=4,
        )
        assert m.head("r1").requests[1].sampling.logprobs == 1
        content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and [c.logprob for c in content] == [-0.5] * len(ids)
        assert "".join(c.token for c in content) == "the cat"

        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4
        )
        assert m.head("r1").requests[2].sampling.logprobs is None  # not asked: not computed

    run(demo_tokenizer, limits, scenario)


def test_the_server_binds_its_host_and_port_serves_and_stops_and_a_busy_port_is_one_line(
    demo_tokenizer: Tokenizer, limits: RequestLimits
) -> None:
    async def main() -> None:
        m = await mesh(tokenizer=demo_tokenizer, limits=limits)
        config = ApiConfig(MODEL, None, None)
        api = await HttpApi.start(m.router, config, "127.0.0.1", 0, grace_s=1.0)
        try:
            async with httpx.AsyncClient() as http:
                health = await http.get(f"http://127.0.0.1:{api.port}/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            with pytest.raises(
                ConfigError, match=rf"router.http_port: cannot listen on 127.0.0.1:{api.port}"
            ):
                await HttpApi.start(m.router, config, "127.0.0.1", api.port, grace_s=1.0)
        finally:
            await api.stop()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", api.port))  # the port is free again: the server is gone

    asyncio.run(main())

"""The official `openai` client (sync, async, streaming) against a real mesh's OpenAI-compatible API.

One mesh for the module (1 replica, the demo tokenizer, a chat template added to the checkpoint, an
API key set): chat and completions, streamed and not, stop strings, seeds, n, usage; OpenAI-shaped
4xx errors after which the service still serves; 401 without the key; and a client that goes away,
mid-stream or waiting for a whole answer, frees its KV blocks on the head (its Stats).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.mesh_fixtures import head_address, running_mesh, stage_stats, wait_for
from trellis.core.net import free_ports
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh

pytestmark = pytest.mark.timeout(300)

KEY_ENV = "TRELLIS_TEST_OPENAI_KEY"
KEY = "test-key-123"
MODEL = "tiny-chat"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LONG = 400  # tokens: far more than a disconnecting client lets finish
RELEASE_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Served:
    mesh: Mesh
    base_url: str

    @property
    def head(self) -> str:
        return head_address(self.mesh, "r0")


@pytest.fixture(scope="module")
def served(tokenized_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    ckpt = tmp_path_factory.mktemp("chat") / "ckpt"
    shutil.copytree(tokenized_ckpt, ckpt)
    (ckpt / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"})
    )
    spec = local_spec(str(ckpt))
    (http_port,) = free_ports(1)
    spec = dataclasses.replace(
        spec,
        router=dataclasses.replace(spec.router, http_port=http_port, api_key_env=KEY_ENV),
        model=dataclasses.replace(spec.model, served_model_name=MODEL),
    )
    with running_mesh(spec, env={KEY_ENV: KEY}) as mesh:
        yield Served(mesh, f"http://{spec.router.host}:{http_port}")


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=KEY, max_retries=0, timeout=60) as c:
        yield c


def idle(served: Served) -> int:
    """The head's free blocks once nothing runs there."""
    wait_for(
        lambda: (s := stage_stats(served.head)).running == 0 and s.waiting == 0,
        RELEASE_TIMEOUT_S,
        "the head idle",
    )
    return stage_stats(served.head).free_blocks


def assert_released(served: Served, free_before: int) -> None:
    """Blocks back to the start count, and the head generates no more for the request."""
    wait_for(
        lambda: (
            (s := stage_stats(served.head)).free_blocks == free_before and s.running == 0 and s.waiting == 0
        ),
        RELEASE_TIMEOUT_S,
        f"the head's free blocks back to {free_before}",
    )
    generated = stage_stats(served.head).generated_tokens
    time.sleep(0.5)
    assert stage_stats(served.head).generated_tokens == generated, "the head still generates for it"


def test_completions_streamed_and_not_with_stop_seed_n_and_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert text and whole.choices[0].finish_reason == "length" and whole.model == MODEL
    assert whole.usage is not None and whole.usage.completion_tokens == 12

    stream = client.completions.create(
        model=MODEL,
        prompt="The cat",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text  # greedy: the same text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    stop = text.strip()[len(text.strip()) // 2 :][:3]  # a piece of the greedy text, past its start
    cut = client.completions.create(model=MODEL, prompt="The cat", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[: text.index(stop)]

    seeded = [
        client.completions.create(model=MODEL, prompt="The cat", max_tokens=16, temperature=1.0, seed=7, n=2)
        for _ in range(2)
    ]
    texts = [[c.text for c in s.choices] for s in seeded]
    assert texts[0] == texts[1], "the same seed should give the same choices"
    assert texts[0][0] != texts[0][1], "choice i samples with seed + i: the two should differ"
    assert seeded[0].usage is not None and seeded[0].usage.completion_tokens == 32

    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 4


def test_chat_sync_and_async_streamed_and_not(client: openai.OpenAI, served: Served) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    answer = whole.choices[0].message.content
    assert answer and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 10

    async def streamed() -> tuple[str, int]:
        async with openai.AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key=KEY, max_retries=0) as c:
            stream = await c.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            parts, usage = [], 0
            async for chunk in stream:
                parts += [ch.delta.content or "" for ch in chunk.choices]
                usage = chunk.usage.completion_tokens if chunk.usage else usage
            return "".join(parts), usage

    assert asyncio.run(streamed()) == (answer, 10)
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_logprobs_come_back_when_asked(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="The cat", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and len(lp.token_logprobs) == 4
    assert all(p <= 0 for p in lp.token_logprobs) and "".join(lp.tokens or []) == out.choices[0].text
    assert lp.top_logprobs is not None and all(len(t) == 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=1
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3 and all(len(c.top_logprobs) == 1 for c in content)


def test_bad_requests_get_openai_shaped_4xx_and_the_service_stays_up(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", temperature=-2)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", echo=True)
    assert "echo" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[{}])  # type: ignore[list-item]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None


def test_a_missing_or_wrong_key_is_401_and_health_stays_open(served: Served) -> None:
    with (
        openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.completions.create(model=MODEL, prompt="x", max_tokens=2)
    # No key at all (the openai client refuses to send none):
    assert (
        httpx.post(f"{served.base_url}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code
        == 401
    )
    health = httpx.get(f"{served.base_url}/health")
    assert health.status_code == 200 and health.json()["replicas_serving"] == 1


def test_a_client_leaving_mid_stream_frees_its_blocks(client: openai.OpenAI, served: Served) -> None:
    free_before, generated_before = idle(served), stage_stats(served.head).generated_tokens
    stream = client.completions.create(
        model=MODEL, prompt="The cat", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
    )
    for received, _ in enumerate(stream, 1):
        if received == 5:
            break
    during = stage_stats(served.head)
    assert during.running == 1 and during.free_blocks < free_before
    stream.close()
    assert_released(served, free_before)
    assert stage_stats(served.head).generated_tokens - generated_before < LONG, "it ran to the end"


def test_a_client_giving_up_on_a_whole_answer_frees_its_blocks(served: Served) -> None:
    free_before, generated_before = idle(served), stage_stats(served.head).generated_tokens
    body = {"model": MODEL, "prompt": "The cat", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{served.base_url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(5.0, read=0.25),  # 400 tokens can finish within 1 s (seen in CI)
        )
    assert_released(served, free_before)
    assert stage_stats(served.head).generated_tokens - generated_before < LONG, "it ran to the end"

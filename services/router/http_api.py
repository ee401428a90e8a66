"""The router's OpenAI-compatible HTTP API: JSON in, the domain Router, JSON or server-sent events out.

A thin adapter, like the gRPC servicer: the Router validates, admits, routes and detokenizes; this
file maps OpenAI's fields onto Router.generate (one call per choice, run at once) and its deltas onto
OpenAI's shapes. Invariants:
- every error is OpenAI's JSON shape with its status (openai_errors); the service never goes down
  for a request;
- a client that goes away, streamed or not, cancels its requests upstream (their KV blocks are
  freed): the streams of a request are closed whatever ends it (openai_choices);
- with an API key set, every /v1 route wants `Authorization: Bearer KEY`; /health stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.router import openai_errors
from services.router.openai_choices import ChoiceStreams, until_disconnect
from services.router.openai_errors import ApiError
from services.router.openai_render import ChatShapes, Choice, CompletionShapes, Shapes
from services.router.openai_schema import (
    OPENAI_DEFAULT_TEMPERATURE,
    ChatCompletionRequest,
    CompletionRequest,
    check_supported,
)
from trellis.core import log
from trellis.core.errors import ConfigError, InvalidRequest
from trellis.core.sampling import DEFAULT_MAX_TOKENS, SamplingParams
from trellis.core.spec import DeploySpec
from trellis.routing.chat_template import ChatTemplate, load_chat_template
from trellis.routing.router import Delta, Router
from trellis.routing.validation import Prompt

CLIENT_GONE = 499  # the status logged for a client that left before its answer (nginx's)
FIELDS = frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)


@dataclass(frozen=True)
class ApiConfig:
    model_name: str  # what /v1/models lists and requests must name
    chat_template: ChatTemplate | None  # None: /v1/chat/completions answers 400
    api_key: str | None  # None or empty: no authentication


def _sampling(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    return SamplingParams(
        temperature=OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def _seeded(sampling: SamplingParams, i: int) -> SamplingParams:
    """Choice i samples with seed + i: the choices differ, and repeat when the request does."""
    return sampling if sampling.seed is None or i == 0 else replace(sampling, seed=sampling.seed + i)


class EventStream(StreamingResponse):
    """Server-sent events whose producer is closed whatever ends the response: it finished, the
    client went away (seen even while no token is due), or sending failed."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self.body_iterator
        assert isinstance(events, AsyncIterator)
        async with contextlib.aclosing(events):
            sending = asyncio.ensure_future(self.stream_response(send))
            watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
            try:
                await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sending.cancel()
                watching.cancel()
                await asyncio.gather(sending, watching, return_exceptions=True)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class OpenAIApi:
    """The routes, over one Router."""

    def __init__(self, router: Router, config: ApiConfig) -> None:
        self.router, self.config = router, config
        self.created = int(time.time())

    # ---- plumbing ---------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; this router serves {self.config.model_name!r}",
                code="model_not_found",
            )

    def _streams(
        self,
        prompts: list[Prompt],
        sampling: SamplingParams,
        n: int,
        stop: tuple[str, ...],
        request_id: str,
        max_tokens_given: bool,
    ) -> list[AsyncIterator[Delta]]:
        return [
            self.router.generate(
                prompt,
                _seeded(sampling, i),
                max_tokens_given=max_tokens_given,
                stop=stop,
                request_id=f"{request_id}-{p * n + i}" if p * n + i else request_id,
            )
            for p, prompt in enumerate(prompts)
            for i in range(n)
        ]

    async def _answer(
        self,
        request: Request,
        streams: list[AsyncIterator[Delta]],
        shapes: Shapes,
        n: int,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        if stream:
            return await self._stream(request, streams, shapes, n, include_usage)

        async def collect() -> Response:
            choices = [Choice() for _ in streams]
            async with ChoiceStreams(streams) as merged:
                async for index, delta in merged:
                    choices[index].add(delta)
            return JSONResponse(shapes.response(choices, n))

        return await until_disconnect(request, collect(), lambda: Response(status_code=CLIENT_GONE))

    async def _stream(
        self,
        request: Request,
        streams: list[AsyncIterator[Delta]],
        shapes: Shapes,
        n: int,
        include_usage: bool,
    ) -> Response:
        merged = ChoiceStreams(streams)
        await merged.__aenter__()
        try:
            # Refusals (bad prompt, overload, no replica) come before the first delta: answer them
            # with their status, not as a 200 stream that fails.
            started = await until_disconnect(request, _true_after(merged.started()), lambda: False)
        except BaseException:
            await merged.__aexit__(None, None, None)
            raise
        if not started:
            await merged.__aexit__(None, None, None)
            return Response(status_code=CLIENT_GONE)
        return EventStream(self._events(merged, shapes, len(streams), n, include_usage))

    async def _events(
        self, merged: ChoiceStreams, shapes: Shapes, count: int, n: int, include_usage: bool
    ) -> AsyncIterator[str]:
        choices = [Choice() for _ in range(count)]
        seen: set[int] = set()
        try:
            async for index, delta in merged:
                choices[index].add(delta)
                chunk = shapes.chunk(index, delta, index not in seen, include_usage)
                seen.add(index)
                if chunk is not None:
                    yield sse(chunk)
            if include_usage:
                yield sse(shapes.usage_chunk(choices, n))
        except Exception as e:  # past the headers: the error is the stream's last event
            yield sse(json.loads(openai_errors.response_for(e, FIELDS).body))
        finally:
            await merged.__aexit__(None, None, None)
        yield sse("[DONE]")

    # ---- routes -----------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body = CompletionRequest.model_validate_json(await request.body())
        self._check_model(body.model)
        check_supported(body)
        prompts: list[Prompt] = list(body.prompts())
        sampling = _sampling(body, body.max_tokens, body.logprobs)
        request_id = _request_id(request, "cmpl")
        streams = self._streams(
            prompts, sampling, body.n, body.stop_strings(), request_id, body.max_tokens is not None
        )
        shapes = CompletionShapes(
            request_id, self.config.model_name, self.router.tokenizer, body.logprobs is not None
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._answer(request, streams, shapes, body.n, body.stream, include_usage)

    async def chat_completions(self, request: Request) -> Response:
        body = ChatCompletionRequest.model_validate_json(await request.body())
        self._check_model(body.model)
        check_supported(body)
        template, tokenizer = self.config.chat_template, self.router.tokenizer
        if template is None or tokenizer is None:
            raise InvalidRequest(
                "messages: this model has no chat template (tokenizer_config.json chat_template); "
                "use /v1/completions with a prompt"
            )
        text = template.render([m.as_template_input() for m in body.messages])
        # The template writes the special tokens itself (bos_token), so they are not added again,
        # as transformers' apply_chat_template does; off the loop, like the Router's own encoding.
        loop = asyncio.get_running_loop()
        encoding = await loop.run_in_executor(None, lambda: tokenizer.encode(text, add_special_tokens=False))
        prompt_ids = tuple(encoding.ids)
        if not prompt_ids:
            raise InvalidRequest("messages: the chat template rendered them to no tokens")
        # OpenAI's chat default is "as long as the context allows": the room left after the prompt.
        limit = body.token_limit()
        room = self.router.limits.max_model_len - len(prompt_ids)
        sampling = _sampling(body, limit if limit is not None else max(1, room), body.logprobs_k())
        request_id = _request_id(request, "chatcmpl")
        streams = self._streams([prompt_ids], sampling, body.n, body.stop_strings(), request_id, True)
        shapes = ChatShapes(request_id, self.config.model_name, tokenizer, body.logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._answer(request, streams, shapes, body.n, body.stream, include_usage)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "trellis",
            "max_model_len": self.router.limits.max_model_len,
        }

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "replicas_serving": len(self.router.replicas.healthy())}


async def _true_after(work: Any) -> bool:
    await work
    return True


def _request_id(request: Request, prefix: str) -> str:
    """The client's X-Request-Id when it sends one (the Router checks its length), else a new one."""
    return request.headers.get("x-request-id") or f"{prefix}-{uuid.uuid4().hex}"


def create_app(router: Router, config: ApiConfig) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over router."""
    api = OpenAIApi(router, config)
    app = FastAPI(title="Trellis OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    openai_errors.install(app, FIELDS)
    key = (config.api_key or "").encode()

    def authenticate(request: Request) -> None:
        """With a key set, a /v1 route wants `Authorization: Bearer KEY` (compared in constant time)."""
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            message = "invalid API key" if given else "missing API key: send Authorization: Bearer KEY"
            raise ApiError(401, message, code="invalid_api_key")

    guarded = [Depends(authenticate)]
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/models", api.models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET"], dependencies=guarded)
    app.add_api_route("/health", api.health, methods=["GET"])
    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn on a loop it does not own: the router process handles SIGINT / SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class HttpApi:
    """The HTTP API served on the running loop, beside the gRPC server."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server, self._task, self.port = server, task, port

    @classmethod
    async def start(cls, router: Router, config: ApiConfig, host: str, port: int, grace_s: float) -> HttpApi:
        """Bind host:port (only that host) and serve; a port in use is a ConfigError naming it."""
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family)
            # Accepted sockets inherit it: without it each small SSE write waits for the client's
            # delayed ACK (Nagle), ~40 ms on the first token (asyncio sets it only for proto == TCP).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ConfigError(
                f"router.http_port: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from None
        sock.setblocking(False)
        uv = uvicorn.Config(
            create_app(router, config),
            log_config=None,
            access_log=False,  # the one line per request is the router's
            log_level="warning",  # its start-up lines are not JSON; "router HTTP API serving" says it
            lifespan="off",
            timeout_graceful_shutdown=max(1, round(grace_s)),
        )
        server = _EmbeddedServer(uv)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise ConfigError(f"router.http_port: the HTTP API on {host}:{port} did not start")
            await asyncio.sleep(0.01)
        bound = sock.getsockname()[1]
        log.get().info("router HTTP API serving", address=f"{host}:{bound}", auth=bool(config.api_key))
        return cls(server, task, bound)

    async def stop(self) -> None:
        """Stop accepting, give in-flight requests the grace, then end them."""
        self._server.should_exit = True
        try:
            await self._task
        except Exception as e:  # its own failure while stopping: said, and the router stops anyway
            log.get().warning("router HTTP API stopped with an error", error=str(e) or type(e).__name__)


async def start_http_api(spec: DeploySpec, router: Router, host: str, grace_s: float) -> HttpApi | None:
    """The HTTP API of a router spec (None when router.http_port is 0): the served name, the
    checkpoint's chat template, the clients' key from the environment variable the spec names."""
    if not spec.router.http_port:
        return None
    template = load_chat_template(spec.model.tokenizer or spec.model.path)
    api_key = os.environ.get(spec.router.api_key_env) if spec.router.api_key_env else None
    config = ApiConfig(model_name=spec.model.name, chat_template=template, api_key=api_key or None)
    return await HttpApi.start(router, config, host, spec.router.http_port, grace_s)

"""The router: one request in, a stream of text deltas out, whatever the front end (gRPC, HTTP).

`Router.generate` validates (trellis.core.request, plus the router-only checks), tokenizes off the
event loop, admits (Overloaded past max_queue), picks a replica or a prefill/decode pair (the
policy; trellis/routing/pd_policy.py), streams the tokens back detokenized (a pair's as one stream,
trellis/routing/handoff_stream.py), and maps how it ended. Invariants:
- every failure is an error of the tree (InvalidRequest, Overloaded, Unavailable, DeadlineExceeded);
  a replica that fails or goes down mid-stream is Unavailable, naming the replica; a head that
  refuses a request as draining (before any token) is skipped and the request goes to another;
- a pair counts in flight on both replicas and is tracked by both until P's part is done (then by D
  only): either going down meanwhile cancels it;
- an upstream request never outlives its client: if the reader goes away, or a stop string ends the
  text here before the head finishes, the upstream stream is cancelled (which frees its blocks);
- the deltas' texts add up to the decode of the tokens, cut before the first stop string; the last
  delta has the finish reason ("stop", "length", "abort") and the usage;
- every call, however it ends, is observed once (trellis.metrics.request_observer): its Prometheus
  metrics on `self.metrics` and one INFO log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from trellis.core import log
from trellis.core.errors import InvalidRequest, Overloaded, Unavailable
from trellis.core.plan import TokenLogprob
from trellis.core.request import RequestLimits, check_request, stop_problem
from trellis.core.sampling import SamplingParams
from trellis.core.stage_api import DRAINING, draining_refusal
from trellis.core.telemetry import outgoing_metadata, span_attributes, tracer
from trellis.core.tokenizer import encode
from trellis.metrics.request_observer import observe_requests
from trellis.metrics.router_metrics import RouterMetrics
from trellis.routing.detokenizer import IncrementalDetokenizer
from trellis.routing.handoff_stream import HandoffStream
from trellis.routing.info import ReplicaInfo, RouterInfo, StageInfo
from trellis.routing.pd_policy import Pair, PDPolicy
from trellis.routing.policy import ReplicaPolicy, least_load
from trellis.routing.replicas import Replica, ReplicaSet
from trellis.routing.stage_client import StageRequest, StageStream
from trellis.routing.transfers import Transfers
from trellis.routing.validation import Prompt, check_router_request

DEFAULT_TIMEOUT_S = 600.0  # a request without a deadline still gets one upstream
# What the head's finish reasons mean to a client.
FINISH = {"stop": "stop", "length": "length", "too_long": "length", "abort": "abort"}


class _Draining(Unavailable):
    """A head refused the request as draining before any token: it may go to another replica."""

    def __init__(self, message: str, replicas: tuple[Replica, ...]) -> None:
        super().__init__(message)
        self.replicas = replicas  # the ones that refused


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Delta:
    """One step of a response: new tokens and their text (never a partial UTF-8 character)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str = ""  # on the last delta only
    usage: Usage | None = None  # on the last delta only
    replica: str = ""  # on the first delta only: which replica serves it
    prompt_ids: tuple[int, ...] = ()  # on the first delta only: the prompt as tokenized
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when sampling.logprobs asked


class Router:
    def __init__(
        self,
        replicas: ReplicaSet,
        limits: RequestLimits,
        tokenizer: Tokenizer | None,
        *,
        model_name: str,
        max_queue: int,
        policy: ReplicaPolicy | PDPolicy = least_load,
        metrics: RouterMetrics | None = None,
        transfers: Transfers | None = None,
    ) -> None:
        self.replicas = replicas
        self.limits = limits
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_queue = max_queue
        self.policy = policy
        self.outstanding = 0
        self._tracer = tracer("trellis.router")
        # Each request's metrics and its one log line (observe_requests); a registry of its own if none.
        self.metrics = RouterMetrics(model_name) if metrics is None else metrics
        # What the P/D hand-offs share (registry records, aborts in flight); none recorded if None.
        self.transfers = Transfers(sink=self.metrics) if transfers is None else transfers

    @observe_requests
    async def generate(
        self,
        prompt: Prompt | None,
        sampling: SamplingParams = SamplingParams(),  # noqa: B008 (frozen, so one shared default is safe)
        *,
        max_tokens_given: bool = True,
        stop: Sequence[str] = (),
        request_id: str = "",
        deadline_s: float | None = None,
    ) -> AsyncIterator[Delta]:
        """Serve one request. With max_tokens_given=False, sampling.max_tokens is ignored and the
        default applies; deadline_s is how long the request may still take (None: DEFAULT_TIMEOUT_S)."""
        request_id = request_id or uuid.uuid4().hex
        logger = log.get(request_id=request_id)
        # A refusal (InvalidRequest) is logged, with its reason, on the request's one line.
        prompt_ids, sampling = await self._checked(prompt, sampling, max_tokens_given, stop, request_id)
        refused: set[str] = set()  # replicas that refused it as draining (nothing ran there)
        while True:
            choice = await self._admit(prompt_ids, refused)
            serving = (choice.prefill, choice.decode) if isinstance(choice, Pair) else (choice,)
            span = self._tracer.start_span(
                "router.generate",
                attributes=span_attributes(
                    request_id=request_id,
                    replica=choice.name,
                    prompt_tokens=len(prompt_ids),
                    max_tokens=sampling.max_tokens,
                ),
            )
            upstream = StageRequest(request_id, prompt_ids, sampling, tuple(outgoing_metadata(span)))
            stream = self._submit(choice, upstream, DEFAULT_TIMEOUT_S if deadline_s is None else deadline_s)
            keys = [r.track(stream) for r in serving]
            let_go: list[Replica] = []  # replicas done with the request before its end
            if isinstance(stream, HandoffStream):
                stream.on_release = _releaser(serving, keys, let_go)
            try:
                async with contextlib.aclosing(self._relay(serving, stream, upstream, stop)) as deltas:
                    async for delta in deltas:
                        if delta.finish_reason and delta.usage is not None:
                            span.set_attributes(
                                span_attributes(
                                    finish_reason=delta.finish_reason,
                                    completion_tokens=delta.usage.completion_tokens,
                                )
                            )
                        yield delta
                return
            except _Draining as e:
                # Sent before the monitor saw the drain: nothing was generated, so another replica
                # may take it; the last refusal is the answer when none is left.
                for r in e.replicas:
                    self.replicas.mark_draining(r)
                    refused.add(r.name)
                if not any(r.name not in refused for r in self.replicas.healthy()):
                    raise Unavailable(str(e)) from None
            except Unavailable as e:
                logger.warning("upstream failed", replica=choice.name, error=str(e))
                raise
            finally:
                # A no-op when the head finished; otherwise (reader gone, stop string, failure) it
                # ends the request upstream and frees its blocks.
                stream.cancel()
                for r, key in zip(serving, keys, strict=True):
                    if r not in let_go:
                        _let_go(r, key, let_go)
                span.end()
                self.outstanding -= 1

    def _submit(
        self, choice: Replica | Pair[Replica], upstream: StageRequest, timeout_s: float
    ) -> StageStream:
        """The request's stream: one head's, or a pair's hand-off (P's first token, then D's)."""
        if isinstance(choice, Pair):
            return HandoffStream(
                upstream, choice.prefill, choice.decode, timeout_s=timeout_s, transfers=self.transfers
            )
        return choice.head.submit(upstream, timeout_s=timeout_s)

    async def _checked(
        self,
        prompt: Prompt | None,
        sampling: SamplingParams,
        max_tokens_given: bool,
        stop: Sequence[str],
        request_id: str,
    ) -> tuple[tuple[int, ...], SamplingParams]:
        """The prompt's token ids and the sampling to run with; raises InvalidRequest."""
        check_router_request(request_id, prompt, stop, has_tokenizer=self.tokenizer is not None)
        problem = stop_problem(stop)
        if problem:
            raise InvalidRequest(problem)
        if isinstance(prompt, str):
            assert self.tokenizer is not None  # check_router_request refuses text without one
            loop = asyncio.get_running_loop()  # a long prompt must not stall the other streams
            ids = tuple(await loop.run_in_executor(None, encode, self.tokenizer, prompt))
            if not ids:
                raise InvalidRequest("the prompt text encodes to no tokens")
        else:
            ids = tuple(prompt or ())
        return ids, check_request(ids, sampling, self.limits, max_tokens_given=max_tokens_given)

    async def _admit(self, prompt_ids: Sequence[int], refused: set[str]) -> Replica | Pair[Replica]:
        """A replica (or a P/D pair) for the request, counted in flight (here and on each replica)
        before it returns. The request holds its place in max_queue while an async policy decides."""
        if self.outstanding >= self.max_queue:
            raise Overloaded(
                f"the router is at its limit of {self.max_queue} requests in flight; retry later"
            )
        up = [r for r in self.replicas.healthy() if r.name not in refused]
        if not up:
            raise Unavailable("no replica is serving")
        self.outstanding += 1
        try:
            answer = self.policy(up, prompt_ids)
            choice = await answer if inspect.isawaitable(answer) else answer
        except BaseException:
            self.outstanding -= 1
            raise
        for r in (choice.prefill, choice.decode) if isinstance(choice, Pair) else (choice,):
            r.outstanding += 1
        return choice

    async def _relay(
        self, serving: tuple[Replica, ...], stream: StageStream, upstream: StageRequest, stop: Sequence[str]
    ) -> AsyncIterator[Delta]:
        """The stream's chunks as deltas, cut at a stop string; ends at the first finish reason.
        serving: the replica, or a pair's prefill and decode replicas (named "P->D")."""
        name = "->".join(r.name for r in serving)
        detok = (
            IncrementalDetokenizer(self.tokenizer, upstream.prompt_ids, stop)
            if self.tokenizer is not None
            else None
        )
        completion, first = 0, True
        try:
            async for chunk in stream:
                completion += len(chunk.token_ids)
                text = detok.add(chunk.token_ids) if detok else ""
                finish = FINISH.get(chunk.finish_reason, chunk.finish_reason)
                if finish and detok is not None and not detok.stopped:
                    text += detok.flush()
                if detok is not None and detok.stopped:
                    finish = "stop"  # a stop string ended the text here
                yield Delta(
                    request_id=upstream.request_id,
                    token_ids=chunk.token_ids,
                    text=text,
                    finish_reason=finish,
                    usage=Usage(len(upstream.prompt_ids), completion) if finish else None,
                    replica=name if first else "",
                    prompt_ids=upstream.prompt_ids if first else (),
                    logprobs=chunk.logprobs,
                )
                first = False
                if finish:
                    return
        except Unavailable as e:
            message = str(e)
            if first and DRAINING in message:
                refusing = tuple(r for r in serving if draining_refusal(r.name) in message)
                raise _Draining(message, refusing or serving) from None
            if not any(f"replica {r.name}" in message for r in serving):
                message = f"replica {name} failed: {message}"
            raise Unavailable(message) from None
        # The stream ended without a finish: the monitor cancelled it (a replica went down), or
        # the head dropped it.
        down = next((r for r in serving if r.down_reason), None)
        if down is None:
            raise Unavailable(f"replica {name} went down: its stream ended early")
        raise Unavailable(f"replica {down.name} went down: {down.down_reason}")

    def info(self) -> RouterInfo:
        return RouterInfo(
            model=self.model_name,
            vocab_size=self.limits.vocab_size,
            max_model_len=self.limits.max_model_len,
            replicas=tuple(_replica_info(r) for r in self.replicas.replicas.values()),
        )


def _releaser(serving: tuple[Replica, ...], keys: list[int], let_go: list[Replica]) -> Callable[[str], None]:
    """A pair's HandoffStream.on_release: the side ("prefill", "decode") it names is let go."""
    index = {"prefill": 0, "decode": 1}
    return lambda side: _let_go(serving[index[side]], keys[index[side]], let_go)


def _let_go(replica: Replica, key: int, let_go: list[Replica]) -> None:
    """The request no longer runs on ``replica``: untracked (its going down no longer cancels the
    stream), and out of its in-flight count."""
    replica.untrack(key)
    replica.outstanding -= 1
    let_go.append(replica)


def _replica_info(r: Replica) -> ReplicaInfo:
    stages = tuple(
        StageInfo(
            index=m.stage,
            layer_start=m.layers[0],
            layer_end=m.layers[1],
            tp=m.tp,
            address=m.grpc_address,
            alive=r.healthy,
        )
        for m in r.view.stages
    )
    return ReplicaInfo(name=r.name, role=r.view.role, outstanding=r.outstanding, stages=stages)

"""The offline engine: one replica (TP x PP) on this host, driven from Python or `trellis generate`.

This process is rank 0 of the head stage; the head's TP peers and every later stage run as child
processes, linked into a ring over UCX by the mesh's own bootstrap (trellis.runtime.bootstrap; the
mesh adds gRPC on top).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trellis.core import log
from trellis.core.engine_config import EngineConfig
from trellis.core.errors import InvalidRequest, ModelError, TrellisError
from trellis.core.kv_names import fingerprint_of
from trellis.core.model_config import ModelConfig, load_model_source
from trellis.core.plan import TokenLogprob
from trellis.core.processes import spawn_module
from trellis.core.request import RequestLimits, check_request
from trellis.core.sampling import SamplingParams
from trellis.core.spec import ModelSpec
from trellis.runtime.bootstrap import link_ring, local_ring_launches, start_head
from trellis.runtime.busy import bubble_fraction
from trellis.runtime.executor import StageExecutor
from trellis.runtime.handoff import HandoffError
from trellis.runtime.head import Head, ReplicaFailed
from trellis.runtime.kv_setup import StoreUse, attach_store
from trellis.runtime.launch import StageLaunch
from trellis.runtime.model.loader import check_weight_files
from trellis.transport import ucx
from trellis.transport.ucx import Listener

GREEDY = SamplingParams()  # frozen: safe as a shared default


class EngineError(TrellisError):
    """A bad engine argument or request, told in one line."""


@dataclass(frozen=True)
class EngineArgs:
    """What to run and where (the model source and the placement), and the engine config whole."""

    model: str | None = None  # a Hugging Face directory
    preset: str | None = None  # or a built-in config with dummy weights
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    gpus: tuple[int, ...] = ()  # default 0 .. tp*pp-1
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    load_format: str = "auto"  # a preset always loads "dummy" weights
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    # An output option of this offline API, not an engine knob: keep each sequence's first-step
    # logits in its Completion (tests compare them with a reference).
    return_logits: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    # A running KV store service to load prompts' blocks from and save them to (None: none).
    kv_store: StoreUse | None = None

    def model_spec(self) -> ModelSpec:
        """The model source, as the model section of a deploy spec would give it."""
        return ModelSpec(
            path=self.model,
            preset=self.preset,
            load_format="dummy" if self.preset is not None else self.load_format,
            dtype=self.dtype or ("bfloat16" if self.device == "cuda" else "float32"),
            max_model_len=self.max_model_len,
        )


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_logits: torch.Tensor | None = None
    submitted_at: float = 0.0  # time.perf_counter() at submission, then when each token arrived
    token_times: list[float] = field(default_factory=list)
    # One TokenLogprob per token when sampling.logprobs was set (log_softmax of the raw logits).
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Engine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self._log = log.get()
        self._procs: list[subprocess.Popen] = []  # stages 1.. (stage 0 is this process)
        self.executor: StageExecutor | None = None
        self.head: Head | None = None  # set once the ring is up
        self._head_task: asyncio.Task | None = None  # the head's run loop, once started
        self._closed = False
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EngineError("--device cuda asked for, but no CUDA GPU is visible")
        model = args.model_spec()
        try:
            self.cfg: ModelConfig = load_model_source(model.path, model.preset)
            self.launches: list[StageLaunch] = local_ring_launches(
                model, self.cfg, args.engine, tp=args.tp, pp=args.pp, device=args.device, gpus=args.gpus
            )
            if model.load_format != "dummy":
                check_weight_files(model.path)
        except ModelError as e:
            raise EngineError(str(e)) from None
        self.dtype = model.dtype
        self.fingerprint = fingerprint_of(self.cfg, model.name, model.dtype, args.engine.block_size)
        self.stage_layers = [launch.layers for launch in self.launches]
        self.max_model_len = self.launches[0].max_model_len
        self.limits = RequestLimits(vocab_size=self.cfg.vocab_size, max_model_len=self.max_model_len)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()
        try:
            self._call(self._start_watched())
        except (ModelError, HandoffError) as e:  # e.g. a tensor of the wrong shape, found while loading
            self.close()
            raise EngineError(str(e)) from None
        except BaseException:
            self.close()
            raise

    @property
    def num_blocks(self) -> int:
        """KV blocks per stage: what every stage of the ring can hold (known once it is up)."""
        return self._running_head().scheduler.config.num_blocks

    def _running_head(self) -> Head:
        if self.head is None or self._closed:
            raise EngineError("the engine is not running")
        return self.head

    # ---- start / stop ------------------------------------------------------------------------
    async def _start_watched(self) -> None:
        """Start the ring, failing fast if a stage process exits first (the ring would wait for it)."""
        start = asyncio.create_task(self._start())
        while not start.done():
            dead = [(s, p.returncode) for s, p in enumerate(self._procs, start=1) if p.poll() is not None]
            if dead:
                start.cancel()
                await asyncio.wait({start})  # let it unwind (closes the listener)
                stage, code = dead[0]
                raise EngineError(f"stage {stage} exited with code {code} while starting; its log says why")
            await asyncio.wait({start}, timeout=0.2)
        start.result()

    async def _start(self) -> None:
        head_launch, *others = self.launches
        # The head's inbound link carries only sampled ids: received on the host.
        listener = Listener(head_launch.ucx_ports[0], torch.device("cpu")) if others else None
        try:
            for launch in others:
                self._procs.append(spawn_module("trellis.runtime.stage_proc", ["--launch", launch.to_json()]))
            self.executor = StageExecutor(head_launch)
            await self.executor.start()
            outbound, inbound = await link_ring(self.executor, listener)
            head = await start_head(
                self.executor,
                outbound,
                inbound,
                fingerprint=self.fingerprint,
                return_logits=self.args.return_logits,
            )
        finally:
            if listener is not None:
                listener.close()
        self.head = head
        if self.args.kv_store is not None:
            await attach_store(head, self.fingerprint, self.args.kv_store)
        self._head_task = asyncio.create_task(head.run())
        a = self.args
        self._log.info("engine ready", tp=a.tp, pp=a.pp, layers=self.stage_layers, num_blocks=self.num_blocks)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        timeout = self.args.engine.stop_timeout_s
        if self.head is not None:
            try:
                self._call(self._stop())
            except Exception as e:  # a broken replica still gets its processes reaped below
                self._log.warning("engine stop", error=str(e))
        for p in self._procs:
            if self._head_task is None:  # a stage of a ring that never formed would wait for it long
                p.kill()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        ucx.shutdown()

    async def _stop(self) -> None:
        head, executor, task = self.head, self.executor, self._head_task
        assert head is not None and executor is not None and task is not None  # set together at start
        if head.kv_agent is not None:
            await head.kv_agent.close()
        await head.stop()
        await asyncio.wait_for(task, self.args.engine.stop_timeout_s)
        await executor.stop()
        for link in (head.outbound, head.inbound):
            if link is not None:
                await link.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset_prefix_cache(self) -> int:
        """Drop every cached block no request holds (the local prefix cache; not the store's)."""
        return self._call(self._reset_prefix_cache())

    async def _reset_prefix_cache(self) -> int:
        return self._running_head().scheduler.block_manager.reset_prefix_cache()

    def stats(self) -> dict[str, float]:
        """The head scheduler's counters (blocks, prefix hits, store loads), and the KV agent's."""
        return self._call(self._stats())

    async def _stats(self) -> dict[str, float]:
        head = self._running_head()
        agent = {} if head.kv_agent is None else dataclasses.asdict(head.kv_agent.stats)
        return {**head.scheduler.stats(), **{f"kv_agent_{k}": v for k, v in agent.items()}}

    # ---- pipeline bubble -----------------------------------------------------------------------
    def stage_busy_seconds(self) -> list[float]:
        """Each stage's compute seconds so far (stage 0 first), over the steps that came back: a
        monotone snapshot; diff two of them, with the wall time between, for an interval's bubble."""
        return self._call(self._busy_snapshot())

    async def _busy_snapshot(self) -> list[float]:
        return self._running_head().stage_busy.snapshot()

    @staticmethod
    def bubble_fraction(busy_before: Sequence[float], busy_after: Sequence[float], wall_s: float) -> float:
        """1 - sum(busy of all stages) / (num_stages * wall) between two stage_busy_seconds() snapshots."""
        return bubble_fraction(busy_before, busy_after, wall_s)

    # ---- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
    ) -> list[Completion]:
        """Run every prompt to completion (continuous batching across them); results in order."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise EngineError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        return self._call(self._generate(prompts, params))

    async def _generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Completion]:
        checked = [self._check(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        head = self._running_head()
        streams = [head.submit(p, sp) for p, sp in zip(prompts, checked, strict=True)]
        return list(await asyncio.gather(*(self._collect(s) for s in streams)))

    def _check(self, i: int, prompt: Sequence[int], sp: SamplingParams) -> SamplingParams:
        """The one request validator (trellis.core.request), its message prefixed with the prompt."""
        try:
            return check_request(prompt, sp, self.limits)
        except InvalidRequest as e:
            raise EngineError(f"prompt {i}: {e}") from None

    async def _collect(self, stream) -> Completion:
        out = Completion(list(stream.prompt_ids), submitted_at=time.perf_counter())
        try:
            async for delta in stream:
                out.token_times.extend([time.perf_counter()] * len(delta.token_ids))
                if out.first_logits is None and delta.logits is not None:
                    out.first_logits = delta.logits
                out.token_ids.extend(delta.token_ids)
                out.logprobs.extend(delta.logprobs)
                out.finish_reason = delta.finish_reason
        except ReplicaFailed as e:
            raise EngineError(f"the engine failed: {e}") from None
        return out

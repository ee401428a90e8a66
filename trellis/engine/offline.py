"""The offline engine: one replica (TP x PP) on this host, driven from Python or `trellis generate`.

This process is rank 0 of the head stage; the head's TP peers and every later stage run as child
processes, linked into a ring over UCX exactly as in the mesh (which adds gRPC on top).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trellis.core import log
from trellis.core.errors import ModelError
from trellis.core.handoff_rules import handoff_ranks, sliced_handoff_problem
from trellis.core.layout import default_num_blocks, split_layers
from trellis.core.model_config import ModelConfig, check_parallel
from trellis.core.net import free_ports
from trellis.core.sampling import SamplingParams
from trellis.runtime.busy import bubble_fraction
from trellis.runtime.executor import StageExecutor
from trellis.runtime.handoff import HandoffError
from trellis.runtime.head import Head, ReplicaFailed, ring_handshake
from trellis.runtime.launch import StageLaunch
from trellis.runtime.model import loader
from trellis.runtime.rank import model_config
from trellis.runtime.stage_proc import LINK_TIMEOUT_S
from trellis.scheduling.scheduler import Scheduler, SchedulerConfig
from trellis.transport import ucx
from trellis.transport.ucx import Listener, connect

GREEDY = SamplingParams()  # frozen: safe as a shared default


class EngineError(Exception):
    """A bad engine argument or request, told in one line."""


@dataclass
class EngineArgs:
    model: str | None = None  # a Hugging Face directory
    preset: str | None = None  # or a built-in config with dummy weights
    tp: int = 1
    pp: int = 1
    device: str = "cpu"
    gpus: tuple[int, ...] = ()  # default 0 .. tp*pp-1
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    load_format: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    return_logits: bool = False  # keep each sequence's first-step logits (tests)
    cuda_graphs: bool = True  # decode steps as CUDA graphs (on CUDA only)
    gpu_memory_utilization: float = 0.85
    one_shot_max_bytes: int = 0  # TP all-reduces up to this size over peer memory (0: NCCL only)
    decode_burst: int = 1  # greedy decode steps per plan when nobody waits (one stage only)
    max_in_flight: int | None = None  # micro-batches in flight; default the number of stages (pp)


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_logits: torch.Tensor | None = None
    submitted_at: float = 0.0  # time.perf_counter() at submission, then when each token arrived
    token_times: list[float] = field(default_factory=list)


def check_weight_files(model_dir: str) -> None:
    """Open every safetensors file of the checkpoint (headers only): a missing, truncated or corrupt
    file is then a one-line error here, not a crash inside a child process after the others loaded."""
    directory = Path(model_dir)
    for file in sorted(set(loader._weight_map(directory).values())):
        with loader._open(directory / file):
            pass


class Engine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        if (args.model is None) == (args.preset is None):
            raise EngineError("give exactly one of a model directory or a preset")
        if args.preset is not None:
            args.load_format = "dummy"
        if args.device == "cuda" and not torch.cuda.is_available():
            raise EngineError("--device cuda asked for, but no CUDA GPU is visible")
        self.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        try:
            probe = StageLaunch(
                args.model,
                args.preset,
                args.load_format,
                self.dtype,
                (0, 1),
                0,
                1,
                args.tp,
                args.device,
                (),
                "",
                0,
                args.block_size,
                1,
            )
            self.cfg: ModelConfig = model_config(probe)
            self.stage_layers = split_layers(self.cfg.num_hidden_layers, args.pp)
            for layers in self.stage_layers:
                check_parallel(self.cfg, args.tp, layers)
            if args.pp > 1 and (problem := sliced_handoff_problem(self.cfg.hidden_size, args.tp)):
                raise ModelError(problem)
            if args.load_format != "dummy":
                check_weight_files(args.model)
        except ModelError as e:
            raise EngineError(str(e)) from None
        if args.max_in_flight is not None and args.max_in_flight < 1:
            raise EngineError(f"max_in_flight must be >= 1, got {args.max_in_flight}")
        self.max_model_len = args.max_model_len or self.cfg.max_position_embeddings
        if args.num_blocks is not None:
            self.num_blocks = args.num_blocks
        elif args.device == "cuda":
            self.num_blocks = 0  # each stage fits its GPU; the ring agrees on the minimum at start
        else:
            self.num_blocks = default_num_blocks(
                self.cfg,
                block_size=args.block_size,
                max_model_len=self.max_model_len,
                max_num_seqs=args.max_num_seqs,
            )
        self._log = log.get()
        self._procs: list[subprocess.Popen] = []
        self._ucx_ports: list[tuple[int, ...]] = []  # per stage: where each TP rank listens
        self._dist_ports: list[int] = []  # per stage: its TP group's rendezvous
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

    # ---- start / stop ------------------------------------------------------------------------
    def _launch(self, stage: int) -> StageLaunch:
        a = self.args
        gpus = a.gpus or tuple(range(a.tp * a.pp))
        return StageLaunch(
            model_path=a.model,
            preset=a.preset,
            load_format=a.load_format,
            dtype=self.dtype,
            layers=self.stage_layers[stage],
            stage=stage,
            num_stages=a.pp,
            tp=a.tp,
            device=a.device,
            gpus=tuple(gpus[stage * a.tp : (stage + 1) * a.tp]) if a.device == "cuda" else (),
            dist_host="127.0.0.1",
            dist_port=self._dist_ports[stage],
            block_size=a.block_size,
            num_blocks=self.num_blocks,
            seed=a.seed,
            cuda_graphs=a.cuda_graphs and a.device == "cuda",
            max_model_len=self.max_model_len,
            max_num_seqs=a.max_num_seqs,
            gpu_memory_utilization=a.gpu_memory_utilization,
            one_shot_max_bytes=a.one_shot_max_bytes,
            ucx_ports=self._ucx_ports[stage],
            next_host="127.0.0.1",
            next_ucx_ports=self._ucx_ports[(stage + 1) % a.pp],
        )

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
        a = self.args
        # Every stage's UCX ports (its leader's ring port, then with the sliced hand-off one per peer
        # rank), then every stage's TP rendezvous port: taken in one call, so that none collide.
        ranks = handoff_ranks(a.tp, a.pp)
        flat = iter(free_ports(a.pp * (ranks + 1)))
        self._ucx_ports = [tuple(next(flat) for _ in range(ranks)) for _ in range(a.pp)]
        self._dist_ports = [next(flat) for _ in range(a.pp)]
        ports = [p[0] for p in self._ucx_ports]
        listener = Listener(ports[0], torch.device("cpu")) if a.pp > 1 else None
        try:
            await self._link_ring(ports, listener)
        finally:
            if listener is not None:
                listener.close()
        self._log.info("engine ready", tp=a.tp, pp=a.pp, layers=self.stage_layers, num_blocks=self.num_blocks)

    async def _link_ring(self, ports: list[int], listener: Listener | None) -> None:
        a = self.args
        for s in range(1, a.pp):
            nxt = ports[(s + 1) % a.pp]
            self._procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "trellis.runtime.stage_proc",
                        "--launch",
                        self._launch(s).to_json(),
                        "--listen-port",
                        str(ports[s]),
                        "--next",
                        f"127.0.0.1:{nxt}",
                        "--die-with-parent",
                    ]
                )
            )
        self.executor = StageExecutor(self._launch(0))
        await self.executor.start()
        outbound = inbound = None
        if a.pp > 1:
            outbound = await connect("127.0.0.1", ports[1], self.executor.ctx.device, timeout=LINK_TIMEOUT_S)
            inbound = await listener.accept(timeout=LINK_TIMEOUT_S)
            await self.executor.peers_linked()
        self.num_blocks = await ring_handshake(self.executor, outbound, inbound, LINK_TIMEOUT_S)
        sched = Scheduler(
            SchedulerConfig(
                num_blocks=self.num_blocks,
                block_size=a.block_size,
                max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                eos_token_ids=self.cfg.eos_token_ids,
                enable_prefix_caching=a.enable_prefix_caching,
                max_in_flight=a.max_in_flight or a.pp,
                max_decode_burst=a.decode_burst,
            )
        )
        self.head = Head(
            self.executor,
            sched,
            num_stages=a.pp,
            outbound=outbound,
            inbound=inbound,
            return_logits=a.return_logits,
        )
        self._runner = asyncio.create_task(self.head.run())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if hasattr(self, "head"):
            try:
                self._call(self._stop())
            except Exception as e:  # a broken replica still gets its processes reaped below
                self._log.warning("engine stop", error=str(e))
        started = hasattr(self, "_runner")
        for p in self._procs:
            if not started:  # a stage of a ring that never formed would wait for it for a long time
                p.kill()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        ucx.shutdown()

    async def _stop(self) -> None:
        await self.head.stop()
        await asyncio.wait_for(self._runner, 30)
        await self.executor.stop()
        for link in (self.head.outbound, self.head.inbound):
            if link is not None:
                await link.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- pipeline bubble -----------------------------------------------------------------------
    def stage_busy_seconds(self) -> list[float]:
        """Each stage's compute seconds so far (stage 0 first), over the steps that came back: a
        monotone snapshot; diff two of them, with the wall time between, for an interval's bubble."""
        return self._call(self._busy_snapshot())

    async def _busy_snapshot(self) -> list[float]:
        return self.head.stage_busy.snapshot()

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
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            self._check(i, p, sp)
        streams = [self.head.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        return list(await asyncio.gather(*(self._collect(s) for s in streams)))

    def _check(self, i: int, prompt: Sequence[int], sp: SamplingParams) -> None:
        if not prompt:
            raise EngineError(f"prompt {i} is empty")
        if len(prompt) >= self.max_model_len:
            raise EngineError(f"prompt {i} has {len(prompt)} tokens; the context is {self.max_model_len}")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EngineError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})"
            )
        if sp.problems():
            raise EngineError(f"prompt {i}: {'; '.join(sp.problems())}")

    async def _collect(self, stream) -> Completion:
        out = Completion(list(stream.prompt_ids), submitted_at=time.perf_counter())
        try:
            async for delta in stream:
                out.token_times.extend([time.perf_counter()] * len(delta.token_ids))
                if out.first_logits is None and delta.logits is not None:
                    out.first_logits = delta.logits
                out.token_ids.extend(delta.token_ids)
                out.finish_reason = delta.finish_reason
        except ReplicaFailed as e:
            raise EngineError(f"the engine failed: {e}") from None
        return out

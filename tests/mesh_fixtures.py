"""Shared pieces of the mesh tests: tiny checkpoints, meshes of real processes, streams and process checks.

Every mesh runs under `running_mesh`, which stops it (SIGTERM, then SIGKILL) even when a test fails.
Starting a mesh costs ~30 s of the 2 CI cores, so tests share them: `serving_mesh` (2 replicas x 2
stages x TP 2, the demo tokenizer) serves every test that does not break it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from tokenizers import Tokenizer

from tests.checkpoints import NORM_JITTER, WEIGHT_STD, make_checkpoint
from trellis.core.spec import DeploySpec
from trellis.deploy.demo_model import demo_model
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh, Service
from trellis.v1 import stage_pb2, stage_pb2_grpc

START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
MESH_ENV = {"TRELLIS_LOG_LEVEL": "WARNING"}


# ---- checkpoints ---------------------------------------------------------------------------------


def tokenized_checkpoint(path: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A tiny Llama with the demo's byte-level BPE tokenizer and wide random weights.

    Wide weights (as in tests.checkpoints) keep greedy candidates far apart, so every TP x PP split
    picks the same tokens as transformers; the real tokenizer gives text, UTF-8 and stop strings.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + NORM_JITTER * noise if "norm" in name else WEIGHT_STD * noise)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model (tokenizer and a briefly trained Llama), built for this session: tests only need
    its real tokenizer, so a few training steps do."""
    return demo_model(tmp_path_factory.mktemp("demo") / "demo-llama", train_steps=20)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def tokenized_ckpt(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenized_checkpoint(tmp_path_factory.mktemp("tokenized") / "ckpt", demo_dir)


@pytest.fixture(scope="session")
def plain_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GQA Llama without a tokenizer (prompts are token ids; vocab 1000, 512 positions)."""
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("plain") / "ckpt")


# ---- meshes --------------------------------------------------------------------------------------


@contextmanager
def running_mesh(
    spec: DeploySpec, *, start: bool = True, env: dict[str, str] | None = None, log_dir: Path | None = None
) -> Iterator[Mesh]:
    """A mesh of real processes, stopped on the way out whatever happens. With start=False the test
    starts services itself (mesh.start_service; from the main thread: children die with their
    starting thread)."""
    mesh = Mesh(spec, env={**MESH_ENV, **(env or {})}, log_dir=log_dir)
    try:
        if start:
            mesh.start()
            mesh.wait_ready(timeout=START_TIMEOUT_S)
        yield mesh
    finally:
        mesh.stop(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def serving_mesh(tokenized_ckpt: Path) -> Iterator[Mesh]:
    """2 replicas x 2 stages x TP 2 on the tokenized checkpoint: shared by every test that leaves it whole."""
    with running_mesh(local_spec(str(tokenized_ckpt), replicas=2, stages=2, tp=2)) as mesh:
        yield mesh


def service(mesh: Mesh, name: str) -> Service:
    return next(s for s in mesh.services if s.name == name)


def head_address(mesh: Mesh, replica: str) -> str:
    return service(mesh, f"{replica}/stage-0").address


def stage_stats(address: str, timeout: float = 5.0) -> stage_pb2.StageStats:
    """The Stats RPC of a stage leader."""
    with grpc.insecure_channel(address) as channel:
        return stage_pb2_grpc.StageWorkerStub(channel).Stats(stage_pb2.StatsRequest(), timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Seconds until condition() holds; fails the test past timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"still not true after {timeout:.0f} s: {what}")
        time.sleep(interval)
    return time.monotonic() - start


# ---- streams -------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    """What a client saw of one Generate stream."""

    replica: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    finish_reason: str = ""
    completion_tokens: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    ended_at: float = 0.0  # time.monotonic() when the stream ended

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def collect(stream: Iterator, result: StreamResult | None = None) -> StreamResult:
    """Read a stream to its end; an RPC error is recorded, not raised."""
    out = result or StreamResult()
    try:
        for resp in stream:
            if resp.replica:
                out.replica = resp.replica
                out.prompt_token_ids = list(resp.prompt_token_ids)
            out.token_ids.extend(resp.token_ids)
            out.deltas.append(resp.text)
            if resp.finish_reason:
                out.finish_reason = resp.finish_reason
                out.completion_tokens = resp.usage.completion_tokens
    except grpc.RpcError as e:
        out.code, out.details = e.code(), e.details() or ""
    out.ended_at = time.monotonic()
    return out


class StreamReader:
    """Reads one stream on a thread; `first` is set once the first response (with the replica) came."""

    def __init__(self, stream: Iterator) -> None:
        self.stream = stream
        self.result = StreamResult()
        self.first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        class Marking:
            def __init__(self, inner: Iterator, first: threading.Event) -> None:
                self.inner, self.first_seen = inner, first

            def __iter__(self) -> Iterator:
                for resp in self.inner:
                    yield resp
                    self.first_seen.set()

        collect(Marking(self.stream, self.first), self.result)
        self.first.set()  # also when the stream failed before its first response

    def join(self, timeout: float) -> StreamResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout} s"
        return self.result


# ---- processes -----------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents.setdefault(int(stat[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if pid_alive(p)]


def mesh_pids(mesh: Mesh) -> list[int]:
    """Every process of the mesh: each service and whatever it spawned (TP peers)."""
    pids = []
    for svc in mesh.services:
        if svc.proc is not None and pid_alive(svc.proc.pid):
            pids += [svc.proc.pid, *descendants(svc.proc.pid)]
    return pids

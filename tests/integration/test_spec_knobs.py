"""A knob set in a deploy spec's `engine:` section reaches the head's scheduler and the runner with
its value: through the real spec parser (YAML on disk) and the real bootstrap, of the stage service
and of the offline engine. CPU, a tiny checkpoint, one stage in this process (no child processes).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

import pytest
import yaml

from services.stage_worker.service import StageService
from tests.checkpoints import make_checkpoint
from trellis.core.model_config import load_model_config
from trellis.core.net import free_ports
from trellis.core.spec import DeploySpec, load
from trellis.engine import Engine, EngineArgs
from trellis.runtime.head import Head
from trellis.runtime.runner import StageRunner
from trellis.transport import ucx

# Each differs from its default, so a knob that is dropped on the way shows.
KNOBS = {
    "enable_prefix_caching": False,
    "seed": 1234,
    "max_in_flight": 3,
    "decode_burst": 4,
    "block_size": 8,
    "num_blocks": 40,
    "max_num_seqs": 7,
    "max_num_batched_tokens": 96,
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> DeploySpec:
    ckpt = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("gqa"))
    port, ucx_port = free_ports(2)
    raw = {
        "model": {"path": str(ckpt), "dtype": "float32"},
        "replicas": [
            {
                "name": "r0",
                "stages": [
                    {
                        "layers": [0, load_model_config(ckpt).num_hidden_layers],
                        "port": port,
                        "ucx_port": ucx_port,
                    }
                ],
            }
        ],
        "engine": KNOBS,
    }
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(path)


@dataclass(frozen=True)
class Seen:
    """What the head's scheduler and the runner run with."""

    enable_prefix_caching: bool
    seed: int
    max_in_flight: int
    decode_burst: int
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int


def seen(head: Head, runner: StageRunner) -> Seen:
    sched = head.scheduler.config
    assert runner.block_size == sched.block_size and runner.num_blocks == sched.num_blocks
    return Seen(
        enable_prefix_caching=sched.enable_prefix_caching,
        seed=runner.sampler.generator.initial_seed(),
        max_in_flight=sched.max_in_flight,
        decode_burst=sched.decode_burst,
        block_size=runner.block_size,
        num_blocks=runner.num_blocks,
        max_num_seqs=sched.max_num_seqs,
        max_num_batched_tokens=sched.max_num_batched_tokens,
    )


class NoServer:
    """The stage's gRPC server, left out: the life cycle only starts, flags and stops it."""

    serving: list[bool]

    def __init__(self) -> None:
        self.serving = []

    async def start(self) -> None:
        pass

    async def set_serving(self, serving: bool) -> None:
        self.serving.append(serving)

    async def stop(self, grace: float | None) -> None:
        pass


def test_the_spec_parser_keeps_every_knob(spec: DeploySpec) -> None:
    assert {k: getattr(spec.engine, k) for k in KNOBS} == KNOBS


@pytest.mark.timeout(120)
def test_a_spec_s_knobs_reach_the_stage_service_s_scheduler_and_runner(spec: DeploySpec) -> None:
    service = StageService(spec, 0, 0, spec.check_model())
    server = NoServer()

    async def serve_then_stop() -> tuple[Seen, int]:
        run = asyncio.create_task(service.run(server))
        while service.head is None or not service.ready:
            if run.done():
                run.result()  # raises what broke the start
            await asyncio.sleep(0.02)
        got = seen(service.head, service.executor.ctx.runner)
        os.kill(os.getpid(), signal.SIGTERM)  # the service's own handler: drain, stop the ring
        return got, await asyncio.wait_for(run, 60)

    try:
        got, code = asyncio.run(serve_then_stop())
    finally:
        ucx.shutdown()
    assert got == Seen(**KNOBS)
    assert code == 0 and server.serving == [True, False]
    assert service.executor.launch.engine == spec.engine  # the whole config reached the rank


@pytest.mark.timeout(120)
def test_a_spec_s_knobs_reach_the_offline_engine_s_scheduler_and_runner(spec: DeploySpec) -> None:
    args = EngineArgs(model=spec.model.path, dtype=spec.model.dtype, engine=spec.engine)
    with Engine(args) as engine:
        got = seen(engine.head, engine.executor.ctx.runner)
        outs = engine.generate([[5, 9, 2, 7]])  # and it serves with them
    assert got == Seen(**KNOBS)
    assert len(outs[0].token_ids) > 0

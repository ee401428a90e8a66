"""Specs for one host: every service on 127.0.0.1, ports picked free (the demo, tests, benchmarks)."""

from __future__ import annotations

from trellis.core.engine_config import EngineConfig
from trellis.core.handoff_rules import handoff_ranks
from trellis.core.layout import split_layers
from trellis.core.model_config import load_model_source
from trellis.core.net import free_port_runs
from trellis.core.spec import DeploySpec, ModelSpec, ReplicaSpec, RouterSpec, StageSpec


def local_spec(
    model_path: str | None = None,
    *,
    preset: str | None = None,
    replicas: int = 1,
    stages: int = 1,
    tp: int = 1,
    router_port: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    registry: str = "embedded",
    engine: EngineConfig | None = None,
    max_queue: int = 256,
    max_model_len: int | None = None,
) -> DeploySpec:
    """A model directory, or a preset (dummy weights, for benchmarks)."""
    cfg = load_model_source(model_path, preset)
    layers = split_layers(cfg.num_hidden_layers, stages)
    # Per stage: control, UCX (TP rank r of a multi-stage replica listens on ucx_port + r), rendezvous.
    ucx_run = handoff_ranks(tp, stages)
    ports = iter(free_port_runs([1] + [1, ucx_run, 1] * (replicas * stages)))
    router = RouterSpec(port=router_port or next(ports), max_queue=max_queue)
    gpu = iter(range(replicas * stages * tp))
    reps = []
    for r in range(replicas):
        sts = tuple(
            StageSpec(
                layers=layers[s],
                tp=tp,
                device=device,
                host="127.0.0.1",
                port=next(ports),
                ucx_port=next(ports),
                dist_port=next(ports),
                gpus=tuple(next(gpu) for _ in range(tp)) if device == "cuda" else (),
            )
            for s in range(stages)
        )
        reps.append(ReplicaSpec(name=f"r{r}", stages=sts))
    model = ModelSpec(
        path=model_path,
        preset=preset,
        load_format="dummy" if preset else "auto",
        dtype=dtype,
        max_model_len=max_model_len,
    )
    return DeploySpec(
        model=model, replicas=tuple(reps), router=router, engine=engine or EngineConfig(), registry=registry
    )

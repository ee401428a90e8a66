"""Specs for one host: every service on 127.0.0.1 (the router on `host`), ports picked free (the demo,
`trellis serve`, tests, benchmarks); and the check that a spec's ports are free before it starts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

from trellis.core.engine_config import EngineConfig
from trellis.core.handoff_rules import handoff_ranks
from trellis.core.layout import split_layers
from trellis.core.model_config import load_model_source
from trellis.core.net import free_port_runs
from trellis.core.spec import DeploySpec, KVStoreSpec, ModelSpec, ReplicaSpec, RouterSpec, StageSpec
from trellis.wire.server import bind_problem

LOCAL_HOST = "127.0.0.1"


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
    host: str = LOCAL_HOST,
    http: bool = False,
    http_port: int = 0,
    metrics: bool = False,
    served_model_name: str | None = None,
    gpus: tuple[int, ...] = (),
    kv_store: KVStoreSpec | None = None,
    router_policy: str = "least-load",
    shapes: Sequence[tuple[int, int, str]] = (),
    router: dict[str, Any] | None = None,
) -> DeploySpec:
    """A model directory, or a preset (dummy weights, for benchmarks). A port given as 0 is picked
    free; the HTTP API (`http`) and /metrics on every service (`metrics`) are off unless asked for.
    On cuda, stage s of replica r takes the next `tp` of `gpus` (default 0, 1, ...). `kv_store`
    (its sizes and policies; None: no store) runs on 127.0.0.1 with its ports placed as the
    others' (no UCX port: its workers are on this host and read its slab through shared memory).
    `shapes`: one (tp, stages, role) per replica instead of `replicas` alike (e.g. P/D pairs of
    different shapes); `router`: more RouterSpec fields."""
    cfg = load_model_source(model_path, preset)
    shapes = tuple(shapes) or ((tp, stages, "both"),) * replicas
    # Per stage: control, UCX (TP rank r of a multi-stage replica listens on ucx_port + r), rendezvous.
    n_stages = sum(st for _, st, _ in shapes)
    n_metrics = (1 + n_stages + int(kv_store is not None)) if metrics else 0
    n_kv = int(kv_store is not None)
    stage_runs = [run for t, st, _ in shapes for _ in range(st) for run in (1, handoff_ranks(t, st), 1)]
    runs = [1, *stage_runs] + [1] * (int(http) + n_metrics + n_kv)
    ports = iter(free_port_runs(runs, host=LOCAL_HOST))
    port = next(ports)
    router_port = router_port or port
    stage_ports = [(next(ports), next(ports), next(ports)) for _ in range(n_stages)]
    router_spec = RouterSpec(
        host=host,
        port=router_port,
        max_queue=max_queue,
        http_port=(http_port or next(ports)) if http else 0,
        metrics_port=next(ports) if metrics else 0,
        policy=router_policy,
        **(router or {}),
    )
    gpu = iter(gpus or range(sum(t * st for t, st, _ in shapes)))
    placed = iter(stage_ports)
    reps = []
    for r, (tp, stages, role) in enumerate(shapes):
        layers = split_layers(cfg.num_hidden_layers, stages)
        sts = []
        for s in range(stages):
            control, ucx, dist = next(placed)
            sts.append(
                StageSpec(
                    layers=layers[s],
                    tp=tp,
                    device=device,
                    host=LOCAL_HOST,
                    port=control,
                    ucx_port=ucx,
                    dist_port=dist,
                    gpus=tuple(next(gpu) for _ in range(tp)) if device == "cuda" else (),
                    metrics_port=next(ports) if metrics else 0,
                )
            )
        reps.append(ReplicaSpec(name=f"r{r}", stages=tuple(sts), role=role))
    model = ModelSpec(
        path=model_path,
        preset=preset,
        load_format="dummy" if preset else "auto",
        dtype=dtype,
        max_model_len=max_model_len,
        served_model_name=served_model_name,
    )
    if kv_store is not None:
        kv_store = replace(
            kv_store,
            host=LOCAL_HOST,
            port=kv_store.port or next(ports),
            ucx_port=0,
            metrics_port=(kv_store.metrics_port or next(ports)) if metrics else kv_store.metrics_port,
        )
    return DeploySpec(
        model=model,
        replicas=tuple(reps),
        router=router_spec,
        engine=engine or EngineConfig(),
        kv_store=kv_store,
        registry=registry,
    )


def spec_ports(spec: DeploySpec) -> Iterator[tuple[str, str, int]]:
    """(field, host, port) of every port the spec's services listen on (0s left out)."""
    r = spec.router
    yield from (("router.port", r.host, r.port), ("router.http_port", r.host, r.http_port))
    yield ("router.metrics_port", r.host, r.metrics_port)
    for i, rep in enumerate(spec.replicas):
        for j, st in enumerate(rep.stages):
            w = f"replicas[{i}].stages[{j}]"
            ucx = [(f"{w}.ucx_port", st.ucx_port)]
            if st.ucx_port:
                n = handoff_ranks(st.tp, len(rep.stages))
                ucx += [(f"{w}.ucx_port (+{k}: TP rank {k})", st.ucx_port + k) for k in range(1, n)]
            named = [(f"{w}.port", st.port), *ucx, (f"{w}.dist_port", st.dist_port)]
            named.append((f"{w}.metrics_port", st.metrics_port))
            yield from ((name, st.host, port) for name, port in named)
    if (kv := spec.kv_store) is not None:
        yield from (("kv_store.port", kv.host, kv.port), ("kv_store.ucx_port", kv.host, kv.ucx_port))
        yield ("kv_store.metrics_port", kv.host, kv.metrics_port)


def busy_port(spec: DeploySpec) -> str | None:
    """One line naming the first port of the spec that this host cannot listen on, or None: checked
    before any process starts, so a busy port is that line rather than a service dying later."""
    for field, host, port in spec_ports(spec):
        if port and (problem := bind_problem(host, port)):
            return f"{field}: cannot listen on {host}:{port}: {problem}"
    return None


def port_or_free(host: str, preferred: int) -> int:
    """`preferred` when this host can listen on it now, else 0 (for local_spec to pick one free)."""
    return 0 if bind_problem(host, preferred) else preferred

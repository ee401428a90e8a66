"""The best plan as a deploy spec (``trellis.core.spec``) that ``trellis up`` runs.

Ports are handed out in order from ``base_port``: the router takes the first; then each stage of
each replica takes a control port, ``tp`` consecutive UCX ports and a torch.distributed port;
a KV store (only with a prefill/decode split, which moves KV through it) takes the next two.
Hosts are ``node-K`` (or the cluster file's names), or 127.0.0.1 when everything fits one node.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from trellis.core.engine_config import EngineConfig
from trellis.core.spec import (
    DeploySpec,
    KVStoreSpec,
    ModelSpec,
    ReplicaSpec,
    RouterSpec,
    StageSpec,
)
from trellis.planner.errors import PlanError
from trellis.planner.search import Candidate, Plan

SPEC_DTYPES = MappingProxyType({"bf16": "bfloat16", "fp16": "float16"})


def build_spec(plan: Plan, c: Candidate, base_port: int = 50051) -> DeploySpec:
    dtype = SPEC_DTYPES.get(plan.options.weight_dtype)
    if dtype is None:
        raise PlanError(
            f"--emit-spec: the deploy spec has no {plan.options.weight_dtype} weights "
            f"(it takes {', '.join(SPEC_DTYPES)})"
        )
    lay, cluster = c.layout, plan.cluster
    one_node = lay.gpus <= cluster.gpus_per_node

    def host(node: int) -> str:
        return "127.0.0.1" if one_node else cluster.host(node)

    port = base_port + 1
    replicas = []
    for r in range(lay.dp):
        stages = []
        for j, layers in enumerate(lay.stage_layers):
            first_gpu = r * lay.size + j * lay.tp
            node = first_gpu // cluster.gpus_per_node
            gpus = tuple(g % cluster.gpus_per_node for g in range(first_gpu, first_gpu + lay.tp))
            stages.append(
                StageSpec(
                    layers=layers,
                    tp=lay.tp,
                    device="cuda",
                    gpus=gpus,
                    host=host(node),
                    port=port,
                    ucx_port=port + 1,
                    dist_port=port + 1 + lay.tp,
                )
            )
            port += lay.tp + 2
        role = "both" if not lay.split else "prefill" if r < lay.prefill_replicas else "decode"
        name = f"r{r}" if role == "both" else f"{role}-{r}"
        replicas.append(ReplicaSpec(name=name, stages=tuple(stages), role=role))
    kv_store = None
    if lay.split:
        kv_store = KVStoreSpec(host=host(0), port=port, ucx_port=port + 1)
        port += 2
    if port - 1 > 65535:
        raise PlanError(f"--base-port {base_port}: the plan needs {port - base_port} ports, past 65535")
    m = plan.model
    model = (
        ModelSpec(preset=m.preset, load_format="dummy", dtype=dtype)
        if m.preset
        else ModelSpec(path=str(_model_dir(m.name)), dtype=dtype)
    )
    engine = EngineConfig(
        max_num_seqs=plan.options.max_seqs,
        max_num_batched_tokens=plan.options.max_batched_tokens,
        gpu_memory_utilization=plan.options.utilization,
    )
    return DeploySpec(
        model=model,
        replicas=tuple(replicas),
        router=RouterSpec(host=host(0), port=base_port),
        engine=engine,
        kv_store=kv_store,
    )


def _model_dir(source: str) -> Path:
    p = Path(source)
    return p.parent if p.is_file() else p


def emit_spec(plan: Plan, c: Candidate, path: str | Path, base_port: int = 50051) -> DeploySpec:
    """Write the spec, headed by a comment that says what was planned and predicted."""
    spec = build_spec(plan, c, base_port)
    spec.dump(path)
    m, cl = plan.model, plan.cluster
    head = (
        f"# Written by trellis plan: {m.name} ({plan.options.weight_dtype}) as {c.layout.label()} "
        f"on {cl.total_gpus} x {cl.gpu.name}.\n"
        f"# Predicted: {c.capacity:,.2f} req/s within the SLOs; at {c.rate:,.2f} req/s TPOT p99 "
        f"{c.tpot_p99_s * 1e3:.1f} ms, TTFT p99 {c.ttft_p99_s * 1e3:.0f} ms.\n"
    )
    file = Path(path)
    file.write_text(head + file.read_text())
    return spec

"""The deploy spec: the serving graph as data (model, replicas, stages, hosts, ports).

A spec is YAML, validated once on load; any error names the field at fault, e.g.
``replicas[0].stages[1].layers: expected [start, end) with start < end``.
`trellis plan --emit-spec` writes one, `trellis up` and the deploy generators read one.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trellis.core.engine_config import EngineConfig
from trellis.core.errors import ConfigError, ModelError, SpecError
from trellis.core.handoff_rules import handoff_ranks, sliced_handoff_problem
from trellis.core.model_config import ModelConfig, check_parallel, load_model_source
from trellis.core.spec_fields import (
    fields_of,
    from_mapping,
    gpu_list,
    integer,
    layers_range,
    optional,
    port,
    seconds,
    string,
    typed,
)

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")
ROLES = ("both", "prefill", "decode")
ROUTER_POLICIES = ("least-load", "kv-aware")
KV_WRITE_POLICIES = ("second-use", "write-through")


@dataclass(frozen=True)
class ModelSpec:
    path: str | None = None  # local Hugging Face directory (config.json, safetensors, tokenizer.json)
    preset: str | None = None  # or a built-in config (trellis.core.presets), dummy weights only
    load_format: str = "auto"
    dtype: str = "bfloat16"
    max_model_len: int | None = None  # default: the config's max_position_embeddings
    tokenizer: str | None = None  # default: path
    served_model_name: str | None = None  # the name clients use; default: the directory's or preset's

    @property
    def name(self) -> str:
        """The model's name in the APIs: served_model_name, else the directory's name, else the preset."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.path).name if self.path else str(self.preset)


@dataclass(frozen=True)
class StageSpec:
    layers: tuple[int, int]  # [start, end)
    tp: int = 1
    device: str = "cpu"
    gpus: tuple[int, ...] = ()  # one CUDA device index per TP rank, when device is cuda
    host: str = "127.0.0.1"
    port: int = 0  # gRPC control API of the stage leader
    # UCX listener of the stage leader (activations in, sampled ids for a head). In a replica of
    # several stages, TP rank r also listens on ucx_port + r for its 1/tp slice of the hidden states
    # (from rank r of the previous stage): the stage takes ports ucx_port .. ucx_port + tp - 1.
    ucx_port: int = 0
    dist_port: int = 0  # torch.distributed rendezvous of the stage's TP group
    metrics_port: int = 0  # Prometheus /metrics of the stage leader (0: none)


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    stages: tuple[StageSpec, ...]
    role: str = "both"


@dataclass(frozen=True)
class RouterSpec:
    host: str = "127.0.0.1"
    port: int = 50051
    max_queue: int = 256  # requests admitted at once; past it, RESOURCE_EXHAUSTED
    http_port: int = 0  # the OpenAI-compatible HTTP API (0: none)
    metrics_port: int = 0  # Prometheus /metrics (0: none)
    # The clients' bearer token is read from this environment variable (never from the spec, which
    # travels in ConfigMaps and logs); unset or empty: no authentication.
    api_key_env: str = "TRELLIS_API_KEY"
    # Replica choice: least-load, or kv-aware (the estimated TTFT from what each replica and the
    # KV store already hold of the prompt, its queued prefill and its decode load).
    policy: str = "least-load"
    speculative_ttl_s: float = 2.0  # kv-aware: a decision counts as "that replica holds it" this long
    # P/D (replicas with role prefill / decode): a prompt whose part the decode replica lacks is at
    # most this many tokens runs there whole; a longer one is prefilled on a prefill replica.
    max_local_prefill_tokens: int = 512
    handoff_timeout_s: float = 30.0  # a hand-off's deadline: the reservation and the transfer record


@dataclass(frozen=True)
class KVStoreSpec:
    name: str = "kv0"  # the store's location in the block index
    host: str = "127.0.0.1"
    port: int = 0  # gRPC control API
    ucx_port: int = 0  # the bytes across hosts (not used on one host: shared memory)
    metrics_port: int = 0  # Prometheus /metrics (0: none)
    capacity_bytes: int = 1 << 30  # the pinned host tier (a shared-memory slab of block slots)
    shm_dir: str = "/dev/shm"  # where the slab file lives (a tmpfs)
    disk_path: str | None = None  # the disk tier's directory (None: no disk tier)
    disk_capacity_bytes: int = 0
    write_policy: str = "second-use"  # a block goes to the store on its second use, or always
    lease_ttl_s: float = 30.0  # a read lease; the slots are the reader's until then
    put_timeout_s: float = 10.0  # an uncommitted put is reclaimed after this
    rpc_timeout_s: float = 0.5  # a worker's deadline for each store RPC; past it, recompute


@dataclass(frozen=True)
class DeploySpec:
    model: ModelSpec
    replicas: tuple[ReplicaSpec, ...]
    router: RouterSpec = field(default_factory=RouterSpec)
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_store: KVStoreSpec | None = None
    registry: str = "embedded"  # or redis://HOST:PORT/DB

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items() if x is not None}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def check_layers(self, num_layers: int) -> None:
        """Every replica's stages must tile [0, num_layers) in order."""
        for i, rep in enumerate(self.replicas):
            expect = 0
            for j, st in enumerate(rep.stages):
                if st.layers[0] != expect:
                    raise SpecError(
                        f"replicas[{i}].stages[{j}].layers: starts at {st.layers[0]}, "
                        f"expected {expect} (stages must tile the layers in order)"
                    )
                expect = st.layers[1]
            if expect != num_layers:
                raise SpecError(
                    f"replicas[{i}].stages: cover layers [0, {expect}) but the model has {num_layers}"
                )

    def check_model(self) -> ModelConfig:
        """Check the spec against its model's config.json (or preset): the model can be read, every
        replica's stages tile its layers, every stage's TP size splits it. Errors name the field.
        Returns the model's config (read once, for the caller to use)."""
        try:
            cfg = load_model_source(self.model.path, self.model.preset)
        except ModelError as e:
            raise SpecError(f"model.{'preset' if self.model.preset else 'path'}: {e}") from None
        self.check_layers(cfg.num_hidden_layers)
        for i, rep in enumerate(self.replicas):
            for j, st in enumerate(rep.stages):
                try:
                    check_parallel(cfg, st.tp, st.layers)
                except ModelError as e:
                    raise SpecError(f"replicas[{i}].stages[{j}].tp: {e}") from None
        self.check_handoff(cfg.hidden_size)
        return cfg

    def check_handoff(self, hidden_size: int) -> None:
        """Between stages each TP rank hands its 1/tp slice of the hidden states to the same rank of
        the next stage: every stage of a replica needs the same tp, and tp must divide hidden_size."""
        for i, rep in enumerate(self.replicas):
            tp = rep.stages[0].tp
            for j, st in enumerate(rep.stages):
                if st.tp != tp:
                    raise SpecError(
                        f"replicas[{i}].stages[{j}].tp: {st.tp}, but stage 0 has {tp}: every stage of a "
                        "replica needs the same TP size (rank r hands its slice to rank r)"
                    )
            if len(rep.stages) > 1 and (problem := sliced_handoff_problem(hidden_size, tp)):
                raise SpecError(f"replicas[{i}].stages[0].tp: {problem}")


def balanced_layers(num_layers: int, pp: int) -> tuple[tuple[int, int], ...]:
    """Contiguous, balanced [start, end) ranges; earlier stages take the remainder. The one split
    the engine, the planner and generated specs all use (callers check 1 <= pp <= num_layers)."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for i in range(pp):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return tuple(ranges)


# ---- parsing -------------------------------------------------------------------------------------


def _stage(where: str, raw: Any) -> StageSpec:
    st = from_mapping(
        StageSpec,
        where,
        raw,
        {
            "layers": layers_range,
            "tp": integer(1),
            "device": string(DEVICES),
            "gpus": gpu_list,
            "host": string(),
            "port": port,
            "ucx_port": port,
            "dist_port": port,
            "metrics_port": port,
        },
        required={"layers"},
    )
    if st.device == "cuda" and len(st.gpus) != st.tp:
        raise SpecError(
            f"{where}.gpus: a cuda stage needs one GPU per TP rank ({st.tp}), got {list(st.gpus)}"
        )
    if st.device == "cpu" and st.gpus:
        raise SpecError(f"{where}.gpus: a cpu stage takes no GPUs")
    return st


def _replica(where: str, raw: Any) -> ReplicaSpec:
    raw = fields_of(where, raw, {"name", "stages", "role"}, {"name", "stages"})
    stages = raw["stages"]
    if not isinstance(stages, list) or not stages:
        raise SpecError(f"{where}.stages: expected a non-empty list of stages")
    return ReplicaSpec(
        name=typed(f"{where}.name", raw["name"], str),
        stages=tuple(_stage(f"{where}.stages[{j}]", s) for j, s in enumerate(stages)),
        role=typed(f"{where}.role", raw.get("role", "both"), str, choices=ROLES),
    )


def parse(raw: Any) -> DeploySpec:
    """Validate a spec given as plain data (what YAML parsed)."""
    top = fields_of(
        "spec", raw, {"model", "replicas", "router", "engine", "kv_store", "registry"}, {"model", "replicas"}
    )
    model = from_mapping(
        ModelSpec,
        "model",
        top["model"],
        {
            "path": optional(lambda w, v: os.path.expanduser(typed(w, v, str))),
            "preset": optional(string()),
            "load_format": string(LOAD_FORMATS),
            "dtype": string(DTYPES),
            "max_model_len": optional(integer(1)),
            "tokenizer": optional(string()),
            "served_model_name": optional(string()),
        },
    )
    if (model.path is None) == (model.preset is None):
        raise SpecError("model.path: give exactly one of model.path or model.preset")
    if model.preset is not None and model.load_format != "dummy":
        raise SpecError("model.load_format: a preset has no weights; use load_format: dummy")
    reps = top["replicas"]
    if not isinstance(reps, list) or not reps:
        raise SpecError("replicas: expected a non-empty list of replicas")
    replicas = tuple(_replica(f"replicas[{i}]", r) for i, r in enumerate(reps))
    names = [r.name for r in replicas]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise SpecError(f"replicas[{i}].name: duplicate replica name {n!r}")
    router = from_mapping(
        RouterSpec,
        "router",
        top.get("router"),
        {
            "host": string(),
            "port": port,
            "max_queue": integer(1),
            "http_port": port,
            "metrics_port": port,
            "api_key_env": string(),
            "policy": string(ROUTER_POLICIES),
            "speculative_ttl_s": seconds,
            "max_local_prefill_tokens": integer(0),
            "handoff_timeout_s": seconds,
        },
    )
    try:  # the knobs, their types and ranges are EngineConfig's own: listed once, there
        engine = EngineConfig.from_dict(top.get("engine"))
    except ConfigError as e:
        raise SpecError(str(e)) from None
    kv = top.get("kv_store")
    kv_store = (
        None
        if kv is None
        else from_mapping(
            KVStoreSpec,
            "kv_store",
            kv,
            {
                "name": string(),
                "host": string(),
                "port": port,
                "ucx_port": port,
                "metrics_port": port,
                "capacity_bytes": integer(1),
                "shm_dir": string(),
                "disk_path": optional(lambda w, v: os.path.expanduser(typed(w, v, str))),
                "disk_capacity_bytes": integer(0),
                "write_policy": string(KV_WRITE_POLICIES),
                "lease_ttl_s": seconds,
                "put_timeout_s": seconds,
                "rpc_timeout_s": seconds,
            },
        )
    )
    registry = typed("registry", top.get("registry", "embedded"), str)
    if registry != "embedded" and not registry.startswith("redis://"):
        raise SpecError(f"registry: expected 'embedded' or redis://HOST:PORT/DB, got {registry!r}")
    _check_ports(replicas, router, kv_store)
    return DeploySpec(
        model=model, replicas=replicas, router=router, engine=engine, kv_store=kv_store, registry=registry
    )


def _check_ports(
    replicas: tuple[ReplicaSpec, ...], router: RouterSpec, kv_store: KVStoreSpec | None = None
) -> None:
    seen: dict[tuple[str, int], str] = {}

    def claim(host: str, port: int, where: str) -> None:
        if port == 0:
            return
        if (host, port) in seen:
            raise SpecError(f"{where}: port {port} on {host} is already used by {seen[(host, port)]}")
        seen[(host, port)] = where

    claim(router.host, router.port, "router.port")
    claim(router.host, router.http_port, "router.http_port")
    claim(router.host, router.metrics_port, "router.metrics_port")
    if kv_store is not None:
        claim(kv_store.host, kv_store.port, "kv_store.port")
        claim(kv_store.host, kv_store.ucx_port, "kv_store.ucx_port")
        claim(kv_store.host, kv_store.metrics_port, "kv_store.metrics_port")
    for i, rep in enumerate(replicas):
        for j, st in enumerate(rep.stages):
            w = f"replicas[{i}].stages[{j}]"
            claim(st.host, st.port, f"{w}.port")
            claim(st.host, st.ucx_port, f"{w}.ucx_port")
            n = handoff_ranks(st.tp, len(rep.stages)) if st.ucx_port else 1  # rank r: ucx_port + r
            if (last := st.ucx_port + n - 1) > 65535:
                raise SpecError(f"{w}.ucx_port: TP rank {n - 1} listens on {last}, past 65535")
            for r in range(1, n):
                claim(st.host, st.ucx_port + r, f"{w}.ucx_port (+{r}: TP rank {r}'s UCX port)")
            claim(st.host, st.dist_port, f"{w}.dist_port")
            claim(st.host, st.metrics_port, f"{w}.metrics_port")


def load(path: str | Path) -> DeploySpec:
    """Read and validate a YAML spec file."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise SpecError(f"{p}: cannot read the spec ({e.strerror})") from None
    except yaml.YAMLError as e:  # its text spans lines; one line says where and what
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"{p}: not valid YAML ({where}{problem})") from None
    return parse(raw)

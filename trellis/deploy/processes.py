"""The processes a deploy spec implies, described once: what `trellis up` spawns and what the
compose, systemd and Kubernetes generators render. Neither builds a command line of its own, so
they cannot drift apart.

Every process is `python -m MODULE ARGS` with ENV on top of its host's environment; it listens on
the ports it lists, answers grpc.health.v1 at `health`, and needs the CUDA devices in `gpus`
(device ids as the spec names them, on its host).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, replace
from typing import Literal

import yaml

from trellis.core.errors import SpecError
from trellis.core.handoff_rules import rank_ucx_ports
from trellis.core.spec import DeploySpec

ProcessKind = Literal["router", "stage", "kv_store"]

ROUTER_MODULE = "services.router"
STAGE_MODULE = "services.stage_worker"
KV_STORE_MODULE = "services.kv_store"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bound on every interface: checked through loopback


@dataclass(frozen=True)
class Ports:
    """The ports a process listens on (0: none). `ucx` lists one port per listening TP rank."""

    grpc: int
    ucx: tuple[int, ...] = ()
    dist: int = 0
    http: int = 0
    metrics: int = 0

    def named(self) -> dict[str, int]:
        """Every port that is set, by a name usable in a manifest (grpc, ucx-0.., dist, http, metrics)."""
        out = {"grpc": self.grpc, "dist": self.dist, "http": self.http, "metrics": self.metrics}
        out.update({f"ucx-{r}": p for r, p in enumerate(self.ucx)})
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class HealthCheck:
    """grpc.health.v1 Check (the overall service, "") at host:port: SERVING once the process serves."""

    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProcessSpec:
    """One process of a mesh. Invariant: argv(python) is the whole command; env holds only what the
    spec implies (no secrets: the router reads its API key from the variable router.api_key_env
    names, which the deployment provides)."""

    name: str  # "router", "REPLICA/stage-S" or "kv-store": unique within a spec
    kind: ProcessKind
    module: str
    args: tuple[str, ...]
    host: str
    ports: Ports
    health: HealthCheck
    env: tuple[tuple[str, str], ...] = ()
    device: str = "cpu"
    gpus: tuple[int, ...] = ()  # CUDA device ids on its host, one per TP rank
    replica: str | None = None
    stage: int | None = None

    @property
    def slug(self) -> str:
        """The name as a DNS label (a unit, container or Kubernetes object name): r0-stage-1."""
        return slug(self.name)

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.env)

    def argv(self, python: str) -> list[str]:
        return [python, "-m", self.module, *self.args]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"


def process_env(spec: DeploySpec, cpu_count: int | None) -> tuple[tuple[str, str], ...]:
    """The environment every process of the spec gets (the same for all of them)."""
    env = []
    # torch's default (a compute thread per core in every process) oversubscribes the cores when
    # several CPU ranks share a host, and each step crawls (10x and worse): split the cores instead.
    ranks = sum(st.tp for rep in spec.replicas for st in rep.stages)
    env.append(("OMP_NUM_THREADS", str(max(1, (cpu_count or 1) // ranks))))
    # ucxx's default waits for a UCX request by yielding in a loop, so an idle stage leader (always
    # waiting on its inbound link) spins a core, which CPU ranks need for compute: python futures let
    # it sleep, for ~0.6 ms more per hop (bench/mesh_cpu.py). GPU hosts keep the faster default.
    if all(st.device == "cpu" for rep in spec.replicas for st in rep.stages):
        env.append(("UCXPY_ENABLE_PYTHON_FUTURE", "1"))
    return tuple(env)


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def has_entry_point(module: str) -> bool:
    """Whether `python -m module` can run (a package needs its __main__)."""
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


def processes_for(
    spec: DeploySpec,
    spec_path: str,
    registry: str | None = None,
    *,
    cpu_count: int | None = None,
) -> tuple[ProcessSpec, ...]:
    """Every process of `spec`, in start order: the kv_store first (the stage workers use it from
    their first admission), the stages, the router last (it serves once it sees the stages); stop
    order is the reverse (the store outlives the workers that read its slab). Each reads the spec
    from `spec_path`; `registry` overrides the spec's for the router. cpu_count (default: this
    host's) splits the CPU threads among ranks.

    The kv_store is optional to serving: a worker that finds it down, slow or full recomputes, so
    nothing that runs these processes makes the others wait on the store's health or stop with it.
    Its ports are the spec's: the workers dial kv_store.host:port as written, so port 0 (which
    the runners place for no process) is refused here."""
    env = process_env(spec, cpu_count if cpu_count is not None else os.cpu_count())
    out: list[ProcessSpec] = []
    kv = spec.kv_store
    if kv is not None:
        if not kv.port:
            raise SpecError(
                "kv_store.port: not set (0): the stage workers dial the store at the spec's "
                "host:port, so it needs a port of its own (1..65535)"
            )
        out.append(
            ProcessSpec(
                name="kv-store",
                kind="kv_store",
                module=KV_STORE_MODULE,
                args=("--spec", spec_path),
                host=kv.host,
                ports=Ports(
                    grpc=kv.port,
                    ucx=(kv.ucx_port,) if kv.ucx_port else (),
                    metrics=kv.metrics_port,
                ),
                health=HealthCheck(_probe_host(kv.host), kv.port),
                env=env,
            )
        )
    for rep in spec.replicas:
        for j, st in enumerate(rep.stages):
            out.append(
                ProcessSpec(
                    name=f"{rep.name}/stage-{j}",
                    kind="stage",
                    module=STAGE_MODULE,
                    args=("--spec", spec_path, "--replica", rep.name, "--stage", str(j)),
                    host=st.host,
                    ports=Ports(
                        grpc=st.port,
                        ucx=rank_ucx_ports(st.ucx_port, st.tp, len(rep.stages)) if st.ucx_port else (),
                        dist=st.dist_port if st.tp > 1 else 0,
                        metrics=st.metrics_port,
                    ),
                    health=HealthCheck(_probe_host(st.host), st.port),
                    env=env,
                    device=st.device,
                    gpus=st.gpus,
                    replica=rep.name,
                    stage=j,
                )
            )
    r = spec.router
    out.append(
        ProcessSpec(
            name="router",
            kind="router",
            module=ROUTER_MODULE,
            args=("--spec", spec_path, *(("--registry", registry) if registry else ())),
            host=r.host,
            ports=Ports(grpc=r.port, http=r.http_port, metrics=r.metrics_port),
            health=HealthCheck(_probe_host(r.host), r.port),
            env=env,
        )
    )
    _check_unique_slugs(spec, out)
    return tuple(out)


def _check_unique_slugs(spec: DeploySpec, procs: list[ProcessSpec]) -> None:
    seen: dict[str, str] = {}
    for p in procs:
        if p.slug in seen:
            i = [r.name for r in spec.replicas].index(p.replica) if p.replica is not None else 0
            raise SpecError(
                f"replicas[{i}].name: {p.replica!r} makes the service name {p.slug!r}, "
                f"as {seen[p.slug]!r} does: use lowercase letters, digits and '-'"
            )
        seen[p.slug] = p.name


def isolated_gpus(spec: DeploySpec) -> DeploySpec:
    """The spec as a process sees it when it is given only its own GPUs (CUDA_VISIBLE_DEVICES, a
    container's reserved devices, a pod's nvidia.com/gpu): those are numbered 0.. inside, so each
    cuda stage's gpus become 0..tp-1 (TP rank r still runs on the device its original gpus[r] named,
    CUDA_VISIBLE_DEVICES listing them in that order). The generators ship this spec; `trellis up`,
    which isolates nothing, runs the spec as written."""
    reps = tuple(
        replace(
            rep,
            stages=tuple(
                replace(st, gpus=tuple(range(st.tp))) if st.device == "cuda" else st for st in rep.stages
            ),
        )
        for rep in spec.replicas
    )
    return replace(spec, replicas=reps)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def by_machine(procs: tuple[ProcessSpec, ...]) -> dict[str, tuple[ProcessSpec, ...]]:
    """The processes grouped by the machine they run on, named by its first host in the spec.
    Loopback names are one machine; a process bound on every interface (0.0.0.0) runs with the
    first named machine's processes (it names no machine of its own)."""

    def key(host: str) -> str:
        return "127.0.0.1" if host in LOOPBACK_HOSTS else host

    concrete = [key(p.host) for p in procs if p.host not in WILDCARD_HOSTS]
    default = concrete[0] if concrete else "0.0.0.0"
    names: dict[str, str] = {}
    for p in procs:
        names.setdefault(key(p.host), p.host)
    groups: dict[str, list[ProcessSpec]] = {}
    for p in procs:
        k = default if p.host in WILDCARD_HOSTS else key(p.host)
        groups.setdefault(names.get(k, k), []).append(p)
    return {m: tuple(ps) for m, ps in groups.items()}


def read_paths(spec: DeploySpec) -> tuple[str, ...]:
    """Host paths the processes read (the model's directory, its tokenizer): a container mounts
    them read-only at the same path, so the spec's paths hold as written."""
    paths = [p for p in (spec.model.path, spec.model.tokenizer) if p]
    return tuple(dict.fromkeys(paths))


KV_SHM_MARGIN_BYTES = 1 << 30


def kv_shm_bytes(spec: DeploySpec) -> int:
    """The shared memory the kv_store's host tier needs at kv_store.shm_dir: its slab
    (capacity_bytes) and a margin (the slab's header, the processes' own shared memory there:
    NCCL's buffers on a GPU stage whose /dev/shm it is). 0 without a kv_store."""
    return spec.kv_store.capacity_bytes + KV_SHM_MARGIN_BYTES if spec.kv_store else 0


def write_paths(spec: DeploySpec) -> tuple[str, ...]:
    """Host paths a process writes (the kv_store's disk tier)."""
    return (spec.kv_store.disk_path,) if spec.kv_store and spec.kv_store.disk_path else ()


def spec_text(spec: DeploySpec) -> str:
    """The spec as the generators ship it (what `DeploySpec.dump` writes)."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)

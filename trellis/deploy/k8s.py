"""Kubernetes manifests for a spec: the spec in a ConfigMap, a StatefulSet and a Service per stage,
the router in a Deployment with a Service, a headless Service for the peers, and for a spec with
`kv_store:` the KV store in a StatefulSet of one pod with a headless Service of its own.

Addresses: a process binds and is dialled at the host its spec names, so the ConfigMap holds the
spec as the cluster sees it (`cluster_view`): each stage's host is its pod's stable DNS name
(`trellis-r0-stage-0-0.trellis-peers.NS.svc.cluster.local`, from the headless Service, published
before the pod is ready so a stage can bind and its peers dial it while it loads), the router is named
by its Service and binds its own pod's IP (`--host $(POD_IP)`, from the downward API: a Deployment's
pods have no stable name of their own), and each stage's GPUs are numbered from 0, as its pod sees
them. The API key is
read from the Secret `trellis-api-key` (key `api-key`), referenced, never embedded.

Scaling, one number each: more routers are `replicas:` of the router Deployment (`kubectl scale
deployment/trellis-router --replicas=3`); a DP replica is one more entry under `replicas:` in the
spec, whose stages become StatefulSets of their own (re-render and apply; with a Redis registry the
routers pick it up as it registers, with the embedded one they read the new ConfigMap on restart).
The KV store is one pod whatever the number of replicas, with its own resources.

The KV store binds kv_store.host as written, like a stage (only the router is given --host
$(POD_IP)), so it is a StatefulSet: its pod's stable DNS name (`trellis-kv-store-0.trellis-kv-store.NS
.svc.cluster.local`) is kv_store.host in the cluster view. Its host tier is an emptyDir in memory at
kv_store.shm_dir (sizeLimit: capacity_bytes and a margin, counted in the pod's memory request and
limit); its disk tier a PersistentVolumeClaim of disk_capacity_bytes (an emptyDir when that is 0).
Shared memory does not cross pods: the stage workers, each in a pod of its own, cannot map the
store's slab, and serve by recomputing (one log line, a counter). The manifest says so at its top.
A sidecar store in each stage pod would not do either: the stages of a replica (one pod each) must
share one store, as the replicas must to share anything.
"""

from __future__ import annotations

import math
from dataclasses import replace

import yaml

from trellis.core.spec import DeploySpec
from trellis.deploy.processes import (
    KV_SHM_MARGIN_BYTES,
    ProcessSpec,
    isolated_gpus,
    kv_shm_bytes,
    read_paths,
    slug,
    spec_text,
)

CONTAINER_PYTHON = "/opt/venv/bin/python"  # the venv of deploy/docker/Dockerfile.*
SPEC_DIR = "/etc/trellis"
CONTAINER_SPEC = f"{SPEC_DIR}/spec.yaml"
PEERS = "trellis-peers"
SECRET = ("trellis-api-key", "api-key")
LOAD_PERIOD_S, LOAD_CHECKS = 10, 60  # up to 10 minutes to load weights before liveness counts
KV_STORE = "trellis-kv-store"  # its StatefulSet and its headless Service
KV_PROCESS_BYTES = 1 << 30  # the store's own memory, past its shared-memory slab
KV_DISK_MARGIN_BYTES = 1 << 30  # the disk tier's file headers and filesystem overhead
KV_WARNING = """\
# WARNING: the KV store is read through shared memory, and shared memory does not cross pods.
# The stage workers map the store's slab ({shm_dir}/trellis-kv-*), which only processes in the
# store's own pod can see: from their pods they cannot use this store, and serve by recomputing
# (as with a store that is down). For the shared-memory path the store must run in the same pod
# as the stage workers it serves (their containers in this pod, mounting kv-shm at {shm_dir}), or
# run the mesh on one host (`trellis up`, `trellis deploy compose` or `systemd`).
"""


def stage_host(replica: str, stage: int, namespace: str) -> str:
    """The stable DNS name of a stage's pod (pod 0 of its StatefulSet, under the headless Service)."""
    return f"trellis-{slug(f'{replica}/stage-{stage}')}-0.{PEERS}.{namespace}.svc.cluster.local"


def cluster_view(spec: DeploySpec, namespace: str = "default") -> DeploySpec:
    """The spec as the pods run it: stage hosts their pods' DNS names, the router its Service's
    (each router pod binds its own IP, see _pod), GPUs numbered from 0 per pod.
    processes_for(cluster_view(spec), CONTAINER_SPEC) are the pods."""
    reps = tuple(
        replace(
            rep,
            stages=tuple(
                replace(st, host=stage_host(rep.name, j, namespace)) for j, st in enumerate(rep.stages)
            ),
        )
        for rep in spec.replicas
    )
    router = replace(spec.router, host=f"trellis-router.{namespace}.svc.cluster.local")
    kv = spec.kv_store and replace(spec.kv_store, host=kv_store_host(namespace))
    return isolated_gpus(replace(spec, replicas=reps, router=router, kv_store=kv))


def kv_store_host(namespace: str) -> str:
    """The stable DNS name of the KV store's pod (pod 0 of its StatefulSet, under its Service)."""
    return f"{KV_STORE}-0.{KV_STORE}.{namespace}.svc.cluster.local"


def _mi(n: int) -> str:
    """A byte count as a Kubernetes quantity, rounded up to MiB."""
    return f"{math.ceil(n / 2**20)}Mi"


def render(
    spec: DeploySpec,
    procs: tuple[ProcessSpec, ...],
    *,
    image: str,
    namespace: str = "default",
    router_replicas: int = 1,
) -> dict[str, str]:
    """{filename: multi-document YAML}. `spec` is the cluster view (cluster_view) and `procs` its
    processes, reading the spec at CONTAINER_SPEC."""
    meta = _Meta(namespace)
    files = {
        "00-spec.yaml": _dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta.of("trellis-spec", "spec"),
                "data": {"spec.yaml": spec_text(spec)},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta.of(PEERS, "stage"),
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,
                    "selector": {"app.kubernetes.io/component": "stage", **meta.base},
                },
            },
        )
    }
    for p in procs:
        name = f"trellis-{p.slug}"
        pod = _pod(spec, p, image, meta)
        labels = meta.selector(p)
        if p.kind == "kv_store":
            workload = _kv_store_set(spec, name, pod, labels, meta)
        elif p.kind == "stage":
            workload = {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": meta.of(name, p.kind),
                "spec": {
                    "replicas": 1,  # a stage is one TP group with its own layers and ports
                    "serviceName": PEERS,
                    "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": labels},
                    "template": pod,
                },
            }
        else:
            workload = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta.of(name, p.kind),
                "spec": {
                    "replicas": router_replicas if p.kind == "router" else 1,
                    "selector": {"matchLabels": labels},
                    "template": pod,
                },
            }
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                **meta.of(name, p.kind),
                "annotations": {"prometheus.io/scrape": str(bool(p.ports.metrics)).lower()}
                | ({"prometheus.io/port": str(p.ports.metrics)} if p.ports.metrics else {}),
            },
            "spec": {
                "selector": labels,
                "ports": [
                    {"name": n, "port": v, "targetPort": n}
                    for n, v in p.ports.named().items()
                    if n in ("grpc", "http", "metrics")
                ],
            },
        }
        if p.kind == "kv_store":
            # Headless, published before ready: the pod binds its own DNS name while it starts, as
            # a stage does (the stage workers dial that name; none waits for the store's health).
            service["spec"] |= {"clusterIP": "None", "publishNotReadyAddresses": True}
        text = _dump(workload, service)
        if p.kind == "kv_store":
            assert spec.kv_store is not None
            text = KV_WARNING.format(shm_dir=spec.kv_store.shm_dir) + text
        files[f"{p.kind.replace('_', '-')}-{p.slug}.yaml" if p.kind == "stage" else f"{p.slug}.yaml"] = text
    return files


def _kv_store_set(spec: DeploySpec, name: str, pod: dict, labels: dict, meta: _Meta) -> dict:
    """The KV store's StatefulSet: one pod (one store per spec: its name, slab and disk tier are
    the spec's), scaled apart from the stages; its disk tier a claim of its own when sized."""
    kv = spec.kv_store
    assert kv is not None
    out: dict = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta.of(name, "kv_store"),
        "spec": {
            "replicas": 1,
            "serviceName": KV_STORE,
            "selector": {"matchLabels": labels},
            "template": pod,
        },
    }
    if kv.disk_path and kv.disk_capacity_bytes:
        storage = _mi(kv.disk_capacity_bytes + KV_DISK_MARGIN_BYTES)
        out["spec"]["volumeClaimTemplates"] = [
            {
                "metadata": {"name": "kv-disk"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}},
            }
        ]
    return out


class _Meta:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.base = {"app.kubernetes.io/name": "trellis"}

    def of(self, name: str, component: str) -> dict:
        labels = {**self.base, "app.kubernetes.io/component": component.replace("_", "-")}
        return {"name": name, "namespace": self.namespace, "labels": labels}

    def selector(self, p: ProcessSpec) -> dict[str, str]:
        return {
            **self.base,
            "app.kubernetes.io/component": p.kind.replace("_", "-"),
            "trellis/process": p.slug,
        }


def _pod(spec: DeploySpec, p: ProcessSpec, image: str, meta: _Meta) -> dict:
    env: list[dict] = [{"name": k, "value": v} for k, v in p.env]
    command = p.argv(CONTAINER_PYTHON)
    if p.kind == "router":
        ref = {"name": SECRET[0], "key": SECRET[1]}
        env.append({"name": spec.router.api_key_env, "valueFrom": {"secretKeyRef": ref}})
        # Every listener of the router (gRPC, HTTP, metrics) on this pod's IP only; Kubernetes
        # expands $(POD_IP) in the command from the env var below.
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        command = [*command, "--host", "$(POD_IP)"]
    mounts = [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}]
    volumes: list[dict] = [{"name": "spec", "configMap": {"name": "trellis-spec"}}]
    for i, path in enumerate(read_paths(spec)):  # on the node; a PersistentVolumeClaim works the same
        mounts.append({"name": f"model-{i}", "mountPath": path, "readOnly": True})
        volumes.append({"name": f"model-{i}", "hostPath": {"path": path, "type": "Directory"}})

    def probe(failures: int) -> dict:  # Kubernetes' own grpc.health.v1 probe, at the pod's IP
        return {
            "grpc": {"port": p.ports.grpc},
            "periodSeconds": LOAD_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": failures,
        }

    container: dict = {
        "name": p.kind.replace("_", "-"),
        "image": image,
        "command": command,
        "env": env,
        "ports": [{"name": n, "containerPort": v} for n, v in p.ports.named().items()],
        "startupProbe": probe(LOAD_CHECKS),
        "readinessProbe": probe(1),
        "livenessProbe": probe(3),
        "volumeMounts": mounts,
    }
    if p.kind == "kv_store":
        _kv_store_volumes(spec, container, volumes)
    if p.gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": len(p.gpus)}}
        # NCCL between the pod's TP ranks uses shared memory, far past the default 64 MB /dev/shm.
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    return {
        "metadata": {"labels": meta.selector(p)},
        "spec": {"terminationGracePeriodSeconds": 60, "containers": [container], "volumes": volumes},
    }


def _kv_store_volumes(spec: DeploySpec, container: dict, volumes: list[dict]) -> None:
    """The store's slab in memory at shm_dir, its disk tier at disk_path, and the memory they take
    in its requests and limits (an emptyDir in memory counts as the pod's memory)."""
    kv = spec.kv_store
    assert kv is not None
    mounts = container["volumeMounts"]
    mounts.append({"name": "kv-shm", "mountPath": kv.shm_dir})
    volumes.append({"name": "kv-shm", "emptyDir": {"medium": "Memory", "sizeLimit": _mi(kv_shm_bytes(spec))}})
    if kv.disk_path:
        mounts.append({"name": "kv-disk", "mountPath": kv.disk_path})
        if not kv.disk_capacity_bytes:  # no size to claim: the node's disk, lost with the pod
            volumes.append({"name": "kv-disk", "emptyDir": {}})
    memory = _mi(kv.capacity_bytes + KV_SHM_MARGIN_BYTES + KV_PROCESS_BYTES)
    container["resources"] = {"requests": {"cpu": "1", "memory": memory}, "limits": {"memory": memory}}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec in its ConfigMap) as literal blocks, readable in the manifest."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def _dump(*docs: dict) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=1000) for d in docs)

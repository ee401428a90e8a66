"""Kubernetes manifests for a spec: the spec in a ConfigMap, a StatefulSet and a Service per stage,
the router (and kv_store) each in a Deployment with a Service, a headless Service for the peers.

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
"""

from __future__ import annotations

from dataclasses import replace

import yaml

from trellis.core.spec import DeploySpec
from trellis.deploy.processes import ProcessSpec, isolated_gpus, read_paths, slug, spec_text

CONTAINER_PYTHON = "/opt/venv/bin/python"  # the venv of deploy/docker/Dockerfile.*
SPEC_DIR = "/etc/trellis"
CONTAINER_SPEC = f"{SPEC_DIR}/spec.yaml"
PEERS = "trellis-peers"
SECRET = ("trellis-api-key", "api-key")
LOAD_PERIOD_S, LOAD_CHECKS = 10, 60  # up to 10 minutes to load weights before liveness counts


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
    return isolated_gpus(replace(spec, replicas=reps, router=router))


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
        if p.kind == "stage":
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
        files[f"{p.kind.replace('_', '-')}-{p.slug}.yaml" if p.kind == "stage" else f"{p.slug}.yaml"] = _dump(
            workload, service
        )
    return files


class _Meta:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.base = {"app.kubernetes.io/name": "trellis"}

    def of(self, name: str, component: str) -> dict:
        labels = {**self.base, "app.kubernetes.io/component": component}
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
    if p.gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": len(p.gpus)}}
        # NCCL between the pod's TP ranks uses shared memory, far past the default 64 MB /dev/shm.
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    return {
        "metadata": {"labels": meta.selector(p)},
        "spec": {"terminationGracePeriodSeconds": 60, "containers": [container], "volumes": volumes},
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec in its ConfigMap) as literal blocks, readable in the manifest."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _Dumper.represent_str)


def _dump(*docs: dict) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=1000) for d in docs)

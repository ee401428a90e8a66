"""GPUs, links and clusters: datasheet figures, and a cluster from flags or a YAML file.

Figures are per GPU and per direction. Memory is what ``nvidia-smi`` reports for the card;
bandwidths and FLOP/s are the vendor's dense (no sparsity) peaks. The calibration file
(``calibration.py``) says how much of each peak is reached in practice.

Cluster YAML (every field but ``gpu`` optional; a link given replaces the preset's)::

    gpu: h100-sxm              # a preset, or {name, memory_gb, hbm_tb_per_s, bf16_tflops, fp8_tflops}
    nodes: 8                   # or hosts: [gpu-a, gpu-b, ...] (names used in the deploy spec)
    gpus_per_node: 8
    intra_node: {kind: nvlink, gb_per_s: 450, latency_us: 1}
    inter_node: {kind: infiniband, gb_per_s: 50, latency_us: 5}
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from trellis.planner.errors import PlanError

LINK_KINDS = ("nvlink", "pcie", "infiniband", "ethernet")


@dataclass(frozen=True)
class Link:
    kind: str
    bytes_per_s: float  # per GPU, per direction
    latency_s: float  # one hop on the wire, before any software


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float  # dense
    fp8_flops: float | None  # dense; None where the card has no fp8 tensor cores
    intra: Link  # between GPUs of one node
    inter: Link  # between nodes
    gpus_per_node: int = 8


def _mib(n: int) -> int:
    return n * 1024 * 1024


# A100 and H100/H200 nodes: 8 SXM GPUs on NVSwitch, one 200 Gb/s (HDR) or 400 Gb/s (NDR) InfiniBand
# NIC per GPU. L40S: PCIe Gen4 x16 between cards (no NVLink), a 100 Gb/s Ethernet (RoCE) NIC per GPU.
_NVLINK4 = Link("nvlink", 450e9, 1e-6)
_NDR = Link("infiniband", 50e9, 5e-6)
GPU_PRESETS: MappingProxyType[str, Gpu] = MappingProxyType({
    "h100-sxm": Gpu("h100-sxm", _mib(81559), 3.35e12, 989.4e12, 1978.9e12, _NVLINK4, _NDR),
    "h200": Gpu("h200", _mib(143771), 4.8e12, 989.4e12, 1978.9e12, _NVLINK4, _NDR),
    "a100-80g": Gpu(
        "a100-80g", _mib(81920), 2.039e12, 312e12, None,
        Link("nvlink", 300e9, 1e-6), Link("infiniband", 25e9, 5e-6),
    ),
    "l40s-pcie": Gpu(
        "l40s-pcie", _mib(46068), 864e9, 362.05e12, 733e12,
        Link("pcie", 32e9, 2e-6), Link("ethernet", 12.5e9, 10e-6),
    ),
})  # fmt: skip


@dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link
    hosts: tuple[str, ...] = ()  # node names for the deploy spec; empty means node-0, node-1, ...

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def host(self, node: int) -> str:
        return self.hosts[node] if self.hosts else f"node-{node}"

    def describe(self) -> str:
        gpn = f"{self.nodes} node{'s' if self.nodes > 1 else ''} x {self.gpus_per_node}"
        text = (
            f"{self.total_gpus} x {self.gpu.name} ({gpn}), {self.gpu.memory_bytes / 1e9:.1f} GB, "
            f"HBM {self.gpu.hbm_bytes_per_s / 1e12:.2f} TB/s, {self.gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16; "
            f"{self.intra.kind} {self.intra.bytes_per_s / 1e9:.0f} GB/s inside a node"
        )
        if self.nodes > 1:
            text += f", {self.inter.kind} {self.inter.bytes_per_s / 1e9:.1f} GB/s between nodes"
        return text


def gpu_preset(name: str) -> Gpu:
    try:
        return GPU_PRESETS[name]
    except KeyError:
        raise PlanError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPU_PRESETS)}") from None


def cluster_from_args(gpu: str, nodes: int = 1, gpus_per_node: int | None = None) -> Cluster:
    """``--gpu TYPE --nodes N --gpus-per-node G``: a homogeneous cluster with the preset's links."""
    spec = gpu_preset(gpu)
    per_node = spec.gpus_per_node if gpus_per_node is None else gpus_per_node
    return _checked(Cluster(spec, nodes, per_node, spec.intra, spec.inter))


def _checked(c: Cluster) -> Cluster:
    if c.nodes < 1:
        raise PlanError(f"inconsistent cluster: nodes must be >= 1, got {c.nodes}")
    if c.gpus_per_node < 1:
        raise PlanError(f"inconsistent cluster: gpus_per_node must be >= 1, got {c.gpus_per_node}")
    if c.hosts and len(c.hosts) != c.nodes:
        raise PlanError(f"inconsistent cluster: {len(c.hosts)} hosts named but nodes is {c.nodes}")
    if len(set(c.hosts)) != len(c.hosts):
        raise PlanError("inconsistent cluster: a host is named twice")
    for where, link in (("intra_node", c.intra), ("inter_node", c.inter)):
        if link.bytes_per_s <= 0 or link.latency_s < 0:
            raise PlanError(f"inconsistent cluster: {where} needs bandwidth > 0 and latency >= 0")
    if c.intra.kind in ("infiniband", "ethernet") and c.gpus_per_node > 1:
        raise PlanError(
            f"inconsistent cluster: intra_node link {c.intra.kind!r} is a network, not a GPU link"
        )
    return c


# ---- YAML ----------------------------------------------------------------------------------------


def load_cluster(path: str | Path) -> Cluster:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise PlanError(f"{p}: cannot read the cluster file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_cluster(raw, str(p))


def parse_cluster(raw: Any, where: str = "cluster") -> Cluster:
    top = _mapping(where, raw, {"gpu", "nodes", "hosts", "gpus_per_node", "intra_node", "inter_node"})
    if "gpu" not in top:
        raise PlanError(f"{where}.gpu: required (a preset: {', '.join(GPU_PRESETS)}, or a mapping)")
    gpu = _gpu(f"{where}.gpu", top["gpu"])
    hosts = top.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise PlanError(f"{where}.hosts: expected a list of host names")
    nodes = _number(f"{where}.nodes", top.get("nodes", len(hosts) or 1), int)
    per_node = _number(f"{where}.gpus_per_node", top.get("gpus_per_node", gpu.gpus_per_node), int)
    intra = _link(f"{where}.intra_node", top.get("intra_node"), gpu.intra)
    inter = _link(f"{where}.inter_node", top.get("inter_node"), gpu.inter)
    return _checked(Cluster(gpu, nodes, per_node, intra, inter, tuple(hosts)))


def _mapping(where: str, raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PlanError(f"{where}.{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
    return raw


def _number(where: str, value: Any, kind: type = float) -> Any:
    ok = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, ok):
        raise PlanError(f"{where}: expected a number, got {value!r}")
    return value


def _gpu(where: str, raw: Any) -> Gpu:
    if isinstance(raw, str):
        return gpu_preset(raw)
    fields = {"preset", "name", "memory_gb", "hbm_tb_per_s", "bf16_tflops", "fp8_tflops"}
    g = _mapping(where, raw, fields)
    base = gpu_preset(g["preset"]) if "preset" in g else None
    if base is None:
        missing = sorted({"name", "memory_gb", "hbm_tb_per_s", "bf16_tflops"} - set(g))
        if missing:
            raise PlanError(f"{where}.{missing[0]}: required for a GPU that is not a preset")
        base = Gpu(g["name"], 0, 0.0, 0.0, None, GPU_PRESETS["h100-sxm"].intra, GPU_PRESETS["h100-sxm"].inter)
    fp8 = g.get("fp8_tflops", None if base.fp8_flops is None else base.fp8_flops / 1e12)
    gpu = replace(
        base,
        name=str(g.get("name", base.name)),
        memory_bytes=int(_number(f"{where}.memory_gb", g.get("memory_gb", base.memory_bytes / 1e9)) * 1e9),
        hbm_bytes_per_s=_number(f"{where}.hbm_tb_per_s", g.get("hbm_tb_per_s", base.hbm_bytes_per_s / 1e12))
        * 1e12,
        bf16_flops=_number(f"{where}.bf16_tflops", g.get("bf16_tflops", base.bf16_flops / 1e12)) * 1e12,
        fp8_flops=None if fp8 is None else _number(f"{where}.fp8_tflops", fp8) * 1e12,
    )
    if gpu.memory_bytes <= 0 or gpu.hbm_bytes_per_s <= 0 or gpu.bf16_flops <= 0:
        raise PlanError(f"{where}: memory, HBM bandwidth and FLOP/s must all be > 0")
    return gpu


def _link(where: str, raw: Any, default: Link) -> Link:
    if raw is None:
        return default
    g = _mapping(where, raw, {"kind", "gb_per_s", "latency_us"})
    kind = g.get("kind", default.kind)
    if kind not in LINK_KINDS:
        raise PlanError(f"{where}.kind: must be one of {', '.join(LINK_KINDS)}, got {kind!r}")
    bw = _number(f"{where}.gb_per_s", g.get("gb_per_s", default.bytes_per_s / 1e9)) * 1e9
    lat = _number(f"{where}.latency_us", g.get("latency_us", default.latency_s * 1e6)) * 1e-6
    return Link(kind, bw, lat)

"""A cluster's effective figures: datasheet peaks scaled by what the calibration measured.

A measured GPU uses its own figures; any other GPU gets the mean fraction of peak that the
measured ones reached. A link kind with its own calibration uses it; any other link keeps the
calibrated link's software latencies and the fraction of its datasheet bandwidth it reached.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.planner.calibration import Calibration, LinkCalibration
from trellis.planner.errors import PlanError
from trellis.planner.hardware import GPU_PRESETS, Cluster, Gpu, Link


@dataclass(frozen=True)
class LinkModel:
    kind: str
    allreduce_latency_eager_s: float
    allreduce_latency_graph_s: float
    allreduce_bus_bytes_per_s: float
    p2p_latency_s: float  # one-way UCX send, software included
    p2p_bytes_per_s: float

    def allreduce_s(self, nbytes: float, gpus: int, graph: bool) -> float:
        if gpus <= 1:
            return 0.0
        latency = self.allreduce_latency_graph_s if graph else self.allreduce_latency_eager_s
        return latency + 2 * (gpus - 1) / gpus * nbytes / self.allreduce_bus_bytes_per_s

    def allgather_s(self, nbytes: float, gpus: int, graph: bool) -> float:
        """All-gather of ``nbytes`` in total: each GPU receives (n-1)/n of it."""
        if gpus <= 1:
            return 0.0
        latency = self.allreduce_latency_graph_s if graph else self.allreduce_latency_eager_s
        return latency + (gpus - 1) / gpus * nbytes / self.allreduce_bus_bytes_per_s

    def send_s(self, nbytes: float) -> float:
        return self.p2p_latency_s + nbytes / self.p2p_bytes_per_s


@dataclass(frozen=True)
class Machine:
    cluster: Cluster
    hbm_bytes_per_s: float  # effective, for bytes read
    bf16_flops: float  # effective dense
    fp8_flops: float | None
    intra: LinkModel
    inter: LinkModel
    step_overhead_s: float
    notes: tuple[str, ...]  # where each figure came from, for the report

    def flops(self, weight_dtype: str) -> float:
        # fp8 weights run fp8 GEMMs where the card has them, else they are upcast to bf16.
        return self.fp8_flops if weight_dtype == "fp8" and self.fp8_flops else self.bf16_flops


def machine_for(cluster: Cluster, cal: Calibration) -> Machine:
    gpu = cluster.gpu
    hbm, hbm_note = _gpu_figure(gpu, cal, "hbm_copy_bytes_per_s", gpu.hbm_bytes_per_s, "HBM", "TB/s")
    mm, mm_note = _gpu_figure(gpu, cal, "matmul_bf16_flops_per_s", gpu.bf16_flops, "bf16 GEMM", "TFLOP/s")
    fp8 = None if gpu.fp8_flops is None else gpu.fp8_flops * mm / gpu.bf16_flops
    intra = _link_model(cluster.intra, cal)
    inter = _link_model(cluster.inter, cal)
    notes = (
        hbm_note,
        mm_note,
        f"{intra.kind}: all-reduce {intra.allreduce_latency_eager_s * 1e6:.0f} us eager / "
        f"{intra.allreduce_latency_graph_s * 1e6:.0f} us in a CUDA graph + bytes at "
        f"{intra.allreduce_bus_bytes_per_s / 1e9:.0f} GB/s bus; UCX hop {intra.p2p_latency_s * 1e6:.0f} us "
        f"+ bytes at {intra.p2p_bytes_per_s / 1e9:.0f} GB/s",
    )
    if cluster.nodes > 1:
        notes += (
            f"{inter.kind}: all-reduce {inter.allreduce_latency_eager_s * 1e6:.0f} us + bytes at "
            f"{inter.allreduce_bus_bytes_per_s / 1e9:.1f} GB/s bus; "
            f"UCX hop {inter.p2p_latency_s * 1e6:.0f} us + bytes at {inter.p2p_bytes_per_s / 1e9:.1f} GB/s",
        )
    if cal.step_overhead_s:
        notes += (f"host overhead {cal.step_overhead_s * 1e3:.2f} ms per step",)
    return Machine(cluster, hbm, mm, fp8, intra, inter, cal.step_overhead_s, notes)


def _gpu_figure(gpu: Gpu, cal: Calibration, key: str, peak: float, what: str, unit: str) -> tuple[float, str]:
    own = getattr(cal.gpus.get(gpu.name), key, None) if gpu.name in cal.gpus else None
    if own:
        return (
            own,
            f"{what}: {own / 1e12:.2f} {unit} measured on {gpu.name} ({own / peak:.0%} of {peak / 1e12:.2f})",
        )
    fractions = [
        getattr(g, key) / getattr(GPU_PRESETS[name], _peak_field(key))
        for name, g in cal.gpus.items()
        if getattr(g, key) and name in GPU_PRESETS
    ]
    if not fractions:
        raise PlanError(f"calibration: no GPU has {key}; cannot scale {gpu.name}'s datasheet figure")
    frac = sum(fractions) / len(fractions)
    return (
        peak * frac,
        f"{what}: {peak * frac / 1e12:.2f} {unit} = {frac:.0%} (as measured on other GPUs) "
        f"of {gpu.name}'s {peak / 1e12:.2f}",
    )


def _peak_field(key: str) -> str:
    return "hbm_bytes_per_s" if key == "hbm_copy_bytes_per_s" else "bf16_flops"


def _link_model(link: Link, cal: Calibration) -> LinkModel:
    measured: LinkCalibration | None = cal.links.get(link.kind) or cal.links.get("nvlink")
    if measured is None:
        measured = next(iter(cal.links.values()), None)
    if measured is None:
        raise PlanError("calibration: no link is calibrated")
    ref_gpu = GPU_PRESETS.get(measured.gpu, GPU_PRESETS["h200"])
    ref = ref_gpu.intra if ref_gpu.intra.kind == _measured_kind(cal, measured) else ref_gpu.inter
    scale = link.bytes_per_s / ref.bytes_per_s
    extra = max(0.0, link.latency_s - ref.latency_s)
    eager, graph, bus = measured.allreduce_fit()
    ucx_latency, ucx_bw = measured.ucx_fit()
    send_bw = measured.nccl_send_bytes / measured.nccl_send_s
    return LinkModel(
        kind=link.kind,
        allreduce_latency_eager_s=eager + 2 * extra,  # a reduce and a broadcast cross the wire
        allreduce_latency_graph_s=graph + 2 * extra,
        allreduce_bus_bytes_per_s=bus * scale,
        p2p_latency_s=ucx_latency + extra,
        # UCX gets no more than it got on the measured link, nor more of this link than NCCL did.
        p2p_bytes_per_s=min(ucx_bw, send_bw * scale),
    )


def _measured_kind(cal: Calibration, measured: LinkCalibration) -> str:
    return next(kind for kind, c in cal.links.items() if c is measured)

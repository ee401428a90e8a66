"""A cluster's effective figures: datasheet peaks scaled by what the calibration measured.

A measured GPU uses its own figures; any other GPU gets the mean fraction of peak that the
measured ones reached. A link kind with its own calibration uses it; any other link keeps the
calibrated link's measured all-reduce times and adds its own extra wire latency and the time its
slower (or faster) wire takes for the bytes, at the fraction of its datasheet bandwidth the
measured link reached.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.planner.allreduce import AllReduceCost, Curve, bus_bytes
from trellis.planner.calibration import Calibration, LinkCalibration
from trellis.planner.errors import PlanError
from trellis.planner.hardware import GPU_PRESETS, Cluster, Gpu, Link


@dataclass(frozen=True)
class LinkModel:
    kind: str
    measured: LinkCalibration  # the all-reduce table this link's times come from
    allreduce_bus_bytes_per_s: float  # this link's, past the measured sizes
    wire_latency_s: float  # what this link adds to each all-reduce over the measured one
    wire_s_per_bus_byte: float  # and per bus byte (negative for a faster link)
    p2p_latency_s: float  # one-way UCX send, software included
    p2p_bytes_per_s: float

    def allreduce(self, gpus: int, one_shot_max_bytes: int = 0) -> AllReduceCost:
        """One all-reduce over ``gpus`` GPUs: the curves of the nearest measured GPU count, in bus bytes."""
        points = self.measured.allreduce_points(gpus)
        bw = self.measured.allreduce_bus_bytes_per_s()

        def curve(key: str) -> Curve | None:
            xy = [(bus_bytes(p.bytes, p.gpus), getattr(p, key)) for p in points if getattr(p, key)]
            return Curve.through(xy, bw) if xy else None

        eager = curve("eager_s")
        assert eager is not None  # every point has its eager time
        return AllReduceCost(
            gpus,
            eager,
            curve("graph_s") or eager,
            curve("one_shot_eager_s"),
            curve("one_shot_graph_s"),
            one_shot_max_bytes,
            self.wire_latency_s,
            self.wire_s_per_bus_byte,
        )

    def allreduce_s(self, nbytes: float, gpus: int, graph: bool) -> float:
        return self.allreduce(gpus).seconds(nbytes, graph) if gpus > 1 else 0.0

    def allgather_s(self, nbytes: float, gpus: int, graph: bool) -> float:
        """All-gather of ``nbytes`` in total: each GPU receives (n-1)/n of it."""
        return self.allreduce(gpus).gather_seconds(nbytes, graph) if gpus > 1 else 0.0

    def send_s(self, nbytes: float) -> float:
        return self.p2p_latency_s + nbytes / self.p2p_bytes_per_s


@dataclass(frozen=True)
class Machine:
    cluster: Cluster
    hbm_bytes_per_s: float  # effective, for bytes read
    bf16_flops: float  # effective dense
    fp8_flops: float | None
    prefill_bf16_flops: float  # achieved by a step carrying prompt tokens (eager), whole model
    intra: LinkModel
    inter: LinkModel
    step_overhead_s: float  # host time per plan a stage runs ...
    step_overhead_per_seq_s: float  # ... and per sequence in it
    layer_graph_s: float  # GPU time per layer beyond bytes, FLOPs and all-reduces, in a CUDA graph
    layer_eager_s: float  # the same, eager (steps that carry prompt tokens)
    notes: tuple[str, ...]  # where each figure came from, for the report

    def flops(self, weight_dtype: str) -> float:
        # fp8 weights run fp8 GEMMs where the card has them, else they are upcast to bf16.
        return self.fp8_flops if weight_dtype == "fp8" and self.fp8_flops else self.bf16_flops

    def prefill_flops(self, weight_dtype: str) -> float:
        """The achieved prefill rate, scaled as the GEMM rate is for fp8."""
        return self.prefill_bf16_flops * self.flops(weight_dtype) / self.bf16_flops


def machine_for(cluster: Cluster, cal: Calibration) -> Machine:
    gpu = cluster.gpu
    cal = cal.for_gpu(gpu.name)  # the software constants and links measured on this GPU, if any
    hbm, hbm_note = _gpu_figure(gpu, cal, "hbm_copy_bytes_per_s", gpu.hbm_bytes_per_s, "HBM", "TB/s")
    mm, mm_note = _gpu_figure(gpu, cal, "matmul_bf16_flops_per_s", gpu.bf16_flops, "bf16 GEMM", "TFLOP/s")
    fp8 = None if gpu.fp8_flops is None else gpu.fp8_flops * mm / gpu.bf16_flops
    if any(g.prefill_flops_per_s for g in cal.gpus.values()):
        prefill, prefill_note = _gpu_figure(
            gpu, cal, "prefill_flops_per_s", gpu.bf16_flops, "prefill", "TFLOP/s"
        )
    else:
        prefill, prefill_note = mm, "prefill: at the GEMM rate (not measured)"
    intra = _link_model(cluster.intra, cal)
    inter = _link_model(cluster.inter, cal)
    notes = (hbm_note, mm_note, prefill_note, _link_note(intra))
    if cluster.nodes > 1:
        notes += (_link_note(inter),)
    if cal.step_overhead_s or cal.step_overhead_per_seq_s:
        notes += (
            f"host: {cal.step_overhead_s * 1e3:.2f} ms + {cal.step_overhead_per_seq_s * 1e6:.0f} us "
            "per sequence per plan",
        )
    if cal.layer_graph_s or cal.layer_eager_s:
        notes += (
            f"per layer: {cal.layer_graph_s * 1e6:.1f} us in a CUDA graph, "
            f"{cal.layer_eager_s * 1e6:.0f} us eager (small kernels and gaps)",
        )
    return Machine(
        cluster,
        hbm,
        mm,
        fp8,
        prefill,
        intra,
        inter,
        cal.step_overhead_s,
        cal.step_overhead_per_seq_s,
        cal.layer_graph_s,
        cal.layer_eager_s,
        notes,
    )


def _link_note(link: LinkModel) -> str:
    counts = sorted({p.gpus for p in link.measured.allreduce})
    ar = link.allreduce(counts[0])
    return (
        f"{link.kind}: all-reduce from the measured table ({', '.join(map(str, counts))} GPUs; "
        f"16 KB on {counts[0]}: {ar.seconds(16384, False) * 1e6:.0f} us eager / "
        f"{ar.seconds(16384, True) * 1e6:.0f} us in a CUDA graph), larger at "
        f"{link.allreduce_bus_bytes_per_s / 1e9:.0f} GB/s bus; UCX hop {link.p2p_latency_s * 1e6:.0f} us "
        f"+ bytes at {link.p2p_bytes_per_s / 1e9:.0f} GB/s"
    )


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
    return "hbm_bytes_per_s" if key == "hbm_copy_bytes_per_s" else "bf16_flops"  # GEMM and prefill


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
    bus = measured.allreduce_bus_bytes_per_s()
    ucx_latency, ucx_bw = measured.ucx_fit()
    send_bw = measured.nccl_send_bytes / measured.nccl_send_s
    return LinkModel(
        kind=link.kind,
        measured=measured,
        allreduce_bus_bytes_per_s=bus * scale,
        wire_latency_s=2 * extra,  # a reduce and a broadcast cross the wire
        wire_s_per_bus_byte=1 / (bus * scale) - 1 / bus,
        p2p_latency_s=ucx_latency + extra,
        # UCX gets no more than it got on the measured link, nor more of this link than NCCL did.
        p2p_bytes_per_s=min(ucx_bw, send_bw * scale),
    )


def _measured_kind(cal: Calibration, measured: LinkCalibration) -> str:
    return next(kind for kind, c in cal.links.items() if c is measured)

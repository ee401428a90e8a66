"""Measured figures that turn datasheet peaks into what a GPU and a link really deliver.

The GPU benchmarks write a calibration file (JSON, format ``trellis-calibration/1``); the planner
reads it with ``--calibration FILE``. Without one, the defaults below are figures measured on two
H200s joined by NVLink and on one H100. The file's shape (see docs/planner.md)::

    {"format": "trellis-calibration/1", "source": "what ran, where, when",
     "gpus": {"h100-sxm": {"hbm_copy_bytes_per_s": 3.02e12, "matmul_bf16_flops_per_s": 7.9e14,
                           "prefill_flops_per_s": 3.7e14}},
     "links": {"nvlink": {"gpu": "h200",
                          "allreduce": [{"bytes": 16384, "gpus": 2, "eager_s": 3.4e-5, "graph_s": 2.0e-5,
                                         "one_shot_eager_s": 4.0e-5, "one_shot_graph_s": 7.8e-6}],
                          "nccl_send": {"bytes": 67108864, "seconds": 2.02e-4},
                          "ucx": {"small_bytes": 16384, "small_round_trip_s": 1.5e-4,
                                  "large_bytes": 67108864, "large_one_way_s": 4.5e-4}}},
     "step_overhead_s": 0.0, "step_overhead_per_seq_s": 0.0, "layer_graph_s": 0.0, "layer_eager_s": 0.0}

``hbm_copy_bytes_per_s`` counts read + write: a device copy of N bytes moves 2N bytes, so it is
reported as 2N / time. A weight read moves N bytes, so the same figure is the effective rate for
reading weights and KV (bytes read / this = time). ``prefill_flops_per_s`` is the rate a step that
carries prompt tokens (eager, not in a CUDA graph) reaches on the whole model, fitted from measured
TTFTs; without it such steps run at the GEMM rate.

The software constants (0 until measured; bench/report_gpu.py fits them, docs/planner.md says how):
``step_overhead_s`` + ``step_overhead_per_seq_s`` x sequences is the host time per plan a stage
spends (scheduling, metadata, sampling); ``layer_graph_s`` and ``layer_eager_s`` are the GPU time
per decoder layer that no byte or FLOP count explains (the small kernels: norms, rotary, KV store,
activation, attention's launch-bound floor, and the gaps between them), in a CUDA graph and eager.

Software constants and links differ by machine (other kernel speeds, another host CPU, another
NVLink), so a GPU section may carry its own: any of the four constants, and ``links`` shaped as the
top-level one (``"gpus": {"h100-sxm": {"hbm_copy_bytes_per_s": ..., "layer_graph_s": ...,
"links": {"nvlink": {...}}}}``). A plan for that GPU reads them in place of the top-level ones
(``Calibration.for_gpu``); a GPU without its own keeps the top-level figures.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from trellis.planner.errors import PlanError

FORMAT = "trellis-calibration/1"
SOFTWARE_CONSTANTS = ("step_overhead_s", "step_overhead_per_seq_s", "layer_graph_s", "layer_eager_s")


@dataclass(frozen=True)
class AllReducePoint:
    bytes: int
    gpus: int
    eager_s: float
    graph_s: float | None = None  # the same all-reduce captured in a CUDA graph
    one_shot_eager_s: float | None = None  # the one-shot peer-memory kernel, where measured
    one_shot_graph_s: float | None = None


@dataclass(frozen=True)
class LinkCalibration:
    gpu: str  # the GPU preset it was measured on: its datasheet link is the reference bandwidth
    allreduce: tuple[AllReducePoint, ...]
    nccl_send_bytes: int
    nccl_send_s: float
    ucx_small_bytes: int
    ucx_small_round_trip_s: float
    ucx_large_bytes: int
    ucx_large_one_way_s: float

    def allreduce_bus_bytes_per_s(self) -> float:
        """The bus bandwidth past the measured sizes: the best rate any point reached, which is the
        largest all-reduce's (an all-reduce of S bytes over n GPUs moves 2(n-1)/n x S per GPU)."""
        return max(
            _bus_bytes(p) / t
            for p in self.allreduce
            for t in (p.eager_s, p.graph_s, p.one_shot_eager_s, p.one_shot_graph_s)
            if t
        )

    def allreduce_points(self, gpus: int) -> tuple[AllReducePoint, ...]:
        """The points of the measured GPU count nearest ``gpus`` (the largest one not above it)."""
        counts = sorted({p.gpus for p in self.allreduce})
        below = [n for n in counts if n <= gpus]
        n = below[-1] if below else counts[0]
        return tuple(p for p in self.allreduce if p.gpus == n)

    def ucx_fit(self) -> tuple[float, float]:
        """(one-way latency, bandwidth) of a UCX GPU-to-GPU send."""
        latency = self.ucx_small_round_trip_s / 2
        bandwidth = self.ucx_large_bytes / max(self.ucx_large_one_way_s - latency, 1e-12)
        return latency, bandwidth


def _bus_bytes(p: AllReducePoint) -> float:
    return 2 * (p.gpus - 1) / p.gpus * p.bytes


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class GpuCalibration:
    hbm_copy_bytes_per_s: float | None = None  # read + write counted (see the module doc)
    matmul_bf16_flops_per_s: float | None = None  # dense bf16 GEMM, large shapes
    prefill_flops_per_s: float | None = None  # a step carrying prompt tokens, whole model, bf16
    # Measured on this GPU, in place of the top-level ones for a plan on it (SOFTWARE_CONSTANTS keys).
    constants: Mapping[str, float] = field(default_factory=_empty)
    links: Mapping[str, LinkCalibration] = field(default_factory=_empty)
    extra: Mapping[str, Any] = field(default_factory=_empty)  # provenance notes, kept as written


@dataclass(frozen=True)
class Calibration:
    source: str
    gpus: Mapping[str, GpuCalibration]
    links: Mapping[str, LinkCalibration]
    step_overhead_s: float = 0.0
    step_overhead_per_seq_s: float = 0.0
    layer_graph_s: float = 0.0
    layer_eager_s: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=_empty)

    def for_gpu(self, name: str) -> Calibration:
        """The calibration a plan on GPU ``name`` reads: that GPU's own software constants and links
        in place of the top-level ones. Its section keeps only the hardware figures, so calling this
        again (or replacing a top-level constant afterwards, as the fits do) sees the GPU's figures."""
        own = self.gpus.get(name)
        if own is None or not (own.constants or own.links):
            return self
        gpus = {**self.gpus, name: replace(own, constants=_empty(), links=_empty())}
        return replace(
            self,
            gpus=MappingProxyType(gpus),
            links=MappingProxyType({**self.links, **own.links}),
            **own.constants,
        )

    def to_dict(self) -> dict[str, Any]:
        def gpu(g: GpuCalibration) -> dict[str, Any]:
            figures = {k: getattr(g, k) for k in _GPU_FIGURES if getattr(g, k) is not None}
            own_links = {"links": {k: _link_dict(v) for k, v in g.links.items()}} if g.links else {}
            return {**figures, **g.constants, **own_links, **g.extra}

        return {
            "format": FORMAT,
            "source": self.source,
            "gpus": {k: gpu(v) for k, v in self.gpus.items()},
            "links": {k: _link_dict(v) for k, v in self.links.items()},
            **{k: getattr(self, k) for k in SOFTWARE_CONSTANTS},
            **dict(self.extra),
        }

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_GPU_FIGURES = ("hbm_copy_bytes_per_s", "matmul_bf16_flops_per_s", "prefill_flops_per_s")


def _link_dict(c: LinkCalibration) -> dict[str, Any]:
    return {
        "gpu": c.gpu,
        "allreduce": [{k: v for k, v in vars(p).items() if v is not None} for p in c.allreduce],
        "nccl_send": {"bytes": c.nccl_send_bytes, "seconds": c.nccl_send_s},
        "ucx": {
            "small_bytes": c.ucx_small_bytes,
            "small_round_trip_s": c.ucx_small_round_trip_s,
            "large_bytes": c.ucx_large_bytes,
            "large_one_way_s": c.ucx_large_one_way_s,
        },
    }


def default_calibration() -> Calibration:
    """Measured: 2 x H200 over NVLink (copy, NCCL, UCX) and 1 x H100 (copy, bf16 GEMM)."""
    big = 256 * 1024 * 1024
    return Calibration(
        source="defaults: 2 x H200 NVLink and 1 x H100 measurements",
        gpus=MappingProxyType({
            "h200": GpuCalibration(hbm_copy_bytes_per_s=4.2e12),
            "h100-sxm": GpuCalibration(hbm_copy_bytes_per_s=3.02e12, matmul_bf16_flops_per_s=790e12),
        }),
        links=MappingProxyType({
            "nvlink": LinkCalibration(
                gpu="h200",
                # 16 KB: 34 us eager, 20 us in a CUDA graph; 256 MB: 300 GB/s bus bandwidth.
                allreduce=(AllReducePoint(16384, 2, 34e-6, 20e-6), AllReducePoint(big, 2, big / 300e9)),
                nccl_send_bytes=64 << 20, nccl_send_s=(64 << 20) / 332e9,
                ucx_small_bytes=16384, ucx_small_round_trip_s=150e-6,
                ucx_large_bytes=64 << 20, ucx_large_one_way_s=0.45e-3,
            ),
        }),
    )  # fmt: skip


# ---- reading -------------------------------------------------------------------------------------


def load_calibration(path: str | Path) -> Calibration:
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as e:
        raise PlanError(f"{p}: cannot read the calibration file ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{p}: not valid JSON ({e})") from None
    return parse_calibration(raw, str(p))


def parse_calibration(raw: Any, where: str = "calibration") -> Calibration:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a JSON object")
    if raw.get("format") != FORMAT:
        raise PlanError(f"{where}.format: expected {FORMAT!r}, got {raw.get('format')!r}")
    gpus = {
        name: _gpu(f"{where}.gpus.{name}", g)
        for name, g in _obj(f"{where}.gpus", raw.get("gpus", {})).items()
    }
    links = _links(f"{where}.links", raw.get("links", {}))
    default = default_calibration()
    known = {"format", "source", "gpus", "links", *SOFTWARE_CONSTANTS}
    constants = {key: _constant(f"{where}.{key}", raw.get(key, 0.0)) for key in SOFTWARE_CONSTANTS}
    return Calibration(
        source=str(raw.get("source", where)),
        # What the file does not measure keeps its default.
        gpus=MappingProxyType(
            {**default.gpus, **{k: _merged(default.gpus.get(k), g) for k, g in gpus.items()}}
        ),
        links=MappingProxyType({**default.links, **links}),
        **constants,
        extra=MappingProxyType({k: v for k, v in raw.items() if k not in known}),
    )


def _gpu(where: str, raw: Any) -> GpuCalibration:
    g = _obj(where, raw)
    known = {*_GPU_FIGURES, *SOFTWARE_CONSTANTS, "links"}
    return GpuCalibration(
        **{k: _pos(f"{where}.{k}", g.get(k)) for k in _GPU_FIGURES},
        constants=MappingProxyType(
            {k: _constant(f"{where}.{k}", g[k]) for k in SOFTWARE_CONSTANTS if k in g}
        ),
        links=MappingProxyType(_links(f"{where}.links", g.get("links", {}))),
        extra=MappingProxyType({k: v for k, v in g.items() if k not in known}),
    )


def _links(where: str, raw: Any) -> dict[str, LinkCalibration]:
    return {kind: _link(f"{where}.{kind}", c) for kind, c in _obj(where, raw).items()}


def _constant(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise PlanError(f"{where}: expected a number >= 0, got {v!r}")
    return float(v)


def _merged(default: GpuCalibration | None, measured: GpuCalibration) -> GpuCalibration:
    if default is None:
        return measured
    return replace(
        measured,
        hbm_copy_bytes_per_s=measured.hbm_copy_bytes_per_s or default.hbm_copy_bytes_per_s,
        matmul_bf16_flops_per_s=measured.matmul_bf16_flops_per_s or default.matmul_bf16_flops_per_s,
        prefill_flops_per_s=measured.prefill_flops_per_s or default.prefill_flops_per_s,
    )


def _obj(where: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise PlanError(f"{where}: expected an object, got {type(v).__name__}")
    return v


def _pos(where: str, v: Any, required: bool = False) -> float | None:
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise PlanError(f"{where}: expected a number > 0, got {v!r}")
    return float(v)


def _link(where: str, raw: Any) -> LinkCalibration:
    c = _obj(where, raw)
    points = c.get("allreduce")
    if not isinstance(points, list) or not points:
        raise PlanError(f"{where}.allreduce: expected a non-empty list of points")
    ar = []
    for i, p in enumerate(points):
        p = _obj(f"{where}.allreduce[{i}]", p)
        gpus = p.get("gpus")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 2:
            raise PlanError(f"{where}.allreduce[{i}].gpus: expected an integer >= 2, got {gpus!r}")
        ar.append(
            AllReducePoint(
                int(_pos(f"{where}.allreduce[{i}].bytes", p.get("bytes"), True)),
                gpus,
                _pos(f"{where}.allreduce[{i}].eager_s", p.get("eager_s"), True),
                _pos(f"{where}.allreduce[{i}].graph_s", p.get("graph_s")),
                _pos(f"{where}.allreduce[{i}].one_shot_eager_s", p.get("one_shot_eager_s")),
                _pos(f"{where}.allreduce[{i}].one_shot_graph_s", p.get("one_shot_graph_s")),
            )
        )
    send = _obj(f"{where}.nccl_send", c.get("nccl_send"))
    ucx = _obj(f"{where}.ucx", c.get("ucx"))

    def req(obj: dict[str, Any], key: str, at: str) -> float:
        return _pos(f"{where}.{at}.{key}", obj.get(key), True)  # type: ignore[return-value]

    return LinkCalibration(
        gpu=str(c.get("gpu", "h200")),
        allreduce=tuple(ar),
        nccl_send_bytes=int(req(send, "bytes", "nccl_send")),
        nccl_send_s=req(send, "seconds", "nccl_send"),
        ucx_small_bytes=int(req(ucx, "small_bytes", "ucx")),
        ucx_small_round_trip_s=req(ucx, "small_round_trip_s", "ucx"),
        ucx_large_bytes=int(req(ucx, "large_bytes", "ucx")),
        ucx_large_one_way_s=req(ucx, "large_one_way_s", "ucx"),
    )

"""The cards bench/report_gpu.py reports on, the raw files each card's directory holds, how a run
is read (its own JSON, or for a run that died before writing it, its log), and the roofline each
run is measured against.

Each card is reported from its own files only. A run marked optional (a later measurement) is
skipped with one printed line while its file is missing.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gpu_common import bench_record

from trellis.planner.model import load_model

RESULTS = Path(__file__).parent / "results"
LINE = re.compile(
    r"batch\s+(\d+): TTFT\s+([\d.]+) ms\s+TPOT\s+([\d.]+) ms\s+decode\s+([\d.]+) tok/s.*"
    r"throughput\s+([\d.]+) tok/s"
)
COPY = re.compile(r"copy ([\d.]+) TB/s")


@dataclass(frozen=True)
class LogRun:
    """A run whose JSON was never written (its process teardown hung): read from its printed lines.
    ``one_shot`` is its --one-shot-max-bytes, which the log omits."""

    log: str  # the log's stem under the card's directory
    preset: str
    tp: int
    pp: int
    burst: int
    gpus: int
    one_shot: int = 0


@dataclass(frozen=True)
class Run:
    key: str  # its name in summary.json; a run read from a log is written as KEY.json
    stem: str = ""  # the JSON the run wrote; empty for a run read from ``log``
    log: LogRun | None = None
    optional: bool = False  # measured later: skipped with a note while the file is missing

    @property
    def name(self) -> str:
        """How planner_validation.txt and the calibration name it: the file it came from."""
        return self.stem or self.key


@dataclass(frozen=True)
class Card:
    dir: str  # under bench/results
    preset: str  # the planner's GPU preset (trellis/planner/hardware.py)
    label: str  # in tables and titles
    device: str  # the name the device reports, for records read from logs
    source: str  # what ran, where, when
    runs: tuple[Run, ...]
    fit_on: tuple[str, ...]  # keys of the one-GPU runs the software constants are fitted on
    plot: tuple[tuple[str, str], ...]  # (key, label) of the decode plot's Trellis lines
    hf: tuple[tuple[int, str], ...]  # (GPUs on the machine, stem) of the transformers baselines
    mesh: str  # the mesh run's stem
    allreduce: tuple[str, ...]  # stems, one per GPU count
    ucx: str
    top_level: bool = False  # its software constants and link are the calibration's file-wide ones

    @property
    def path(self) -> Path:
        return RESULTS / self.dir


H200 = Card(
    dir="h200",
    preset="h200",
    label="H200",
    device="NVIDIA H200",
    source="bench/results/h200 (1x and 4x H200, NVLink, 2026-11-26)",
    runs=(
        Run("decode_8b_tp1_burst1", "decode_8b_tp1_burst1_1xh200"),
        Run("decode_8b_tp1_burst8", "decode_8b_tp1_burst8_1xh200"),
        Run("decode_8b_tp1_burst8_x4", "decode_8b_tp1_burst8_4xh200"),
        Run("decode_8b_tp2_burst8_x4", log=LogRun("tp2_nccl", "llama-3-8b", 2, 1, 8, 4)),
        # bench/RESULTS.md: the 70B TP 4 runs used the one-shot kernel up to 64 KB.
        Run("decode_70b_tp4_burst8_x4", log=LogRun("70b_tp4", "llama-3-70b", 4, 1, 8, 4, one_shot=65536)),
        Run("decode_70b_tp2pp2_x4", log=LogRun("70b_tp2pp2", "llama-3-70b", 2, 2, 1, 4)),
    ),
    fit_on=("decode_8b_tp1_burst1", "decode_8b_tp1_burst8", "decode_8b_tp1_burst8_x4"),
    plot=(("decode_8b_tp1_burst1", "Trellis, every step"), ("decode_8b_tp1_burst8", "Trellis, bursts of 8")),
    hf=((1, "hf_baseline_8b_1xh200"),),
    mesh="mesh_8b_tp1_1xh200",
    allreduce=("allreduce_2xh200", "allreduce_4xh200"),
    ucx="ucx_handoff_4xh200",
    top_level=True,
)


def _h100_later(stem: str) -> Run:
    return Run(stem, stem, optional=True)


H100 = Card(
    dir="h100",
    preset="h100-sxm",
    label="H100",
    device="NVIDIA H100 80GB HBM3",
    source="bench/results/h100 (1x and 4x H100 SXM 80GB, NVLink, 2026-11-26)",
    runs=(
        Run("decode_8b_tp1_burst1_1xh100", "decode_8b_tp1_burst1_1xh100"),
        Run("decode_8b_tp1_burst8_1xh100", "decode_8b_tp1_burst8_1xh100"),
        Run("decode_8b_tp1_burst16_1xh100", "decode_8b_tp1_burst16_1xh100"),
        _h100_later("decode_8b_tp1_burst8_4xh100"),
        _h100_later("decode_8b_tp2_burst8_4xh100"),
        _h100_later("decode_8b_tp2_burst8_nccl_4xh100"),
        _h100_later("decode_8b_tp4_burst8_4xh100"),
        Run("decode_8b_tp4_burst8_4xh100_early", "decode_8b_tp4_burst8_4xh100_early", optional=True),
        _h100_later("decode_70b_tp4_burst8_4xh100"),
        _h100_later("decode_70b_tp2pp2_inflight2_4xh100"),
        _h100_later("decode_70b_tp2pp2_inflight1_4xh100"),
    ),
    fit_on=(
        "decode_8b_tp1_burst1_1xh100",
        "decode_8b_tp1_burst8_1xh100",
        "decode_8b_tp1_burst16_1xh100",
        "decode_8b_tp1_burst8_4xh100",
    ),
    plot=(
        ("decode_8b_tp1_burst1_1xh100", "Trellis, every step"),
        ("decode_8b_tp1_burst8_1xh100", "Trellis, bursts of 8"),
        ("decode_8b_tp1_burst16_1xh100", "Trellis, bursts of 16"),
    ),
    hf=((1, "hf_baseline_8b_1xh100"), (4, "hf_baseline_8b_4xh100")),
    mesh="mesh_8b_tp1_1xh100",
    allreduce=("allreduce_2xh100", "allreduce_4xh100"),
    ucx="ucx_handoff_4xh100",
)

CARDS = (H200, H100)


@dataclass(frozen=True)
class Loaded:
    """What a card's directory holds now."""

    card: Card
    runs: dict[str, dict[str, Any]]  # engine runs by key, in the card's order
    hf: dict[int, dict[str, Any]]  # transformers baselines by GPUs on the machine
    mesh: dict[str, Any] | None
    allreduce: list[dict[str, Any]]  # one table per GPU count measured
    ucx: dict[str, Any] | None

    def baseline(self, gpus: int) -> dict[str, Any] | None:
        """The transformers run of the same machine, else the one-GPU machine's."""
        return self.hf.get(gpus) or self.hf.get(1)


def load(card: Card) -> Loaded:
    hf = {n: optional_json(card, stem) for n, stem in card.hf}
    return Loaded(
        card,
        load_runs(card),
        {n: data for n, data in hf.items() if data is not None},
        optional_json(card, card.mesh),
        [t for t in (optional_json(card, stem) for stem in card.allreduce) if t is not None],
        optional_json(card, card.ucx),
    )


def optional_json(card: Card, stem: str) -> dict[str, Any] | None:
    """A raw file of the card, or None (with one printed line) while it is not there."""
    path = card.path / f"{stem}.json"
    if not path.exists():
        print(f"skipped {path.relative_to(RESULTS.parent.parent)}: not there (yet)")
        return None
    return json.loads(path.read_text())


def load_runs(card: Card) -> dict[str, dict[str, Any]]:
    """The card's engine runs present, by key, in the card's order."""
    files = {}
    for run in card.runs:
        if run.log is not None:
            files[run.key] = from_log(card, run.key, run.log)
        elif run.optional:
            data = optional_json(card, run.stem)
            if data is not None:
                files[run.key] = with_command_settings(data)
        else:
            files[run.key] = with_command_settings(json.loads((card.path / f"{run.stem}.json").read_text()))
    return files


def with_command_settings(data: dict[str, Any]) -> dict[str, Any]:
    """An older gpu_decode.py left --one-shot-max-bytes out of each record; its command line has it."""
    argv = shlex.split(data.get("command", ""))
    if "--one-shot-max-bytes" in argv:
        one_shot = int(argv[argv.index("--one-shot-max-bytes") + 1])
        for r in data["runs"]:
            r["config"].setdefault("one_shot_max_bytes", one_shot)
    return data


def from_log(card: Card, key: str, spec: LogRun) -> dict[str, Any]:
    text = (card.path / f"{spec.log}.log").read_text()
    bw = float(COPY.search(text).group(1)) * 1e12  # type: ignore[union-attr]
    runs = []
    for m in LINE.finditer(text):
        b, ttft, tpot, _, thr = (float(x) for x in m.groups())
        args = SimpleNamespace(preset=spec.preset, tp=spec.tp, pp=spec.pp, prompt_len=512, output_len=128)
        runs.append(
            bench_record(
                f"{spec.preset}-tp{spec.tp}-pp{spec.pp}-b{int(b)}-burst{spec.burst}",
                args,
                {"name": card.device, "count": spec.gpus},
                int(b),
                ttft=ttft / 1e3,
                tpot=tpot / 1e3,
                throughput=thr,
                max_batched_tokens=8192,
                decode_burst=spec.burst,
                **({"one_shot_max_bytes": spec.one_shot} if spec.one_shot else {}),
            )
        )
    return {
        "format": "trellis-bench/1",
        "card": {"name": card.device, "count": spec.gpus},
        "copy_bytes_per_s": bw,
        "source": f"{spec.log}.log",
        "runs": runs,
    }


def roofline_tpot(preset: str, tp: int, batch: int, bw: float) -> float:
    """All weights plus the batch's KV at its mean context (512 + 64), read at the copy rate,
    split over the TP GPUs of a stage; PP stages run one after another for a token."""
    shape = load_model(preset)
    return (shape.weight_bytes("bf16") + batch * 576 * shape.kv_bytes_per_token(2)) / (tp * bw)

"""Building a stage model on its device and filling its weights: from a local Hugging Face
safetensors checkpoint (single file or sharded index), or random ("dummy") for benchmarks.

Loading walks the model's own parameters and asks each checkpoint tensor it needs for a lazy slice,
so a rank reads from disk only its stage's layers and its TP share of each tensor.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from trellis.core.errors import ModelError
from trellis.core.model_config import ModelConfig
from trellis.runtime.model.embedding import VocabParallelEmbedding
from trellis.runtime.model.llama import LlamaStageModel
from trellis.runtime.model.norm import RMSNorm
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.model.weights import TensorSlice, shape_of

LOAD_FORMATS = ("auto", "safetensors", "dummy")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Our merged parameters and the checkpoint tensors stacked into them, with their shard ids.
STACKED = (
    ("qkv_proj", (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"))),
    ("gate_up_proj", (("gate_proj", 0), ("up_proj", 1))),
)
DUMMY_STD = 0.02


@dataclass
class LoadReport:
    """Which checkpoint tensors were read, and how many elements of each (for sizing and tests)."""

    elements_read: dict[str, int] = field(default_factory=dict)
    files_opened: set[str] = field(default_factory=set)


def build_stage_model(
    cfg: ModelConfig,
    *,
    layers: tuple[int, int],
    tp: TPGroup,
    device: torch.device,
    dtype: torch.dtype,
    model_path: str | Path | None,
    load_format: str = "auto",
    seed: int = 0,
) -> LlamaStageModel:
    """Allocate this rank's share of the stage directly on ``device`` and fill its weights."""
    if load_format not in LOAD_FORMATS:
        raise ModelError(f"unknown load_format {load_format!r}; expected one of {', '.join(LOAD_FORMATS)}")
    with torch.device(device):
        model = LlamaStageModel(cfg, layers, tp=tp, dtype=dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed=seed, rank=tp.rank)
    else:
        if model_path is None:
            raise ModelError(f"load_format {load_format!r} needs a model path")
        load_weights(model, model_path, rank=tp.rank)
    return model.train(False)  # inference mode for every submodule


def checkpoint_sources(param_name: str, tied: bool) -> list[tuple[str, object]]:
    """The checkpoint tensors (name, shard id) that fill one of our parameters."""
    if tied and param_name == "lm_head.weight":
        return [("model.embed_tokens.weight", None)]
    for merged, parts in STACKED:
        if f".{merged}." in param_name:
            return [(param_name.replace(merged, part), shard_id) for part, shard_id in parts]
    return [(param_name, None)]


def load_weights(model: LlamaStageModel, path: str | Path, *, rank: int = 0) -> LoadReport:
    directory = Path(path)
    weight_map = _weight_map(directory)
    report = LoadReport()
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        params = list(model.named_parameters())
        bar = tqdm(params, desc="loading weights", unit="tensor", disable=not show_progress(rank))
        for param_name, param in bar:
            for tensor_name, shard_id in checkpoint_sources(param_name, model.cfg.tie_word_embeddings):
                file = weight_map.get(tensor_name)
                if file is None:
                    raise ModelError(f"tensor {tensor_name} is missing from the checkpoint in {directory}")
                if file not in handles:
                    handles[file] = stack.enter_context(_open(directory / file))
                    report.files_opened.add(file)
                piece = _CountingSlice(handles[file], tensor_name, report)
                try:
                    param.weight_loader(param, piece, shard_id)  # type: ignore[attr-defined]
                except ModelError as exc:
                    raise ModelError(f"{file}: tensor {tensor_name}: {exc}") from None
                except Exception as exc:  # a truncated or corrupt file fails only when read
                    raise ModelError(f"{file}: cannot read tensor {tensor_name}: {exc}") from None
    return report


def show_progress(rank: int) -> bool:
    """Progress bars (weights, graph capture) only on rank 0, only for a person at a terminal:
    stderr a TTY and TRELLIS_PROGRESS not 0, so logs and tests stay clean."""
    return rank == 0 and os.environ.get("TRELLIS_PROGRESS", "1") != "0" and sys.stderr.isatty()


def check_weight_files(path: str | Path) -> None:
    """Open every safetensors file of a checkpoint (headers only), raising ModelError for a missing,
    truncated or corrupt one: checked before any process loads, it is one line, not a crash in a
    child after the others loaded."""
    directory = Path(path)
    for file in sorted(set(_weight_map(directory).values())):
        with _open(directory / file):
            pass


def init_dummy_weights(model: nn.Module, *, seed: int, rank: int = 0, std: float = DUMMY_STD) -> None:
    """Random weights made in place on the parameters' device: norms 1, the rest N(0, std).

    Each parameter's generator is seeded from (seed, rank, name), so the result does not depend on
    construction order, and the full model is never materialized anywhere.
    """
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                param.data.fill_(1.0)
                continue
            full_name = f"{module_name}.{name}".encode()
            generator = torch.Generator(device=param.device)
            generator.manual_seed((seed * 1_000_003 + rank * 7919 + zlib.crc32(full_name)) % 2**63)
            param.data.normal_(0.0, std, generator=generator)
        if isinstance(module, VocabParallelEmbedding):
            module.weight.data[module.valid_rows :].zero_()


def _weight_map(directory: Path) -> dict[str, str]:
    """Checkpoint tensor name -> file name (relative to the directory)."""
    if not directory.is_dir():
        raise ModelError(f"model directory {directory} does not exist")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index: {exc}") from None
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise ModelError(f"checkpoint file {directory / file} (listed in {INDEX_FILE}) is missing")
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise ModelError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    with _open(single) as handle:
        return dict.fromkeys(handle.keys(), SINGLE_FILE)


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ModelError(f"cannot open safetensors file {file}: {exc}") from None


class _CountingSlice:
    """A lazy checkpoint slice that records how many elements were actually read."""

    def __init__(self, handle: Any, name: str, report: LoadReport):
        self._slice: TensorSlice = handle.get_slice(name)
        self._name = name
        self._report = report

    def get_shape(self) -> list[int]:
        return list(shape_of(self._slice))

    def __getitem__(self, index: Any) -> torch.Tensor:
        piece = self._slice[index]
        self._report.elements_read[self._name] = self._report.elements_read.get(self._name, 0) + piece.numel()
        return piece

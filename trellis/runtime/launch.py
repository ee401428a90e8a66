"""Everything one stage's processes need to start, as JSON (a child gets it on its command line).

A StageLaunch is the placement of one stage (which layers, which ranks, where its ring neighbours
listen) plus the model source and the EngineConfig whole: every knob reaches every rank under its
one name, and nothing here repeats one. Built by trellis.runtime.bootstrap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from trellis.core.engine_config import EngineConfig
from trellis.core.handoff_rules import handoff_ranks


@dataclass(frozen=True, kw_only=True)
class StageLaunch:
    # The model source.
    model_path: str | None  # a Hugging Face directory; None with a preset
    preset: str | None
    load_format: str  # "auto" | "dummy"
    dtype: str  # "float32" | "bfloat16" | "float16"
    max_model_len: int  # resolved: the deployment's, else the config's max_position_embeddings
    # The placement.
    replica: str
    layers: tuple[int, int]
    stage: int
    num_stages: int
    tp: int
    device: str  # "cpu" | "cuda"
    gpus: tuple[int, ...]  # one CUDA device per TP rank; () on CPU
    dist_host: str
    dist_port: int  # rendezvous of this stage's TP group
    # The sliced hand-off (TP > 1, several stages): rank r listens on ucx_ports[r] for its slice
    # from the previous stage (not on the first stage), and sends its slice of the output to
    # next_host:next_ucx_ports[r] (not on the last stage). Index 0 is the leader's own link, on
    # which it listens for its predecessor (and a head for the sampled ids).
    ucx_ports: tuple[int, ...]
    next_host: str
    next_ucx_ports: tuple[int, ...]
    engine: EngineConfig

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def sliced_handoff(self) -> bool:
        """Each TP rank hands its 1/tp column slice of the hidden states to the same rank of the
        next stage (instead of the leader sending all of it)."""
        return handoff_ranks(self.tp, self.num_stages) > 1

    @property
    def slices(self) -> int:
        """Column slices of the hidden states on the wire between stages (one per listening rank)."""
        return handoff_ranks(self.tp, self.num_stages)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StageLaunch:
        raw = json.loads(text)
        for name in ("layers", "gpus", "ucx_ports", "next_ucx_ports"):
            raw[name] = tuple(raw[name])
        raw["engine"] = EngineConfig.from_dict(raw["engine"])
        return cls(**raw)

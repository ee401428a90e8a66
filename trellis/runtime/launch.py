"""Everything one stage's processes need to start, as JSON (a child gets it on its command line)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from trellis.core.handoff_rules import handoff_ranks


@dataclass(frozen=True)
class StageLaunch:
    model_path: str | None  # a Hugging Face directory; None with a preset
    preset: str | None
    load_format: str  # "auto" | "dummy"
    dtype: str  # "float32" | "bfloat16" | "float16"
    layers: tuple[int, int]
    stage: int
    num_stages: int
    tp: int
    device: str  # "cpu" | "cuda"
    gpus: tuple[int, ...]
    dist_host: str
    dist_port: int  # rendezvous of this stage's TP group
    block_size: int
    num_blocks: int  # 0: as many as fit the GPU (each stage may hold more than the ring's minimum)
    replica: str = "offline"
    seed: int = 0
    cuda_graphs: bool = False
    max_model_len: int | None = None
    max_num_seqs: int = 256  # the largest decode batch, hence the largest graph
    gpu_memory_utilization: float = 0.85
    one_shot_max_bytes: int = 0  # all-reduces up to this size over peer memory (0: NCCL only)
    # The sliced hand-off (TP > 1, several stages): rank r listens on ucx_ports[r] for its slice
    # from the previous stage (not on the first stage), and sends its slice of the output to
    # next_host:next_ucx_ports[r] (not on the last stage). Index 0 is the leader's own link.
    ucx_ports: tuple[int, ...] = ()
    next_host: str = ""
    next_ucx_ports: tuple[int, ...] = ()

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
        raw["layers"] = tuple(raw["layers"])
        for name in ("gpus", "ucx_ports", "next_ucx_ports"):
            raw[name] = tuple(raw[name])
        return cls(**raw)

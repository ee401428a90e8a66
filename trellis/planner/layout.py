"""Layouts: how TP groups, pipeline stages and replicas sit on the cluster's GPUs.

GPUs are numbered node by node (GPU g is on node g // gpus_per_node). Replica r takes the
contiguous GPUs [r x size, (r + 1) x size), its stage j the TP group [j x tp, (j + 1) x tp) inside
them. A replica fills an exact fraction of a node or whole nodes, so every replica is placed the
same way; a TP group stays inside one node unless cross-node TP is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.core.spec import balanced_layers
from trellis.planner.hardware import Cluster
from trellis.planner.model import ModelShape

# The engine's own split: emitted specs run exactly the stages the planner costed.
split_layers = balanced_layers


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    gpus_per_node: int
    stage_layers: tuple[tuple[int, int], ...]
    prefill_replicas: int = 0  # > 0: a prefill/decode split, the rest of the dp replicas decode

    @property
    def size(self) -> int:
        """GPUs per replica."""
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.size * self.dp

    @property
    def split(self) -> bool:
        return self.prefill_replicas > 0

    def node_of_stage(self, replica: int, stage: int) -> int:
        return (replica * self.size + stage * self.tp) // self.gpus_per_node

    def tp_spans_nodes(self) -> bool:
        return self.tp > self.gpus_per_node

    def hop_crosses_nodes(self, stage: int) -> bool:
        """Whether the hop out of ``stage`` crosses nodes (the last stage's hop goes back to the head)."""
        nxt = (stage + 1) % self.pp
        return self.node_of_stage(0, stage) != self.node_of_stage(0, nxt)

    def label(self) -> str:
        text = f"TP {self.tp} x PP {self.pp} x DP {self.dp}"
        if self.split:
            text += f" ({self.prefill_replicas} prefill + {self.dp - self.prefill_replicas} decode)"
        return text


def candidate_layouts(
    model: ModelShape,
    cluster: Cluster,
    *,
    cross_node_tp: bool = False,
    tp: int | None = None,
    pp: int | None = None,
) -> list[Layout]:
    """Every TP x PP that splits the model and packs the cluster with identical replicas (max DP)."""
    g, total = cluster.gpus_per_node, cluster.total_gpus
    tps = [t for t in _divisors(total) if model.tp_problem(t) is None]
    out = []
    for t in tps:
        if tp is not None and t != tp:
            continue
        if t > g and not (cross_node_tp and t % g == 0):
            continue
        if t <= g and g % t:
            continue  # a TP group would straddle two nodes
        for p in range(1, min(model.layers, total // t) + 1):
            if pp is not None and p != pp:
                continue
            size = t * p
            if not (g % size == 0 or size % g == 0):
                continue  # replicas would not all be placed alike
            out.append(Layout(t, p, total // size, g, split_layers(model.layers, p)))
    return out


def _divisors(n: int) -> list[int]:
    return sorted({d for d in range(1, n + 1) if n % d == 0})

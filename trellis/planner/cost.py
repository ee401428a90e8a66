"""The cost model: how long one stage takes for one step of a micro-batch, and one hop between stages.

A stage's step time is

    max(bytes read / HBM bandwidth, FLOPs / peak) + TP all-reduces + host overhead

where the bytes read are the stage's weights (once per step, whatever the batch) plus the KV
cache its attention reads, and the FLOPs are 2 x parameters per token plus attention's
4 x heads x head_dim per (query, key) pair. Each layer does two all-reduces (after attention and
after the MLP) of tokens x hidden x 2 bytes. A hop sends each rank's 1/TP slice of the hidden
states to the next stage over the link between them (UCX), which all-gathers them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from trellis.planner.layout import Layout
from trellis.planner.machine import LinkModel, Machine
from trellis.planner.memory import stage_weight_bytes
from trellis.planner.model import ACTIVATION_BYTES, ModelShape


@dataclass(frozen=True)
class StageCost:
    layers: int
    weight_read_s: float  # the stage's weights (its TP slice), read once per step
    kv_read_s_per_token: float  # per token of context that attention reads
    linear_s_per_token: float  # 2 x linear parameters (per GPU) / FLOP/s
    attn_s_per_pair: float  # attention FLOPs per (query, key) pair / FLOP/s
    head_s_per_sample: float  # the LM head, per sampled token (last stage only)
    allreduces: int  # 2 per layer when TP > 1
    allreduce_graph_s: float  # latency of one all-reduce, in a CUDA graph (decode-only steps)
    allreduce_eager_s: float  # latency of one all-reduce, eager (steps with prefill)
    allreduce_s_per_token: float  # bytes of one token's hidden state over the bus bandwidth
    overhead_s: float

    def time(self, tokens: float, kv_reads: float, pairs: float, samples: float, graph: bool) -> float:
        memory = self.weight_read_s + self.kv_read_s_per_token * kv_reads
        compute = (
            self.linear_s_per_token * tokens + self.attn_s_per_pair * pairs + self.head_s_per_sample * samples
        )
        return max(memory, compute) + self.comm(tokens, graph) + self.overhead_s

    def comm(self, tokens: float, graph: bool) -> float:
        if not self.allreduces:
            return 0.0
        latency = self.allreduce_graph_s if graph else self.allreduce_eager_s
        return self.allreduces * (latency + self.allreduce_s_per_token * tokens)

    def parts(
        self, tokens: float, kv_reads: float, pairs: float, samples: float, graph: bool
    ) -> dict[str, float]:
        """The terms of ``time``, for the report."""
        return {
            "weights": self.weight_read_s,
            "kv": self.kv_read_s_per_token * kv_reads,
            "compute": self.linear_s_per_token * tokens
            + self.attn_s_per_pair * pairs
            + self.head_s_per_sample * samples,
            "allreduce": self.comm(tokens, graph),
            "overhead": self.overhead_s,
        }


@dataclass(frozen=True)
class HopCost:
    """Out of a stage: hidden states to the next stage, or (last stage) sampled ids back to the head."""

    crosses_nodes: bool
    latency_s: float
    s_per_token: float  # UCX bytes per rank (the 1/TP slice), then the receiver's all-gather
    gather_graph_s: float
    gather_eager_s: float
    to_head: bool  # sampled ids: 4 bytes per sample, no all-gather

    def time(self, tokens: float, graph: bool) -> float:
        if self.to_head:
            return self.latency_s + self.s_per_token * tokens
        return (
            self.latency_s
            + self.s_per_token * tokens
            + (self.gather_graph_s if graph else self.gather_eager_s)
        )


@dataclass(frozen=True)
class ReplicaCost:
    stages: tuple[StageCost, ...]
    hops: tuple[HopCost, ...]  # hops[j] leaves stage j; hops[-1] returns to the head

    @property
    def pp(self) -> int:
        return len(self.stages)

    def cycle(
        self, tokens: float, kv_reads: float, pairs: float, samples: float, graph: bool
    ) -> tuple[float, float]:
        """(round trip, slowest stage) of one micro-batch step: through every stage and back to the head."""
        trip, slowest = 0.0, 0.0
        for stage, count in self._stage_classes:
            t = stage.time(tokens, kv_reads, pairs, samples, graph)
            trip += t * count
            slowest = max(slowest, t)
        for hop, count in self._hop_classes:
            trip += hop.time(samples if hop.to_head else tokens, graph) * count
        return trip, slowest

    @cached_property
    def _stage_classes(self) -> tuple[tuple[StageCost, int], ...]:
        return tuple(Counter(self.stages).items())  # stages of equal cost, counted once

    @cached_property
    def _hop_classes(self) -> tuple[tuple[HopCost, int], ...]:
        return tuple(Counter(self.hops).items())


def replica_cost(
    model: ModelShape, layout: Layout, machine: Machine, weight_dtype: str, kv_bytes: int
) -> ReplicaCost:
    tp = layout.tp
    flops = machine.flops(weight_dtype)
    hbm = machine.hbm_bytes_per_s
    tp_link = machine.inter if layout.tp_spans_nodes() else machine.intra
    hidden_bytes = model.hidden * ACTIVATION_BYTES
    stages, hops = [], []
    for j, (a, b) in enumerate(layout.stage_layers):
        first, last = j == 0, j == layout.pp - 1
        n = b - a
        weights = stage_weight_bytes(model, weight_dtype, (a, b), tp, layout.pp, first, last)
        if first:  # an embedding lookup reads only the rows it needs
            weights -= -(-model.vocab // tp) * model.hidden * ACTIVATION_BYTES
        linear = 2 * n * model.layer_linear_params() / tp
        q_heads = model.heads // tp
        stages.append(
            StageCost(
                layers=n,
                weight_read_s=weights / hbm,
                kv_read_s_per_token=model.kv_bytes_per_token(kv_bytes, n, tp) / hbm,
                linear_s_per_token=linear / flops,
                attn_s_per_pair=4 * n * q_heads * model.head_dim / flops,
                head_s_per_sample=(2 * -(-model.vocab // tp) * model.hidden / flops) if last else 0.0,
                allreduces=2 * n if tp > 1 else 0,
                allreduce_graph_s=tp_link.allreduce_s(0, tp, True) if tp > 1 else 0.0,
                allreduce_eager_s=tp_link.allreduce_s(0, tp, False) if tp > 1 else 0.0,
                allreduce_s_per_token=tp_link.allreduce_s(hidden_bytes, tp, True)
                - tp_link.allreduce_s(0, tp, True),
                overhead_s=machine.step_overhead_s,
            )
        )
        crosses = layout.hop_crosses_nodes(j)
        link: LinkModel = machine.inter if crosses else machine.intra
        if layout.pp == 1:  # the stage samples and schedules itself: no hop at all
            hops.append(HopCost(False, 0.0, 0.0, 0.0, 0.0, True))
        elif last:
            hops.append(HopCost(crosses, link.p2p_latency_s, 4 / link.p2p_bytes_per_s, 0.0, 0.0, True))
        else:
            gather_link = machine.inter if layout.tp_spans_nodes() else machine.intra
            hops.append(
                HopCost(
                    crosses,
                    link.p2p_latency_s,
                    hidden_bytes / tp / link.p2p_bytes_per_s
                    + (
                        (tp - 1) / tp * hidden_bytes / gather_link.allreduce_bus_bytes_per_s
                        if tp > 1
                        else 0.0
                    ),
                    gather_link.allgather_s(0, tp, True),
                    gather_link.allgather_s(0, tp, False),
                    False,
                )
            )
    return ReplicaCost(tuple(stages), tuple(hops))

"""The cost model: how long one stage takes for one step of a micro-batch, and one hop between stages.

A stage's step time is

    max(bytes read / HBM bandwidth, FLOPs / rate) + layers x per-layer time + TP all-reduces + host
        + (PP with TP > 1, every stage but the first) the all-gather of the received slices

* The bytes read are the stage's weights (once per step, whatever the batch) plus the KV cache its
  attention reads. The FLOPs are 2 x parameters per token plus attention's 4 x heads x head_dim
  per (query, key) pair; a decode step runs them at the GEMM rate, a step carrying prompt tokens
  (eager, not a CUDA graph) at the prefill rate measured on whole prompts.
* The per-layer time is what no byte or FLOP count explains: a layer's dozen small kernels and
  the gaps between them, measured separately in a CUDA graph and eager.
* Each layer does two all-reduces (after attention and after the MLP), each one call of
  rows x hidden x 2 bytes however many rows the step has, timed from the measured table.
* The host time is per plan: a fixed part plus a part per sequence in the step. A decode burst of
  k steps runs from one plan, so its decode steps pay 1/k of it each.
* With TP > 1, every stage after the first receives the hidden states as TP column slices and
  all-gathers them over its TP group before its layers: eagerly (outside any CUDA graph), on its
  compute thread, so the gather is part of the stage's step (and of the busy time the engine
  measures per stage), on the eager curve whatever the step.

A hop is the transfer alone: each TP rank sends its 1/TP slice of the hidden states to the same
rank of the next stage over UCX, all TP links in parallel; the last stage sends the sampled ids
(4 bytes each) back to the head.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from trellis.planner.allreduce import AllReduceCost
from trellis.planner.layout import Layout
from trellis.planner.machine import LinkModel, Machine
from trellis.planner.memory import stage_weight_bytes
from trellis.planner.model import ACTIVATION_BYTES, ModelShape


@dataclass(frozen=True)
class StageCost:
    layers: int
    weight_read_s: float  # the stage's weights (its TP slice), read once per step
    kv_read_s_per_token: float  # per token of context that attention reads
    linear_flops_per_token: float  # 2 x linear parameters (per GPU)
    attn_flops_per_pair: float  # attention FLOPs per (query, key) pair (per GPU)
    head_flops_per_sample: float  # the LM head, per sampled token (last stage only)
    decode_flops_per_s: float  # GEMM rate: decode steps (CUDA graph)
    prefill_flops_per_s: float  # achieved rate of steps that carry prompt tokens (eager)
    layer_graph_s: float  # per layer, beyond bytes, FLOPs and all-reduces, in a CUDA graph
    layer_eager_s: float  # the same, eager
    allreduces: int  # 2 per layer when TP > 1
    allreduce: AllReduceCost | None  # one call, by its size in bytes
    hidden_bytes: int  # one row of hidden states: an all-reduce of a step moves rows x this
    overhead_s: float  # host time per plan ...
    overhead_s_per_seq: float  # ... and per sequence sampled in the step
    decode_burst: int = 1  # decode steps run from one plan
    gather: AllReduceCost | None = None  # all-gathers the TP slices received from the previous stage

    def time(self, tokens: float, kv_reads: float, pairs: float, samples: float, graph: bool) -> float:
        # The sum of ``parts`` (max of memory and compute), inlined: the simulator calls this every step.
        memory = self.weight_read_s + self.kv_read_s_per_token * kv_reads
        flops = (
            self.linear_flops_per_token * tokens
            + self.attn_flops_per_pair * pairs
            + self.head_flops_per_sample * samples
        )
        host = self.overhead_s + self.overhead_s_per_seq * samples
        if graph:
            t = max(memory, flops / self.decode_flops_per_s) + self.layers * self.layer_graph_s
            t += host / self.decode_burst
        else:
            t = max(memory, flops / self.prefill_flops_per_s) + self.layers * self.layer_eager_s + host
        if self.allreduce is not None:
            t += self.allreduces * self.allreduce.seconds(tokens * self.hidden_bytes, graph)
        if self.gather is not None:  # eager, before the layers (a CUDA graph or not)
            t += self.gather.gather_seconds(tokens * self.hidden_bytes, False)
        return t

    def compute(self, tokens: float, pairs: float, samples: float, graph: bool) -> float:
        flops = (
            self.linear_flops_per_token * tokens
            + self.attn_flops_per_pair * pairs
            + self.head_flops_per_sample * samples
        )
        return flops / (self.decode_flops_per_s if graph else self.prefill_flops_per_s)

    def comm(self, tokens: float, graph: bool) -> float:
        if self.allreduce is None:
            return 0.0
        return self.allreduces * self.allreduce.seconds(tokens * self.hidden_bytes, graph)

    def handoff_gather(self, tokens: float) -> float:
        """The all-gather of the ``tokens`` rows received as TP slices: eager in every step."""
        if self.gather is None:
            return 0.0
        return self.gather.gather_seconds(tokens * self.hidden_bytes, False)

    def host(self, samples: float, graph: bool) -> float:
        per_plan = self.overhead_s + self.overhead_s_per_seq * samples
        return per_plan / self.decode_burst if graph else per_plan

    def parts(
        self, tokens: float, kv_reads: float, pairs: float, samples: float, graph: bool
    ) -> dict[str, float]:
        """The terms of ``time``, for the report."""
        return {
            "weights": self.weight_read_s,
            "kv": self.kv_read_s_per_token * kv_reads,
            "compute": self.compute(tokens, pairs, samples, graph),
            "layers": self.layers * (self.layer_graph_s if graph else self.layer_eager_s),
            "allreduce": self.comm(tokens, graph),
            "gather": self.handoff_gather(tokens),
            "overhead": self.host(samples, graph),
        }


@dataclass(frozen=True, slots=True)
class HopCost:
    """Out of a stage: hidden states to the next stage, or (last stage) sampled ids back to the head.
    The transfer only: the next stage's all-gather of the slices is in its ``StageCost``."""

    crosses_nodes: bool
    latency_s: float
    s_per_row: float  # UCX, per link: a 1/TP slice of a row of hidden states (to the head: 4 bytes)
    to_head: bool  # sampled ids, one row per sample

    def time(self, tokens: float, samples: float) -> float:
        """A step of ``tokens`` rows of hidden states sampling ``samples`` tokens: the TP links
        run in parallel, so one link's slice is the time."""
        return self.latency_s + self.s_per_row * (samples if self.to_head else tokens)


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
            trip += hop.time(tokens, samples) * count
        return trip, slowest

    @cached_property
    def _stage_classes(self) -> tuple[tuple[StageCost, int], ...]:
        return tuple(Counter(self.stages).items())  # stages of equal cost, counted once

    @cached_property
    def _hop_classes(self) -> tuple[tuple[HopCost, int], ...]:
        return tuple(Counter(self.hops).items())


def replica_cost(
    model: ModelShape,
    layout: Layout,
    machine: Machine,
    weight_dtype: str,
    kv_bytes: int,
    decode_burst: int = 1,
    one_shot_max_bytes: int = 0,
) -> ReplicaCost:
    """The costs of one replica; ``decode_burst`` and ``one_shot_max_bytes`` are the engine's settings."""
    tp = layout.tp
    flops = machine.flops(weight_dtype)
    prefill_flops = machine.prefill_flops(weight_dtype)
    hbm = machine.hbm_bytes_per_s
    tp_link = machine.inter if layout.tp_spans_nodes() else machine.intra
    allreduce = tp_link.allreduce(tp, one_shot_max_bytes) if tp > 1 else None
    hidden_bytes = model.hidden * ACTIVATION_BYTES
    stages, hops = [], []
    for j, (a, b) in enumerate(layout.stage_layers):
        first, last = j == 0, j == layout.pp - 1
        n = b - a
        weights = stage_weight_bytes(model, weight_dtype, (a, b), tp, layout.pp, first, last)
        if first:  # an embedding lookup reads only the rows it needs
            weights -= -(-model.vocab // tp) * model.hidden * ACTIVATION_BYTES
        q_heads = model.heads // tp
        stages.append(
            StageCost(
                layers=n,
                weight_read_s=weights / hbm,
                kv_read_s_per_token=model.kv_bytes_per_token(kv_bytes, n, tp) / hbm,
                linear_flops_per_token=2 * n * model.layer_linear_params() / tp,
                attn_flops_per_pair=4 * n * q_heads * model.head_dim,
                head_flops_per_sample=2 * -(-model.vocab // tp) * model.hidden if last else 0.0,
                decode_flops_per_s=flops,
                prefill_flops_per_s=prefill_flops,
                layer_graph_s=machine.layer_graph_s,
                layer_eager_s=machine.layer_eager_s,
                allreduces=2 * n if tp > 1 else 0,
                allreduce=allreduce,
                hidden_bytes=hidden_bytes,
                overhead_s=machine.step_overhead_s,
                overhead_s_per_seq=machine.step_overhead_per_seq_s,
                decode_burst=decode_burst,
                gather=allreduce if not first else None,  # the same TP group and table
            )
        )
        crosses = layout.hop_crosses_nodes(j)
        link: LinkModel = machine.inter if crosses else machine.intra
        if layout.pp == 1:  # the stage samples and schedules itself: no hop at all
            hops.append(HopCost(False, 0.0, 0.0, True))
        elif last:
            hops.append(HopCost(crosses, link.p2p_latency_s, 4 / link.p2p_bytes_per_s, True))
        else:  # each rank's 1/TP column slice, over its own link
            hops.append(HopCost(crosses, link.p2p_latency_s, hidden_bytes / tp / link.p2p_bytes_per_s, False))
    return ReplicaCost(tuple(stages), tuple(hops))

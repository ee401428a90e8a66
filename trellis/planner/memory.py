"""Memory per GPU: weights, workspace and KV cache for each stage, hence the KV room of a replica.

Of each GPU's memory, ``gpu_memory_utilization`` (the engine's setting) is the budget for
weights + activation workspace + KV cache; the rest is left to the CUDA context, NCCL buffers
and fragmentation. Every stage holds the KV of every sequence in flight for its own layers, so a
replica's room in tokens is the smallest over its stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.planner.layout import Layout
from trellis.planner.model import ACTIVATION_BYTES, DTYPE_BYTES, ModelShape


@dataclass(frozen=True)
class Budget:
    """What the engine is configured with, and what the workload needs at least."""

    gpu_memory_bytes: int
    utilization: float
    weight_dtype: str
    kv_bytes: int  # per element of the KV cache
    max_batched_tokens: int  # token budget of one step (sizes the activation workspace)
    max_seqs: int  # sequences sampled in one step (sizes the logits)
    longest_request: int  # prompt + output tokens of the longest request: its KV must fit

    @property
    def usable_bytes(self) -> float:
        return self.utilization * self.gpu_memory_bytes


@dataclass(frozen=True)
class StageMemory:
    layers: tuple[int, int]
    weight_bytes: int  # per GPU
    workspace_bytes: int
    kv_bytes_per_token: int  # per GPU
    usable_bytes: float

    @property
    def kv_room_bytes(self) -> float:
        return self.usable_bytes - self.weight_bytes - self.workspace_bytes

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_room_bytes // self.kv_bytes_per_token))


@dataclass(frozen=True)
class ReplicaMemory:
    stages: tuple[StageMemory, ...]
    longest_request: int

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV a replica holds at once (all its sequences together)."""
        return min(s.kv_tokens for s in self.stages)

    @property
    def worst(self) -> StageMemory:
        return min(self.stages, key=lambda s: s.kv_room_bytes / s.kv_bytes_per_token)

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.longest_request

    def shortfall_bytes(self) -> float:
        """Per GPU, on the tightest stage: how much more memory the longest request would need."""
        w = self.worst
        return (
            w.weight_bytes + w.workspace_bytes + self.longest_request * w.kv_bytes_per_token - w.usable_bytes
        )


def stage_weight_bytes(
    model: ModelShape, dtype: str, layers: tuple[int, int], tp: int, pp: int, first: bool, last: bool
) -> int:
    """Weights one GPU of a stage holds: its TP slice of the layers, plus the embedding and LM head
    where they live (vocab-parallel, so also sliced; a tied LM head is a second copy when PP > 1)."""
    n = layers[1] - layers[0]
    linear = n * model.layer_linear_params() // tp * DTYPE_BYTES[dtype]
    small = n * model.layer_small_params() * ACTIVATION_BYTES  # norms replicated; biases are tiny
    vocab = -(-model.vocab // tp) * model.hidden * ACTIVATION_BYTES
    embed = vocab if first else 0
    head = vocab if last and (pp > 1 or not model.tied_embeddings) else 0
    final_norm = model.hidden * ACTIVATION_BYTES if last else 0
    return linear + small + embed + head + final_norm


def stage_workspace_bytes(model: ModelShape, tp: int, budget: Budget, last: bool) -> int:
    """Peak activations of one step of ``max_batched_tokens``: residual, norm output, q/k/v and
    attention output (sliced), gate/up and the activated MLP (sliced); fp32 logits on the last stage."""
    t = budget.max_batched_tokens
    per_token = (
        2 * model.hidden + (model.q_width * 2 + 2 * model.kv_width) // tp + 3 * model.intermediate // tp
    )
    logits = budget.max_seqs * -(-model.vocab // tp) * 4 if last else 0
    return t * per_token * ACTIVATION_BYTES + logits


def replica_memory(model: ModelShape, layout: Layout, budget: Budget) -> ReplicaMemory:
    stages = []
    for j, layers in enumerate(layout.stage_layers):
        first, last = j == 0, j == layout.pp - 1
        stages.append(
            StageMemory(
                layers=layers,
                weight_bytes=stage_weight_bytes(
                    model, budget.weight_dtype, layers, layout.tp, layout.pp, first, last
                ),
                workspace_bytes=stage_workspace_bytes(model, layout.tp, budget, last),
                kv_bytes_per_token=model.kv_bytes_per_token(
                    budget.kv_bytes, layers[1] - layers[0], layout.tp
                ),
                usable_bytes=budget.usable_bytes,
            )
        )
    return ReplicaMemory(tuple(stages), budget.longest_request)

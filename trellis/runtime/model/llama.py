"""One pipeline stage of a Llama-family decoder (layers [a, b)) on one TP rank.

Inputs are flat and token-packed: every sequence's tokens of the step concatenated, [tokens, hidden].
Between stages travels the residual stream after the stage's last layer, replicated on all TP ranks.
Parameter names mirror the Hugging Face checkpoint (``model.layers.{i}...``, ``lm_head``), with q/k/v
merged into ``qkv_proj`` and gate/up into ``gate_up_proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis.core.model_config import ModelConfig
from trellis.runtime.model.attention import Attention, StepContext
from trellis.runtime.model.embedding import ParallelLMHead, VocabParallelEmbedding
from trellis.runtime.model.linear import MergedColumnParallelLinear, RowParallelLinear
from trellis.runtime.model.norm import RMSNorm
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.model.rotary import RotaryEmbedding


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [size, size], bias=cfg.mlp_bias, tp=tp, dtype=dtype
        )
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp, dtype=dtype)
        self.fused = None  # on GPU: the Triton kernels package (one kernel for silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tokens, hidden] -> same
        gate_up = self.gate_up_proj(x)  # [tokens, 2 * intermediate / tp]
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, layer_idx, tp=tp, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, tp=tp, dtype=dtype)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """HF's ``model.*``: this stage's share of embed_tokens, layers and the final norm."""

    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        is_first, is_last = layers[0] == 0, layers[1] == cfg.num_hidden_layers
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=tp, dtype=dtype) if is_first else None
        )
        # Keyed by the global layer index so parameter names match the checkpoint.
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i, tp=tp, dtype=dtype) for i in range(layers[0], layers[1])}
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype) if is_last else None


class LlamaStageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: tuple[int, int], *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.layer_range = layers
        self.is_first = layers[0] == 0
        self.is_last = layers[1] == cfg.num_hidden_layers
        self.model = DecoderStack(cfg, layers, tp=tp, dtype=dtype)
        self.lm_head = (
            ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp=tp, dtype=dtype) if self.is_last else None
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.dtype = dtype
        self.fused = None

    def use_fused_kernels(self) -> None:
        """GPU: Triton kernels for norm+residual and SiLU-gate (same math, far fewer launches); the
        rotary is the attention backend's (GpuAttentionBackend.forward_rotary)."""
        from trellis.runtime import kernels  # needs triton: imported on GPU only

        self.fused = kernels
        for layer in self.model.layers.values():
            layer.mlp.fused = kernels

    def rotary_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(positions, self.dtype)

    def forward(self, inputs: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Token ids [tokens] (first stage) or hidden [tokens, hidden] -> hidden [tokens, hidden]."""
        if self.is_first:
            assert self.model.embed_tokens is not None
            x = self.model.embed_tokens(inputs)
        else:
            x = inputs.to(self.dtype)
        if self.fused is not None:
            return self._forward_fused(x, ctx)
        for layer in self.model.layers.values():
            x = layer(x, ctx)
        return x

    def _forward_fused(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        # The residual stream rides beside the layer outputs so each "add, then norm" is one kernel.
        ops, residual = self.fused, None
        for layer in self.model.layers.values():
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            if residual is None:
                residual, h = x, ops.rms_norm(x, norm1.weight, norm1.eps)
            else:
                h, residual = ops.add_rms_norm(x, residual, norm1.weight, norm1.eps)
            h = layer.self_attn(h, ctx)
            h, residual = ops.add_rms_norm(h, residual, norm2.weight, norm2.eps)
            x = layer.mlp(h)
        return x if residual is None else x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage: the rows to sample [rows, hidden] -> float32 logits [rows, vocab] on every rank."""
        assert self.model.norm is not None and self.lm_head is not None, "only the last stage has an LM head"
        return self.lm_head(self.model.norm(hidden)).float()

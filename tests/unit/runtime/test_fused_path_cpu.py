"""The GPU code path (fused Triton kernels + GpuAttentionBackend) run on CPU in Triton's interpreter,
against the plain-PyTorch reference runner: same tokens, same logits, in mixed prefill/decode steps."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tests.checkpoints import make_checkpoint
from tests.stage_driver import drive
from trellis.core.model_config import load_model_config
from trellis.runtime.model.gpu_backend import GpuAttentionBackend
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import StageRunner

PROMPTS = [[5, 9, 2], [7] * 21, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], [11]]


def runner(path, fused: bool) -> StageRunner:
    cfg = load_model_config(path)
    r = StageRunner(
        cfg,
        layers=(0, cfg.num_hidden_layers),
        tp=TPGroup.single(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=8,
        num_blocks=40,
        model_path=str(path),
    )
    if fused:
        r.model.use_fused_kernels()
        r.backend = GpuAttentionBackend()
    return r


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral"])
def test_fused_path_matches_reference(kind: str, tmp_path) -> None:
    path = make_checkpoint(kind, tmp_path / kind)
    # Late arrivals and chunks of 8 make steps that mix decode rows with prefill chunks.
    kw = dict(chunk_size=8, arrivals=[0, 0, 2, 3])
    want = drive([runner(path, fused=False)], PROMPTS, 6, **kw)
    got = drive([runner(path, fused=True)], PROMPTS, 6, **kw)
    assert got.tokens == want.tokens
    for g, w in zip(got.first_logits, want.first_logits, strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-5, atol=1e-5)

"""Prefill on the fused SDPA kernels (prefill_attention.py) against a float64 reference, for each
kernel choice; and the engine with chunked prefill (every later chunk attends over the paged
cache) against transformers: fp32 greedy tokens identical, bf16 logits within the tolerance of
test_gpu_engine. Run on a GPU machine: pytest -m gpu tests/gpu."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from tests.checkpoints import make_checkpoint, reference_generate, reference_logits
from tests.gpu.test_gpu_engine import NEW_TOKENS, hf_bf16_logits, prompts, relative_error
from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs
from trellis.runtime.model import prefill_attention
from trellis.runtime.model.attention_metadata import build_attention_metadata, key_slots
from trellis.runtime.model.prefill_attention import SdpaChoice, attend_fresh, attend_with_context

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# ||out - ref|| / ||ref|| against float64: fp32 kernels land far below 1e-4; bf16 operands and
# output round at 2^-8, so ~4e-3.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.2e-2}
CHOICES = {
    "cudnn-gqa": SdpaChoice(SDPBackend.CUDNN_ATTENTION, expand_kv=False),
    "cudnn-expanded": SdpaChoice(SDPBackend.CUDNN_ATTENTION, expand_kv=True),
    "flash-gqa": SdpaChoice(SDPBackend.FLASH_ATTENTION, expand_kv=False),
    "flash-expanded": SdpaChoice(SDPBackend.FLASH_ATTENTION, expand_kv=True),
    "efficient-expanded": SdpaChoice(SDPBackend.EFFICIENT_ATTENTION, expand_kv=True),
}
HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 64, 16


def fused_qkv(n: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [n, 8, 64], k, v [n, 2, 64]: strided views of one fused buffer, as the QKV projection gives."""
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * DIM, dtype=dtype, device=device)
    q, k, v = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], dim=-1)
    return q.view(n, HEADS, DIM), k.view(n, KV_HEADS, DIM), v.view(n, KV_HEADS, DIM)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None
) -> torch.Tensor:
    """Float64 definition: query i (position start + i) sees key j iff 0 <= start + i - j (< window)."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
    scores = torch.einsum("nhd,chd->hnc", q, k) * DIM**-0.5
    distance = torch.arange(start, start + q.shape[0], device=q.device)[:, None] - torch.arange(
        k.shape[0], device=q.device
    )
    allowed = (distance >= 0) & ((distance < window) if window is not None else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hnc,chd->nhd", probs, v)


def error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return float((out.double() - ref).norm() / ref.norm())


def check_fresh(n: int, dtype: torch.dtype, device: str) -> float:
    q, k, v = fused_qkv(n, dtype, device)
    return error(attend_fresh(q, k, v, scale=DIM**-0.5), reference(q, k, v, 0, None))


def check_with_context(start: int, n: int, window: int | None, dtype: torch.dtype, device: str) -> float:
    """A chunk of n queries after ``start`` cached tokens, its keys among shuffled cache blocks
    (the chunk's own already stored), through the engine's metadata and key_slots."""
    context = start + n
    blocks = -(-context // BLOCK)
    table = torch.randperm(blocks + 5)[:blocks].tolist()
    meta = build_attention_metadata([start], [n], [table], block_size=BLOCK, device=torch.device(device))
    q = fused_qkv(n, dtype, device)[0]
    keys, values = (torch.randn(context, KV_HEADS, DIM, dtype=dtype, device=device) for _ in "kv")
    flat_k, flat_v = (
        torch.randn((blocks + 5) * BLOCK, KV_HEADS, DIM, dtype=dtype, device=device) for _ in "kv"
    )
    slots = key_slots(meta, 0, context)
    flat_k[slots], flat_v[slots] = keys, values
    out = attend_with_context(q, flat_k, flat_v, slots, start, scale=DIM**-0.5, sliding_window=window)
    return error(out, reference(q, keys, values, start, window))


@pytest.fixture(params=list(CHOICES), ids=list(CHOICES))
def choice(request, monkeypatch) -> str:
    """Every kernel choice for fresh prompts (short and long) and chunks with context."""
    monkeypatch.setattr(prefill_attention, "FRESH", CHOICES[request.param])
    monkeypatch.setattr(prefill_attention, "LONG_FRESH", CHOICES[request.param])
    monkeypatch.setattr(prefill_attention, "LONG_PROMPTS_ON_CUDNN", True)  # the padded path too
    monkeypatch.setattr(prefill_attention, "WITH_CONTEXT", CHOICES[request.param])
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [2, 17, 300, 1030, 2048, 2100])
def test_fresh_prompt_matches_reference(choice, dtype, n) -> None:
    """2048 and 2100 (padded to 2560) take the padded long-prompt path in bf16."""
    assert check_fresh(n, dtype, "cuda") < TOLERANCE[dtype]


@pytest.mark.parametrize("cudnn", [False, True], ids=["shipped", "long-on-cudnn"])
@pytest.mark.parametrize(("start", "n"), [(0, 300), (0, 2049), (0, 4096), (0, 3000), (1000, 3000)])
def test_shipped_choices_match_reference(cudnn, start, n, monkeypatch) -> None:
    """The choices as shipped (and with long prompts on cuDNN, padded), in bf16: short and long
    fresh prompts, and a chunk with context; each twice (the second reuses cuDNN's plan)."""
    monkeypatch.setattr(prefill_attention, "LONG_PROMPTS_ON_CUDNN", cudnn)
    for _ in range(2):
        if start == 0:
            err = check_fresh(n, torch.bfloat16, "cuda")
        else:
            err = check_with_context(start, n, None, torch.bfloat16, "cuda")
        assert err < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("start", "n"), [(16, 2), (5, 40), (100, 33), (777, 512), (2000, 64)])
def test_chunk_with_context_matches_reference(choice, dtype, start, n) -> None:
    assert check_with_context(start, n, None, dtype, "cuda") < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("start", "n", "window"), [(0, 300, 64), (0, 40, 64), (100, 33, 16), (500, 200, 128)]
)
def test_sliding_window_matches_reference(dtype, start, n, window) -> None:
    """Inside the window (start + n <= W) the causal paths run; past it the masked one."""
    assert check_with_context(start, n, window, dtype, "cuda") < TOLERANCE[dtype]


def run_chunked(path, ps, dtype: str) -> list:
    """The engine with a 32-token budget: prompts of up to 200 tokens prefill in chunks, beside
    other sequences' decode rows (eager decode: graphs are test_gpu_engine's subject)."""
    engine = EngineConfig(num_blocks=512, max_num_batched_tokens=32, max_num_seqs=8, cuda_graphs=False)
    args = EngineArgs(model=str(path), device="cuda", dtype=dtype, return_logits=True, engine=engine)
    with Engine(args) as e:
        return e.generate(ps, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))


@pytest.mark.parametrize("kind", ["llama-gqa", "mistral"])
def test_chunked_prefill_fp32_matches_transformers(kind, tmp_path) -> None:
    """mistral's 16-token window is shorter than the chunks: its later chunks take the masked path."""
    path = make_checkpoint(kind, tmp_path / kind)
    ps = prompts(1000)
    outs = run_chunked(path, ps, "float32")
    assert [o.token_ids for o in outs] == reference_generate(path, ps, NEW_TOKENS)
    for p, o in zip(ps, outs, strict=True):
        assert relative_error(o.first_logits, reference_logits(path, p)) < 1e-4


def test_chunked_prefill_bf16_logits_within_tolerance(tmp_path) -> None:
    """test_gpu_engine's bf16 tolerance: no worse than transformers in bf16 (x1.5, floor 2%)."""
    path = make_checkpoint("llama-gqa", tmp_path / "gqa")
    ps = prompts(1000)
    outs = run_chunked(path, ps, "bfloat16")
    ours = theirs = 0.0
    for p, o in zip(ps, outs, strict=True):
        ref = reference_logits(path, p)
        ours = max(ours, relative_error(o.first_logits.float(), ref))
        theirs = max(theirs, relative_error(hf_bf16_logits(path, p), ref))
    print(f"chunked bf16 first-step logits vs fp32: trellis {ours:.4f}, transformers {theirs:.4f}")
    assert ours <= max(1.5 * theirs, 0.02)

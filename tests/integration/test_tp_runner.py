"""Real multi-process tensor parallelism on CPU (gloo): every rank of TP=2 and TP=4 stages, with kv-head
replication, vocab padding, qkv biases and a PP=2 split inside the ranks, gives transformers' greedy
tokens and logits; a seeded sampled request gives the same tokens as on one process."""

from __future__ import annotations

import json
import queue
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from tests.checkpoints import make_checkpoint, reference_generate, reference_logits
from tests.integration.tp_worker import run_rank
from tests.stage_driver import drive
from trellis.core.model_config import load_model_config
from trellis.core.sampling import SamplingParams
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import StageRunner

NEW_TOKENS = 12
BLOCK_SIZE = 4
NUM_BLOCKS = 96
PROMPT_LENGTHS = (1, 9, 30)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
DEADLINE_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {kind: make_checkpoint(kind, root / kind) for kind in ("llama-gqa", "qwen2", "llama-tied")}


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def single_process_seeded(path: Path, prompts: list[list[int]]) -> list[int]:
    """The seeded request's tokens on one rank, one stage: what every split must reproduce."""
    cfg = load_model_config(path)
    runner = StageRunner(
        cfg,
        layers=(0, cfg.num_hidden_layers),
        tp=TPGroup.single(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        model_path=str(path),
    )
    result = drive([runner], prompts, NEW_TOKENS, sampling=[SamplingParams()] * (len(prompts) - 1) + [SEEDED])
    return result.tokens[-1]


def run_ranks(world: int, scenario: dict[str, Any]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(
        run_rank, args=(world, free_port(), scenario, results), nprocs=world, join=False, start_method="spawn"
    )
    reports = []
    try:
        for _ in range(world):  # drain before joining: a rank exits only once its report is flushed
            reports.append(json.loads(results.get(timeout=DEADLINE_S)))
        while not procs.join(timeout=DEADLINE_S):
            pass
    except queue.Empty:
        pytest.fail(f"only {len(reports)} of {world} ranks reported within {DEADLINE_S}s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    errors = [f"rank {r['rank']}: {r['error']}\n{r['traceback']}" for r in reports if "error" in r]
    assert not errors, "\n".join(errors)
    return sorted(reports, key=lambda r: r["rank"])


@pytest.mark.parametrize(
    ("kind", "tp", "stages", "chunk_size"),
    [
        ("llama-gqa", 2, [(0, 4)], None),
        ("llama-gqa", 4, [(0, 4)], 8),  # 2 kv heads over 4 ranks: replicated; chunked prefill
        ("qwen2", 2, [(0, 3)], None),
        ("llama-tied", 2, [(0, 2), (2, 4)], None),  # PP=2 inside each rank, tied head on the last stage
    ],
    ids=["llama-gqa-tp2", "llama-gqa-tp4", "qwen2-tp2", "llama-tied-tp2-pp2"],
)
def test_tensor_parallel_matches_transformers(
    checkpoints: dict[str, Path], kind: str, tp: int, stages: list[tuple[int, int]], chunk_size: int | None
) -> None:
    path = checkpoints[kind]
    prompts = prompts_for(load_model_config(path).vocab_size)
    sampled_prompts = [*prompts, prompts[1]]  # the last request samples, seeded
    scenario = {
        "path": str(path),
        "stages": stages,
        "prompts": sampled_prompts,
        "new_tokens": NEW_TOKENS,
        "block_size": BLOCK_SIZE,
        "num_blocks": NUM_BLOCKS,
        "chunk_size": chunk_size,
        "sampling": [asdict(SamplingParams())] * len(prompts) + [asdict(SEEDED)],
    }
    reports = run_ranks(tp, scenario)

    want_tokens = reference_generate(path, prompts, NEW_TOKENS)
    want_logits = torch.stack([reference_logits(path, p) for p in prompts])
    want_seeded = single_process_seeded(path, sampled_prompts)
    for report in reports:  # every rank holds the gathered logits and the broadcast tokens
        logits = torch.tensor(report["first_logits"][: len(prompts)])
        assert logits.shape == want_logits.shape
        err = ((logits - want_logits).abs().max() / want_logits.abs().max()).item()
        assert err < 1e-4, f"rank {report['rank']}: relative logits error {err}"
        assert report["tokens"][: len(prompts)] == want_tokens, f"rank {report['rank']}"
        assert report["tokens"][-1] == want_seeded, f"rank {report['rank']}: seeded sampling differs"

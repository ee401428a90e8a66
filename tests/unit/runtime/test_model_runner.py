"""StageRunner against transformers on tiny random checkpoints: logits within 1e-4 relative, greedy
tokens identical, for batched prefill + decode, chunked prefill, two pipeline stages, late arrivals
with block reuse, and sliding windows."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint, reference_generate, reference_logits
from tests.stage_driver import drive
from trellis.core.model_config import ModelConfig, load_model_config
from trellis.core.plan import NewRequest, SeqStep, StepPlan, StepResult
from trellis.core.sampling import SamplingParams
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import PlanError, StageRunner

KINDS = ("llama-gqa", "llama-tied", "qwen2", "mistral")
NEW_TOKENS = 16
BLOCK_SIZE = 4


def make_prompts(vocab: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@dataclasses.dataclass
class Reference:
    path: Path
    cfg: ModelConfig
    prompts: list[list[int]]
    tokens: list[list[int]]
    logits: torch.Tensor  # [prompts, vocab]


@pytest.fixture(scope="module", params=KINDS)
def ref(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return _reference(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return _reference("llama-gqa", tmp_path_factory)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return _reference("mistral", tmp_path_factory)


def _reference(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    path = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
    cfg = load_model_config(path)
    prompts = make_prompts(cfg.vocab_size, (1, 7, 23, 50))
    logits = torch.stack([reference_logits(path, p) for p in prompts])
    return Reference(path, cfg, prompts, reference_generate(path, prompts, NEW_TOKENS), logits)


def make_runner(
    ref: Reference,
    layers: tuple[int, int] | None = None,
    num_blocks: int = 128,
    cfg: ModelConfig | None = None,
) -> StageRunner:
    cfg = cfg or ref.cfg
    return StageRunner(
        cfg,
        layers=layers or (0, cfg.num_hidden_layers),
        tp=TPGroup.single(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        block_size=BLOCK_SIZE,
        num_blocks=num_blocks,
        model_path=str(ref.path),
    )


def assert_matches(ref: Reference, result_tokens: list[list[int]], first_logits: list[list[float]]) -> None:
    assert max_rel_err(torch.tensor(first_logits), ref.logits) < 1e-4
    assert result_tokens == ref.tokens


def test_batched_prefill_and_decode_match_transformers(ref: Reference) -> None:
    result = drive([make_runner(ref)], ref.prompts, NEW_TOKENS)
    assert result.steps == NEW_TOKENS  # one prefill step for the whole batch, then decode
    assert_matches(ref, result.tokens, result.first_logits)


@pytest.mark.parametrize("chunk_size", [7, 20])
def test_chunked_prefill_matches(gqa: Reference, chunk_size: int) -> None:
    result = drive([make_runner(gqa)], gqa.prompts, NEW_TOKENS, chunk_size=chunk_size)
    assert result.steps > NEW_TOKENS  # the long prompts really took several steps
    assert_matches(gqa, result.tokens, result.first_logits)


def test_chunked_prefill_with_sliding_window(mistral: Reference) -> None:
    result = drive([make_runner(mistral)], mistral.prompts, NEW_TOKENS, chunk_size=9)
    assert_matches(mistral, result.tokens, result.first_logits)


def test_sliding_window_is_applied(mistral: Reference) -> None:
    # Attending past the window must change the long prompt's logits: the window is really in play.
    cfg = dataclasses.replace(mistral.cfg, sliding_windows=(None,) * mistral.cfg.num_hidden_layers)
    result = drive([make_runner(mistral, cfg=cfg)], mistral.prompts[-1:], 1)
    assert max_rel_err(torch.tensor(result.first_logits), mistral.logits[-1:]) > 1e-2


@pytest.mark.parametrize("split", [2, 1, 3])
def test_two_pipeline_stages_match(gqa: Reference, split: int) -> None:
    first, last = make_runner(gqa, (0, split)), make_runner(gqa, (split, 4))
    assert (first.is_first, first.is_last, last.is_first, last.is_last) == (True, False, False, True)
    result = drive([first, last], gqa.prompts, NEW_TOKENS)
    assert_matches(gqa, result.tokens, result.first_logits)


def test_late_arrivals_reuse_freed_blocks(gqa: Reference) -> None:
    # 24 blocks cannot hold every sequence at once: the last arrival lives in blocks freed by the others.
    result = drive(
        [make_runner(gqa, num_blocks=24)], gqa.prompts, NEW_TOKENS, arrivals=[0, 2, 5, 30], chunk_size=16
    )
    assert_matches(gqa, result.tokens, result.first_logits)


def _plan(
    step_id: int, seqs: tuple[SeqStep, ...], new: tuple[NewRequest, ...] = (), finished: tuple[int, ...] = ()
) -> StepPlan:
    return StepPlan(step_id, seqs, new, finished)


def test_plan_diffs_update_block_tables(gqa: Reference) -> None:
    runner = make_runner(gqa)
    req = NewRequest(7, (1, 2, 3, 4, 5), SamplingParams())
    out = runner.execute(_plan(0, (SeqStep(7, 0, (1, 2, 3, 4, 5), 0, (9, 4), True),), (req,)), None)
    assert isinstance(out, StepResult) and out.seq_ids == (7,) and len(out.token_ids) == 1
    assert runner.seqs[7].block_table == [9, 4]
    # Replace the tail of the table (e.g. after a copy-on-write), then extend it.
    runner.execute(_plan(1, (SeqStep(7, 5, (6,), 1, (11,), False),)), None)
    assert runner.seqs[7].block_table == [9, 11]
    runner.execute(_plan(2, (SeqStep(7, 6, (7, 8, 9), 2, (3,), True),)), None)
    assert runner.seqs[7].block_table == [9, 11, 3]
    assert runner.last_logits is not None and runner.last_logits.shape == (1, gqa.cfg.vocab_size)
    out = runner.execute(_plan(3, (), finished=(7,)), None)
    assert out == StepResult(3, (), ())
    assert 7 not in runner.seqs


def test_only_rows_with_sample_are_sampled(gqa: Reference) -> None:
    runner = make_runner(gqa)
    new = tuple(NewRequest(i, (5, 6, 7), SamplingParams()) for i in range(3))
    seqs = (
        SeqStep(0, 0, (5, 6, 7), 0, (0,), True),
        SeqStep(1, 0, (5, 6), 0, (1,), False),
        SeqStep(2, 0, (5, 6, 7), 0, (2,), True),
    )
    out = runner.execute(_plan(0, seqs, new), None)
    assert isinstance(out, StepResult) and out.seq_ids == (0, 2)
    assert runner.last_logits is not None and runner.last_logits.shape == (2, gqa.cfg.vocab_size)
    assert torch.equal(runner.last_logits[0], runner.last_logits[1])  # same prompt, different blocks
    assert out.logits is None  # full logits travel back only when the plan asks


def test_plan_can_ask_for_logits(gqa: Reference) -> None:
    runner = make_runner(gqa)
    new = (NewRequest(0, tuple(gqa.prompts[2]), SamplingParams()),)
    step = SeqStep(0, 0, tuple(gqa.prompts[2]), 0, tuple(range(6)), True)
    out = runner.execute(StepPlan(0, (step,), new, return_logits=True), None)
    assert isinstance(out, StepResult) and out.logits is not None
    assert out.logits.dtype == torch.float32 and out.logits.device.type == "cpu"
    assert max_rel_err(out.logits, gqa.logits[2:3]) < 1e-4
    assert out.token_ids == (int(gqa.logits[2].argmax()),)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (_plan(0, (SeqStep(3, 0, (1,), 0, (0,), True),)), "unknown sequence 3"),
        (
            _plan(0, (SeqStep(1, 0, (1,), 1, (0,), True),), (NewRequest(1, (1,), SamplingParams()),)),
            "block_table_start 1 is past its table of 0 blocks",
        ),
        (
            _plan(0, (SeqStep(1, 0, (1,) * 5, 0, (0,), True),), (NewRequest(1, (1,), SamplingParams()),)),
            "needs 5 cache slots but its blocks hold 4",
        ),
        (
            _plan(0, (SeqStep(1, 0, (1,), 0, (500,), True),), (NewRequest(1, (1,), SamplingParams()),)),
            "block id outside [0, 128)",
        ),
        (
            _plan(0, (SeqStep(1, 0, (), 0, (0,), True),), (NewRequest(1, (1,), SamplingParams()),)),
            "fed no tokens",
        ),
    ],
)
def test_bad_plans_raise_plan_error(gqa: Reference, plan: StepPlan, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace(")", r"\)")):
        make_runner(gqa).execute(plan, None)


def test_duplicate_request_and_bad_hidden_raise_plan_error(gqa: Reference) -> None:
    runner = make_runner(gqa, (2, 4))
    new = (NewRequest(1, (1, 2), SamplingParams()),)
    plan = _plan(0, (SeqStep(1, 0, (1, 2), 0, (0,), True),), new)
    with pytest.raises(PlanError, match=r"expected hidden states of shape \[2, 64\], got \[3, 64\]"):
        runner.execute(plan, torch.zeros(3, 64))
    with pytest.raises(PlanError, match="new request 1 is already running"):
        runner.execute(_plan(1, (), new), None)


def test_dummy_weights_run_without_files(gqa: Reference) -> None:
    def dummy_runner() -> StageRunner:
        return StageRunner(
            gqa.cfg,
            layers=(0, 4),
            tp=TPGroup.single(),
            device=torch.device("cpu"),
            dtype=torch.float32,
            block_size=BLOCK_SIZE,
            num_blocks=64,
            model_path=None,
            load_format="dummy",
            seed=3,
        )

    first, second = drive([dummy_runner()], gqa.prompts, 4), drive([dummy_runner()], gqa.prompts, 4)
    assert first.tokens == second.tokens  # deterministic from the seed
    assert all(0 <= t < gqa.cfg.vocab_size for seq in first.tokens for t in seq)
    assert torch.isfinite(torch.tensor(first.first_logits)).all()


def test_num_blocks_for_sizes_the_cache(gqa: Reference) -> None:
    per_block = 2 * 2 * BLOCK_SIZE * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads, head_dim 8, float32
    blocks = StageRunner.num_blocks_for(
        10 * per_block + 5, gqa.cfg, layers=(0, 2), tp=1, block_size=BLOCK_SIZE, dtype=torch.float32
    )
    assert blocks == 10

"""The pipeline hand-off and its bubble, on the offline engine (real processes, UCX, gloo).

TP 2 x PP 3: each TP rank of a stage hands its half of the hidden states to the same rank of the
next stage, and the tokens and logits are still transformers'. Every rank logs what its own link
carried, and that is exactly half of every plan's hidden states, never all of them. Every stage's
busy seconds come back to the head: one report per step, positive, within the wall time, monotone;
and with one micro-batch in flight the stages never overlap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint, reference_generate, reference_logits
from tests.integration.engine_cases import (
    GREEDY,
    LOGITS_RTOL,
    NEW_TOKENS,
    make_prompts,
    relative_error,
    small_cpu_env,
)
from trellis.core.engine_config import EngineConfig
from trellis.core.errors import ConfigError
from trellis.core.model_config import load_model_config
from trellis.engine import Engine, EngineArgs

pytestmark = pytest.mark.timeout(300)

PROMPT_LENGTHS = (1, 9, 33, 70)
FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Case:
    path: Path
    hidden_size: int
    prompts: list[list[int]]
    want_tokens: list[list[int]]
    want_logits: list[torch.Tensor]

    @property
    def tokens_fed(self) -> int:
        """Tokens every stage runs: each prompt once (no prefix cache), then every generated token
        but the last."""
        return sum(len(p) for p in self.prompts) + len(self.prompts) * (NEW_TOKENS - 1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with small_cpu_env():
        yield


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    path = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("pipeline") / "ckpt", seed=3)
    cfg = load_model_config(path)
    assert cfg.num_hidden_layers >= 3 and cfg.hidden_size % 2 == 0
    prompts = make_prompts(cfg.vocab_size, PROMPT_LENGTHS, seed=11)
    return Case(
        path=path,
        hidden_size=cfg.hidden_size,
        prompts=prompts,
        want_tokens=reference_generate(path, prompts, NEW_TOKENS),
        want_logits=[reference_logits(path, p) for p in prompts],
    )


def log_events(text: str, event: str) -> list[dict]:
    """The JSON log lines of this event, from every process of the replica (a line holding two
    objects, from processes writing at once, is read as both)."""
    decoder = json.JSONDecoder()
    events = []
    for line in text.splitlines():
        at = 0
        while (at := line.find("{", at)) >= 0:
            try:
                obj, at = decoder.raw_decode(line, at)
            except json.JSONDecodeError:
                break  # not JSON from here on (e.g. a progress bar)
            events.append(obj)
    return [e for e in events if e.get("event") == event]


def test_tp2_pp3_hands_each_rank_its_slice_and_matches_transformers(
    case: Case, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_LOG_LEVEL", "INFO")  # the byte counts are logged at INFO
    args = EngineArgs(
        model=str(case.path), tp=2, pp=3, return_logits=True, engine=EngineConfig(enable_prefix_caching=False)
    )
    with Engine(args) as engine:
        outs = engine.generate(case.prompts, GREEDY)
        steps = engine.head.steps
    logs = capfd.readouterr().err

    for i, (out, want) in enumerate(zip(outs, case.want_tokens, strict=True)):
        assert out.token_ids == want, f"prompt {i}: tokens differ"
        err = relative_error(out.first_logits, case.want_logits[i])
        assert err <= LOGITS_RTOL, f"prompt {i}: first-step logits off by {err:.2e} relative"

    half = case.tokens_fed * (case.hidden_size // 2) * FLOAT32_BYTES  # one rank's columns, every plan
    leaders = {e["stage"]: e for e in log_events(logs, "stage loop ends")}
    peers = {e["stage"]: e for e in log_events(logs, "peer stopping")}
    assert sorted(leaders) == [1, 2] and sorted(peers) == [0, 1, 2], (leaders, peers)
    for stage in (1, 2):  # what rank 0 and rank 1 of each receiving stage got on their own links
        assert leaders[stage]["activation_bytes_received"] == half
        assert peers[stage]["slice_bytes_received"] == half
        assert peers[stage]["slices_received"] == steps
    for stage in (0, 1):
        assert peers[stage]["slice_bytes_sent"] == half
    assert peers[0]["slice_bytes_received"] == 0 and peers[2]["slice_bytes_sent"] == 0


def test_every_stage_reports_its_busy_seconds_to_the_head(case: Case) -> None:
    args = EngineArgs(model=str(case.path), pp=2, engine=EngineConfig(enable_prefix_caching=False))
    with Engine(args) as engine:
        assert engine.head.scheduler.config.max_in_flight == 2  # one micro-batch per stage
        before = engine.stage_busy_seconds()
        assert before == [0.0, 0.0]
        start = time.perf_counter()
        engine.generate(case.prompts, GREEDY)
        wall = time.perf_counter() - start
        after = engine.stage_busy_seconds()
        engine.generate(case.prompts[:1], GREEDY)
        later = engine.stage_busy_seconds()
        assert engine.head.stage_busy.steps == engine.head.steps  # every step reported every stage

    assert len(after) == 2
    for stage, (b, a) in enumerate(zip(before, after, strict=True)):
        assert 0 < a - b <= wall, f"stage {stage}: busy {a - b:.3f} s in {wall:.3f} s"
    assert all(x > a for x, a in zip(later, after, strict=True)), (after, later)  # monotone
    assert 0 <= Engine.bubble_fraction(before, after, wall) < 1


def test_one_micro_batch_in_flight_leaves_the_stages_taking_turns(case: Case) -> None:
    with pytest.raises(ConfigError, match=r"^engine\.max_in_flight: must be >= 1, got 0$"):
        Engine(EngineArgs(model=str(case.path), pp=2, engine=EngineConfig(max_in_flight=0)))
    args = EngineArgs(
        model=str(case.path), pp=2, engine=EngineConfig(max_in_flight=1, enable_prefix_caching=False)
    )
    with Engine(args) as engine:
        assert engine.head.scheduler.config.max_in_flight == 1
        before = engine.stage_busy_seconds()
        start = time.perf_counter()
        outs = engine.generate(case.prompts, GREEDY)
        wall = time.perf_counter() - start
        after = engine.stage_busy_seconds()

    assert [o.token_ids for o in outs] == case.want_tokens
    # One plan at a time goes round the ring, so the stages' busy times add up within the wall time.
    busy = sum(a - b for a, b in zip(after, before, strict=True))
    assert 0 < busy <= wall, f"{busy:.3f} s busy in {wall:.3f} s"
    assert Engine.bubble_fraction(before, after, wall) >= 0

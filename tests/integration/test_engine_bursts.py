"""Greedy decode bursts (several steps per plan, tokens fed back on the device) give exactly the
tokens of ordinary steps, on one stage with and without TP."""

from __future__ import annotations

import pytest

from tests.checkpoints import make_checkpoint, reference_generate
from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs

PROMPTS = [[5, 9, 2, 7], [1] * 30, [3, 1, 4, 1, 5, 9, 2, 6], [11]]


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    path = make_checkpoint("llama-gqa", tmp_path_factory.mktemp("gqa"))
    return path, reference_generate(path, PROMPTS, 13)


@pytest.mark.parametrize("tp", [1, 2])
def test_bursts_match_transformers(gqa, tp: int) -> None:
    path, want = gqa
    with Engine(
        EngineArgs(model=str(path), tp=tp, engine=EngineConfig(num_blocks=64, decode_burst=4))
    ) as engine:
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=13, ignore_eos=True))
        assert engine.head.steps < 13  # bursts ran: fewer plans than tokens
    assert [o.token_ids for o in outs] == want

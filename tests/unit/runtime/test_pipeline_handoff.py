"""The pieces of the sliced hand-off and of the bubble accounting, without processes or sockets."""

from __future__ import annotations

import pytest
import torch

from trellis.core.plan import SeqStep, StepPlan, StepResult
from trellis.runtime.busy import StageBusy, bubble_fraction
from trellis.runtime.handoff import column_slice, payload_tensor, sliced_handoff_problem
from trellis.wire import pipe
from trellis.wire.plan_codec import decode_plan, encode_plan

PLAN = StepPlan(step_id=7, seqs=(SeqStep(3, 0, (1, 2, 3), 0, (4,), True),))


def test_activations_carry_the_slicing_and_every_stage_time() -> None:
    msg = pipe.Activations(encode_plan(PLAN), "bfloat16", (3, 4096), slices=4, stage_busy_s=(0.25, 0.5))
    back = pipe.decode(pipe.encode(msg))
    assert back == msg and back.payload_shape == (3, 1024)
    assert decode_plan(back.plan) == PLAN  # the bytes the head encoded, parsed by whoever runs them
    whole = pipe.decode(pipe.encode(pipe.Activations(encode_plan(PLAN), "float32", (3, 64))))
    assert whole.slices == 1 and whole.payload_shape == (3, 64) and whole.stage_busy_s == ()


def test_slices_and_results_round_trip() -> None:
    piece = pipe.HiddenSlice(step_id=7, rank=3, dtype="float16", shape=(5, 128))
    assert pipe.decode(pipe.encode(piece)) == piece
    result = pipe.Result(StepResult(7, (3, 4), (11, 12), 1), stage_busy_s=(0.1, 0.2, 0.3))
    assert pipe.decode(pipe.encode(result)) == result


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_column_slices_put_back_together_are_the_hidden_states(rows: int) -> None:
    hidden = torch.randn(rows, 12)
    parts = [column_slice(hidden, r, 4) for r in range(4)]
    assert all(p.shape == (rows, 3) and p.is_contiguous() for p in parts)
    assert torch.equal(torch.cat(parts, dim=-1), hidden)
    if rows:  # a copy, never a view of the runner's buffer (which the next step overwrites)
        parts[0].fill_(0.0)
        assert hidden[:, :3].abs().sum() > 0


def test_a_payload_comes_back_as_the_tensor_sent() -> None:
    part = torch.randn(2, 3)
    assert torch.equal(payload_tensor(part.view(torch.uint8).flatten(), "float32", (2, 3)), part)
    assert payload_tensor(None, "bfloat16", (0, 3)).shape == (0, 3)


def test_only_a_tp_size_that_divides_the_hidden_states_slices_them() -> None:
    assert sliced_handoff_problem(4096, 8) is None and sliced_handoff_problem(65, 1) is None
    assert "hidden_size 65 is not a multiple of the TP size 2" in (sliced_handoff_problem(65, 2) or "")


def test_stage_busy_adds_steps_and_gives_the_bubble() -> None:
    busy = StageBusy(2)
    before = busy.snapshot()
    busy.add((0.5, 0.25))
    busy.add((0.25, 0.25))
    after = busy.snapshot()
    assert after == [0.75, 0.5] and busy.steps == 2 and before == [0.0, 0.0]
    # 1.25 stage-seconds busy out of 2 stages x 1 s: 37.5% idle.
    assert bubble_fraction(before, after, 1.0) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="1 stage times for 2 stages"):
        busy.add((0.1,))
    with pytest.raises(ValueError, match="positive"):
        bubble_fraction(before, after, 0.0)

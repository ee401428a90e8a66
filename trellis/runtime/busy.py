"""How busy each pipeline stage was, as the head learns it, and the pipeline bubble from that.

Every stage times each plan on its compute thread (executor.py) and appends the seconds to the
message it forwards; the last stage's result brings the whole list back to the head, which adds it
up here. Over an interval of `wall` seconds the bubble is the share of stage-time spent idle:
1 - sum(busy seconds of all stages) / (num_stages * wall).
"""

from __future__ import annotations

from collections.abc import Sequence


class StageBusy:
    """Per-stage busy seconds so far (cumulative, monotone): diff two snapshots for an interval."""

    def __init__(self, num_stages: int) -> None:
        self._totals = [0.0] * num_stages
        self.steps = 0

    def add(self, per_stage: Sequence[float]) -> None:
        """One step's busy seconds, stage 0 first; a step must report every stage."""
        if len(per_stage) != len(self._totals):
            raise ValueError(f"a step reported {len(per_stage)} stage times for {len(self._totals)} stages")
        for i, seconds in enumerate(per_stage):
            self._totals[i] += seconds
        self.steps += 1

    def snapshot(self) -> list[float]:
        return list(self._totals)


def bubble_fraction(busy_before: Sequence[float], busy_after: Sequence[float], wall_s: float) -> float:
    """The share of the stages' time that went idle between two snapshots taken `wall_s` apart."""
    if wall_s <= 0:
        raise ValueError(f"the interval must be positive, got {wall_s} s")
    busy = sum(after - before for before, after in zip(busy_before, busy_after, strict=True))
    return 1.0 - busy / (len(busy_after) * wall_s)

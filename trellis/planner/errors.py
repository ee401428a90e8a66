"""The planner's error for bad input: one line that names the problem, never a traceback."""

from __future__ import annotations


class PlanError(ValueError):
    """Bad input to the planner (unknown preset, inconsistent cluster, malformed file)."""

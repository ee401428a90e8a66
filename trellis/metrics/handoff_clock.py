"""Seconds a stage leader spends sending hand-off frames (activations, results) over UCX.

A running total, kept by the one event loop that sends (the stage loop, or the head's), read at
scrape time; the bytes are the links' own counters (trellis.transport.ucx.Link).
"""

from __future__ import annotations


class HandoffClock:
    __slots__ = ("seconds", "sends")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.sends = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.sends += 1

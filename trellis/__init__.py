"""Trellis: serve large language models across many GPUs (TP x PP x DP)."""

__version__ = "0.1.0"

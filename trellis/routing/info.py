"""What the router tells about itself and its replicas (the Info RPC, as plain data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    index: int
    layer_start: int
    layer_end: int  # exclusive
    tp: int
    address: str
    alive: bool  # the replica is up (its stages are judged together)


@dataclass(frozen=True)
class ReplicaInfo:
    name: str
    role: str
    outstanding: int  # this router's requests in flight there
    stages: tuple[StageInfo, ...]


@dataclass(frozen=True)
class RouterInfo:
    model: str
    vocab_size: int
    max_model_len: int
    replicas: tuple[ReplicaInfo, ...]

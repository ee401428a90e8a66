"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before anything
# imports triton (transformers and torch may), so it lives here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.mesh_fixtures import demo_dir, demo_tokenizer, plain_ckpt, serving_mesh, tokenized_ckpt
from tests.redis_server import RedisServer, RedisServerMissing

__all__ = ["demo_dir", "demo_tokenizer", "plain_ckpt", "serving_mesh", "tokenized_ckpt"]  # fixtures


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real redis-server started for this test session (tests isolate by key namespace)."""
    try:
        server = RedisServer()
    except RedisServerMissing as e:
        pytest.skip(str(e))
    with server:
        yield server.url

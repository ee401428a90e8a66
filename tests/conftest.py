"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer, RedisServerMissing


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real redis-server started for this test session (tests isolate by key namespace)."""
    try:
        server = RedisServer()
    except RedisServerMissing as e:
        pytest.skip(str(e))
    with server:
        yield server.url

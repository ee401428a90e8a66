"""A replica of a P/D pair going down: the pair's stream is cancelled while that side still has a
part in it, and left alone once it has none (P after its hand-off, D after P took the request)."""

from __future__ import annotations

import pytest

from tests.unit.routing.pd_fakes import PROMPT, pd_mesh, run
from trellis.core.errors import Overloaded, Unavailable
from trellis.routing.replicas import MISSES_TO_DOWN
from trellis.routing.stage_client import StageChunk


def test_either_replica_going_down_cancels_the_pair_and_names_it() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.d.chunks, t.d.hang = [StageChunk((6,))], True
        agen = t.m.router.generate(PROMPT)
        assert (await anext(agen)).token_ids == (5,)
        assert (await anext(agen)).token_ids == (6,)
        t.d.up = False
        for _ in range(MISSES_TO_DOWN):
            await t.m.replicas.refresh()
        assert t.d.streams[0].cancelled
        with pytest.raises(Unavailable, match="replica d went down: stage 0 is not serving"):
            await anext(agen)
        await t.settled()
        assert t.d.calls("abort")

    run(scenario)


def test_p_going_down_after_the_hand_off_leaves_ds_stream_alone() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.d.chunks, t.d.hang = [StageChunk((6,))], True
        agen = t.m.router.generate(PROMPT)
        assert (await anext(agen)).token_ids == (5,)
        assert (await anext(agen)).token_ids == (6,)  # D streams: P holds nothing of it any more
        t.p.up = False
        for _ in range(MISSES_TO_DOWN):
            await t.m.replicas.refresh()
        try:
            assert not t.d.streams[0].cancelled, "P going down cut the request D was decoding"
        finally:
            await agen.aclose()

    run(scenario)


def test_d_going_down_after_refusing_leaves_the_request_aggregated_on_p_alone() -> None:
    async def scenario() -> None:
        t = await pd_mesh()
        t.d.reserve_error = Overloaded("replica d: no free blocks")  # D holds nothing of it
        t.p.chunks, t.p.hang = [StageChunk((5,)), StageChunk((6,))], True
        agen = t.m.router.generate(PROMPT)
        assert (await anext(agen)).token_ids == (5,)
        assert (await anext(agen)).token_ids == (6,)  # P decodes it, aggregated
        t.d.up = False
        for _ in range(MISSES_TO_DOWN):
            await t.m.replicas.refresh()
        try:
            assert not t.p.streams[0].cancelled, "D going down cut the request P was decoding alone"
        finally:
            await agen.aclose()

    run(scenario)

"""P/D hand-offs under cancels, deadlines, bad chunks and a full decode replica (real processes: a
prefill replica r0 and a decode replica r1 behind the router, on a Redis registry).

Proven here:
- randomized cancels and deadlines, spread over every step of the hand-off (before P's first token,
  between it and D's first, while D streams), never leave anything behind: afterwards both heads
  are idle with every KV block free, D's staging slots are all free once their quarantine ended,
  the registry holds no transfer record past its lease, every service is alive; and every token a
  client got equals transformers' greedy one (a completed stream: all of them), so no token is
  garbage, repeated or lost. TRELLIS_PD_FAULT_CASES cases (default 60; the issue's figure is
  1,000), TRELLIS_PD_FAULT_SEED picks them, TRELLIS_PD_FAULT_SHAPES the replicas' shapes;
- a decode half whose staging slots hold garbage (checksums that do not match) is voided and
  recomputed on D: its tokens are still right, pd_voided counts it, and the bad blocks are never
  named (the same prompt again is right too); one with too few checksums ("short") is recomputed;
- D without room answers RESOURCE_EXHAUSTED at reserve and the router runs the request on P,
  aggregated (right tokens, P's pd_fallbacks, the router's aggregated_fallback outcome);
- an AttachHandoff that reaches P before its Submit is remembered: the request then finishes with
  "handoff" and D's decode half gives the right tokens.
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.checkpoints import make_checkpoint, reference_generate
from tests.integration.pd_cases import (
    HANDOFF_TIMEOUT_S,
    NEW_TOKENS,
    RPC_TIMEOUT_S,
    Prompts,
    Seen,
    assert_idle,
    assert_no_leaks,
    dead_services,
    flushed_db,
    generate,
    head_stub,
    make_pool,
    open_submit,
    pd_mesh,
    read,
    reserve,
    stats,
    submit,
    wrong,
)
from tests.mesh_fixtures import wait_for
from trellis.core.kv_store_api import SlotLayout
from trellis.core.model_config import load_model_config
from trellis.deploy.mesh import Mesh
from trellis.v1 import stage_pb2, stage_pb2_grpc
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(900)

CASES = int(os.environ.get("TRELLIS_PD_FAULT_CASES", "60"))
SEED = int(os.environ.get("TRELLIS_PD_FAULT_SEED", "1"))
CONCURRENCY = 8  # streams in flight at once
SLOTS = 4096  # D's staging slots: aborted reservations quarantine theirs for ~8 s
STREAM_TIMEOUT_S = 60.0  # a stream that is not cut short
# (tp, stages) of P and D: one stage each by default (the cheapest mesh); the others run the same
# cases through multi-stage and TP copies and loads.
SHAPES = {"tp1-tp1": ((1, 1), (1, 1)), "pp2-tp2": ((1, 2), (2, 1)), "tp2pp2-pp2": ((2, 2), (1, 2))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("pdf") / "ckpt", seed=7)


@pytest.fixture(scope="module")
def pool(checkpoint: Path) -> Prompts:
    return make_pool(checkpoint, max(24, CASES // 2), seed=SEED)


@pytest.fixture(scope="module")
def registry(redis_url: str) -> str:
    return flushed_db(redis_url, 7)  # a database no other test uses


@pytest.fixture(scope="module")
def mesh(checkpoint: Path, registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    slab_dir = tmp_path_factory.mktemp("pdf-slab")
    shapes = SHAPES.get(os.environ.get("TRELLIS_PD_FAULT_SHAPES", "tp1-tp1"))
    assert shapes is not None, f"TRELLIS_PD_FAULT_SHAPES: one of {sorted(SHAPES)}"
    with pd_mesh(checkpoint, slab_dir, registry, metrics=True, handoff_slots=SLOTS, shapes=shapes) as m:
        yield m


# ---- randomized cancels and deadlines ------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    prompt: int  # index into the pool
    how: str  # "cancel_after" (tokens), "cancel_at" (s from the start), "deadline" (s), "none"
    at: float


def cases(n: int, rng: random.Random, pool_size: int) -> list[Case]:
    """Cancels after 1 token (P's: D's not there yet) or more, at a time, deadlines, and a few
    streams left alone; times skewed short (a 300-token prompt's first token takes ~50 ms here)."""
    out = []
    for _ in range(n):
        how = rng.choice(("cancel_after", "cancel_at", "deadline", "cancel_at", "deadline", "none"))
        if how == "cancel_after":
            at = float(rng.choice((1, 1, rng.randint(2, NEW_TOKENS - 1))))
        else:
            at = max(0.25 * rng.random() ** 2, 0.002)
        out.append(Case(rng.randrange(pool_size), how, at))
    return out


def run(client: RouterClient, pool: Prompts, case: Case) -> Seen:
    seen = Seen(case.prompt)
    timeout = case.at if case.how == "deadline" else STREAM_TIMEOUT_S
    stream = client.stream(pool.ids[case.prompt], max_tokens=NEW_TOKENS, ignore_eos=True, timeout=timeout)

    def cut() -> None:
        seen.cut_at = len(seen.tokens)
        stream.cancel()

    timer = threading.Timer(case.at if case.how == "cancel_at" else STREAM_TIMEOUT_S, cut)
    if case.how == "cancel_at":
        timer.start()
    try:
        for resp in stream:
            seen.tokens.extend(resp.token_ids)
            seen.finished = seen.finished or bool(resp.finish_reason)
            if case.how == "cancel_after" and len(seen.tokens) >= case.at and not seen.finished:
                cut()
    except grpc.RpcError as e:
        seen.code = e.code()
        if seen.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            seen.cut_at = len(seen.tokens)
    finally:
        timer.cancel()
    return seen


def phase(seen: Seen) -> str:
    """Where the hand-off was when the stream was cut, as the client saw it."""
    if seen.cut_at < 0 or seen.finished:
        return "completed"
    return ("before P's first token", "before D's first token", "while D streams")[min(seen.cut_at, 2)]


def test_random_cancels_and_deadlines_leave_nothing_behind(mesh: Mesh, pool: Prompts, registry: str) -> None:
    plan = cases(CASES, random.Random(SEED), len(pool.ids))
    pids = [svc.proc.pid for svc in mesh.services]
    started = time.monotonic()
    with RouterClient(mesh.router.address) as client, ThreadPoolExecutor(CONCURRENCY) as pool_threads:
        seen = list(pool_threads.map(lambda c: run(client, pool, c), plan))
    took = time.monotonic() - started
    bad = [(i, problem) for i, s in enumerate(seen) if (problem := wrong(s, pool))]
    assert not bad, f"seed {SEED}: {len(bad)} of {CASES} streams wrong, e.g. {bad[:5]}"
    phases = Counter(phase(s) for s in seen)
    print(f"{CASES} cases in {took:.1f} s: {dict(phases)}")
    assert len(phases) == 4, f"not every step of the hand-off was cut: {dict(phases)}"
    assert_no_leaks(mesh, registry, slots=SLOTS)
    assert not dead_services(mesh) and [svc.proc.pid for svc in mesh.services] == pids


# ---- acting as the prefill replica: bad chunks, the early attach ---------------------------------


def fresh_prompt_ids(length: int, seed: int) -> list[int]:
    """A prompt no other test sends."""
    rng = random.Random(1000 + seed)
    return [rng.randrange(1000) for _ in range(length)]


def fresh_prompt(checkpoint: Path, length: int, seed: int) -> Prompts:
    """A fresh prompt with its reference."""
    ids = [fresh_prompt_ids(length, seed)]
    return Prompts(ids, reference_generate(checkpoint, ids, NEW_TOKENS))


def scribble(target: stage_pb2.HandoffTarget, layout: SlotLayout, seed: int) -> list[int]:
    """Random bytes into the target's staging slots; returns each slot's checksum as D sums it (its
    int32 words added as int64, trellis.runtime.kv_copy.slot_sums)."""
    slab = np.memmap(target.slab, dtype=np.uint8, mode="r+")
    rng = np.random.default_rng(seed)
    sums = []
    for s in target.slots:
        piece = slab[s * layout.slot_bytes : (s + 1) * layout.slot_bytes]
        piece[:] = rng.integers(0, 256, layout.slot_bytes, dtype=np.uint8)
        sums.append(int(piece.view(np.int32).astype(np.int64).sum()))
    slab.flush()
    del slab
    return sums


@pytest.fixture(scope="module")
def layout(checkpoint: Path) -> SlotLayout:
    cfg = load_model_config(checkpoint)
    return SlotLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 16, "float32")


def decode_half(transfer_id: str, first_token: int, sums: list[int]) -> stage_pb2.Handoff:
    return stage_pb2.Handoff(transfer_id=transfer_id, epoch=1, first_token=first_token, block_sums=sums)


def test_a_corrupted_chunk_is_voided_and_recomputed(mesh: Mesh, checkpoint: Path, layout: SlotLayout) -> None:
    channel, d = head_stub(mesh, "r1")
    with channel:
        # The garbage matters: trusted (its own checksums), it changes the tokens.
        control, transfer = fresh_prompt(checkpoint, 60, seed=1), uuid.uuid4().hex
        target = reserve(d, transfer, control.ids[0], ttl_s=10)
        sums = scribble(target, layout, seed=1)
        trusted = submit(d, control.ids[0], decode_half(transfer, control.want[0][0], sums))
        assert trusted.tokens != control.want[0][1:], (
            "garbage KV gave the right tokens: the test proves nothing"
        )

        before = stats(mesh, "r1")
        p = fresh_prompt(checkpoint, 75, seed=2)
        transfer = uuid.uuid4().hex
        target = reserve(d, transfer, p.ids[0], ttl_s=10)
        assert target.first_block == 0 and len(target.slots) == 5
        bad = [s + 1 for s in scribble(target, layout, seed=2)]
        got = submit(d, p.ids[0], decode_half(transfer, p.want[0][0], bad))
        assert got.tokens == p.want[0][1:] and got.finish == "length"
        after = stats(mesh, "r1")
        assert after.pd_voided == before.pd_voided + 1
        assert after.pd_blocks_loaded == before.pd_blocks_loaded
        assert_idle(mesh, ("r1",), within=5)
    # The bad blocks were never named: the prompt again, through the router, is computed right.
    assert generate(mesh.router.address, p.ids[0]) == ("r0->r1", p.want[0])


@pytest.mark.parametrize("how", ["short", "late"])
def test_a_decode_half_that_cannot_use_its_reservation_recomputes(
    mesh: Mesh, checkpoint: Path, how: str
) -> None:
    """short: one checksum missing; late: the reservation expired before the decode half came."""
    channel, d = head_stub(mesh, "r1")
    with channel:
        before = stats(mesh, "r1")
        p, transfer = fresh_prompt(checkpoint, 50, seed=3 if how == "short" else 8), uuid.uuid4().hex
        target = reserve(d, transfer, p.ids[0], ttl_s=10 if how == "short" else 0.3)
        sums = [0] * (len(target.slots) - (how == "short"))
        if how == "late":
            wait_for(lambda: stats(mesh, "r1").pd_slots_held == before.pd_slots_held, 5, "it expires")
        got = submit(d, p.ids[0], decode_half(transfer, p.want[0][0], sums))
        assert got.tokens == p.want[0][1:] and got.finish == "length"
        after = stats(mesh, "r1")
        assert after.pd_recomputed == before.pd_recomputed + 1
        assert after.pd_committed == before.pd_committed and after.pd_voided == before.pd_voided
        assert_idle(mesh, ("r1",), within=5)


def attach(stub: stage_pb2_grpc.StageWorkerStub, transfer: str, target: stage_pb2.HandoffTarget) -> bool:
    request = stage_pb2.AttachHandoffRequest(transfer_id=transfer, epoch=1, target=target)
    return stub.AttachHandoff(request, timeout=RPC_TIMEOUT_S).attached


@pytest.mark.parametrize("when", ["before its submit", "after its first token"])
def test_an_attach_in_either_order_hands_off(mesh: Mesh, checkpoint: Path, when: str) -> None:
    """The router's two RPCs to P (submit, attach) have no order: an attach that comes first is
    remembered; one after P's first token (P parked, waiting) gets the copies in a plan of their own."""
    p_channel, prefill = head_stub(mesh, "r0")
    d_channel, d = head_stub(mesh, "r1")
    with p_channel, d_channel:
        before = stats(mesh, "r1")
        seed = 4 if when == "before its submit" else 9
        p, transfer = fresh_prompt(checkpoint, 90, seed), uuid.uuid4().hex
        target = reserve(d, transfer, p.ids[0], ttl_s=10)
        if when == "before its submit":
            assert attach(prefill, transfer, target)
        stream = open_submit(prefill, p.ids[0], stage_pb2.Handoff(transfer_id=transfer, epoch=1))
        if when == "after its first token":
            parked = next(stream)
            assert (list(parked.token_ids), parked.finish_reason) == (p.want[0][:1], "")
            assert attach(prefill, transfer, target)
        first = read(stream)
        if when == "after its first token":
            first.tokens = list(parked.token_ids) + first.tokens
        assert (first.tokens, first.finish) == (p.want[0][:1], "handoff")
        assert len(first.block_sums) == len(target.slots) == 6
        rest = submit(d, p.ids[0], decode_half(transfer, first.tokens[0], first.block_sums))
        assert rest.tokens == p.want[0][1:]
        after = stats(mesh, "r1")
        assert after.pd_committed == before.pd_committed + 1 and after.pd_voided == before.pd_voided
        assert after.pd_blocks_loaded == before.pd_blocks_loaded + 6
        assert_idle(mesh, within=5)


def test_a_prefill_half_cancelled_while_it_waits_for_its_target_frees_it(
    mesh: Mesh, checkpoint: Path
) -> None:
    """Between P's first token and its hand-off finish (no target yet, its blocks held for the
    copies): a cancel frees P at once; D's reservation is freed by its abort."""
    p_channel, prefill = head_stub(mesh, "r0")
    d_channel, d = head_stub(mesh, "r1")
    with p_channel, d_channel:
        p, transfer = fresh_prompt(checkpoint, 120, seed=10), uuid.uuid4().hex
        reserve(d, transfer, p.ids[0], ttl_s=10)
        stream = open_submit(prefill, p.ids[0], stage_pb2.Handoff(transfer_id=transfer, epoch=1))
        assert list(next(stream).token_ids) == p.want[0][:1]
        assert stats(mesh, "r0").running == 1  # parked, never decoded there
        stream.cancel()
        assert_idle(mesh, ("r0",), within=2)
        abort = stage_pb2.AbortHandoffRequest(transfer_id=transfer, epoch=1)
        assert d.AbortHandoff(abort, timeout=RPC_TIMEOUT_S).aborted
        assert_idle(mesh, ("r1",), within=2)


# ---- a decode replica without room ---------------------------------------------------------------


def handoff_outcomes(mesh: Mesh) -> Counter[str]:
    """The router's trellis_router_handoffs_total, by outcome."""
    port = mesh.spec.router.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=RPC_TIMEOUT_S) as r:
        text = r.read().decode()
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "trellis_router_handoffs_total":
                out[sample.labels["outcome"]] += int(sample.value)
    return out


def test_a_full_decode_replica_refuses_and_the_request_runs_on_p(mesh: Mesh, checkpoint: Path) -> None:
    channel, d = head_stub(mesh, "r1")
    with channel:
        assert_idle(mesh, within=HANDOFF_TIMEOUT_S + 1)
        num_blocks = stats(mesh, "r1").num_blocks
        fillers = [uuid.uuid4().hex for _ in range(num_blocks // 32)]
        for i, transfer in enumerate(fillers):  # 511 tokens: 32 blocks each, every block of D
            reserve(d, transfer, fresh_prompt_ids(511, seed=100 + i), ttl_s=10)
        assert stats(mesh, "r1").free_blocks == 0
        with pytest.raises(grpc.RpcError) as refused:
            reserve(d, uuid.uuid4().hex, fresh_prompt_ids(40, seed=99), ttl_s=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        p_before, d_before, outcomes = stats(mesh, "r0"), stats(mesh, "r1"), handoff_outcomes(mesh)
        p = fresh_prompt(checkpoint, 80, seed=5)
        assert generate(mesh.router.address, p.ids[0]) == ("r0->r1", p.want[0])
        assert stats(mesh, "r0").pd_fallbacks == p_before.pd_fallbacks + 1
        assert stats(mesh, "r1").pd_reserved == d_before.pd_reserved
        assert handoff_outcomes(mesh) - outcomes == Counter(aggregated_fallback=1)

        for transfer in fillers:
            abort = stage_pb2.AbortHandoffRequest(transfer_id=transfer, epoch=1)
            assert d.AbortHandoff(abort, timeout=RPC_TIMEOUT_S).aborted
        assert_idle(mesh, within=5)
        again = fresh_prompt(checkpoint, 80, seed=6)
        assert generate(mesh.router.address, again.ids[0]) == ("r0->r1", again.want[0])
        assert stats(mesh, "r1").pd_committed == d_before.pd_committed + 1


def test_a_reservation_needs_a_finite_ttl(mesh: Mesh) -> None:
    channel, d = head_stub(mesh, "r1")
    with channel:
        for ttl in (float("nan"), float("inf"), -1.0, 0.0):
            with pytest.raises(grpc.RpcError) as refused:
                reserve(d, uuid.uuid4().hex, fresh_prompt_ids(40, seed=7), ttl_s=ttl)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ttl
    assert stats(mesh, "r1").pd_slots_held == 0

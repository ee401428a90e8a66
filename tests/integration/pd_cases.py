"""Shared pieces of the P/D fault tests (test_pd_faults.py, test_pd_kills.py): a prefill replica r0
and a decode replica r1 (TP 1, one stage each, unless asked) behind the router on a Redis registry,
prompts with their transformers reference, the checks of what a client got and that nothing is
left behind anywhere (no request, KV block, staging slot or transfer record), and a head's RPCs
called straight, as the router or a prefill replica would."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis

from tests.checkpoints import reference_generate
from tests.integration.engine_cases import small_cpu_env
from tests.mesh_fixtures import head_address, running_mesh, stage_stats, wait_for
from trellis.core.engine_config import EngineConfig
from trellis.core.handoff_api import QUARANTINE_S
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import Mesh, health
from trellis.registry import TransferRecord, open_registry
from trellis.v1 import sampling_pb2, stage_pb2, stage_pb2_grpc
from trellis.wire.router_client import RouterClient

HANDOFF_TIMEOUT_S = 3.0  # the router's handoff_timeout_s: D's reservations and the records' lease
NEW_TOKENS = 12
REPLICAS = ("r0", "r1")  # prefill, decode
RPC_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Prompts:
    """Prompts and the tokens transformers' greedy decoding gives each (NEW_TOKENS of them)."""

    ids: list[list[int]]
    want: list[list[int]]


def make_pool(checkpoint: Path, n: int, seed: int, lengths: tuple[int, int] = (20, 300)) -> Prompts:
    """``n`` prompts of random lengths in ``lengths``; every third starts with another's first
    blocks (D's own prefix match then leaves fewer blocks to send)."""
    rng = random.Random(seed)
    ids: list[list[int]] = []
    for i in range(n):
        length = rng.randint(*lengths)
        if i % 3 == 2 and len(ids[i - 1]) > 32:
            head = ids[i - 1][: rng.randrange(16, len(ids[i - 1]), 16)]
            ids.append(head + [rng.randrange(1000) for _ in range(max(length - len(head), 1))])
        else:
            ids.append([rng.randrange(1000) for _ in range(length)])
    return Prompts(ids, reference_generate(checkpoint, ids, NEW_TOKENS))


def flushed_db(redis_url: str, db: int) -> str:
    """A database of its own on the session's redis-server, emptied (the mesh uses the default
    key namespace)."""
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    return url


@contextmanager
def pd_mesh(
    checkpoint: Path,
    tmp: Path,
    registry: str,
    *,
    metrics: bool = False,
    shapes: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1)),
    **engine: int,
) -> Iterator[Mesh]:
    """r0 (prefill) and r1 (decode), of ``shapes`` ((tp, stages) each), behind the router; every
    request is handed off."""
    cfg = {"num_blocks": 256, "handoff_slots": 512, **engine}
    (p_tp, p_pp), (d_tp, d_pp) = shapes
    spec = local_spec(
        str(checkpoint),
        shapes=((p_tp, p_pp, "prefill"), (d_tp, d_pp, "decode")),
        engine=EngineConfig(**cfg, handoff_dir=str(tmp)),
        router={"max_local_prefill_tokens": 0, "handoff_timeout_s": HANDOFF_TIMEOUT_S},
        registry=registry,
        metrics=metrics,
    )
    with small_cpu_env(), running_mesh(spec) as mesh:
        # The mesh is ready once the router sees a replica serving; on Redis the other one may
        # register a poll later.
        wait_for(lambda: router_sees(mesh.router.address, set(REPLICAS)), 30, "the router on r0 and r1")
        yield mesh


def router_sees(address: str, up: set[str], *, idle: bool = False) -> bool:
    """The router serves and finds exactly the replicas ``up`` healthy (and, ``idle``, counts no
    request of its own in flight on any)."""
    if not health(address):
        return False
    with RouterClient(address) as client:
        try:
            replicas = client.info(timeout=2).replicas
        except grpc.RpcError:
            return False
    busy = idle and any(r.outstanding for r in replicas)
    return {r.name for r in replicas if all(s.alive for s in r.stages)} == up and not busy


def stats(mesh: Mesh, replica: str) -> stage_pb2.StageStats:
    return stage_stats(head_address(mesh, replica))


def transfer_records(registry: str) -> list[TransferRecord]:
    """The transfer records the registry holds now (what the router's Transfers opened)."""

    async def read() -> list[TransferRecord]:
        reg = open_registry(registry, None)
        try:
            return await reg.transfers()
        finally:
            await reg.close()

    return asyncio.run(read())


def assert_idle(mesh: Mesh, replicas: tuple[str, ...] = REPLICAS, *, within: float) -> None:
    """Within ``within`` s: nothing runs or waits on each replica's head, and every KV block is free
    (prefix-cached blocks count as free) and no staging slot is held by a reservation."""

    def idle(replica: str) -> bool:
        s = stats(mesh, replica)
        return (
            s.running == s.waiting == s.in_flight_steps == 0
            and s.free_blocks == s.num_blocks
            and s.pd_slots_held == 0
        )

    for replica in replicas:
        wait_for(lambda r=replica: idle(r), within, f"{replica} idle, every block and staging slot free")


def assert_no_leaks(mesh: Mesh, registry: str, *, slots: int) -> None:
    """After the requests: both heads idle once the last reservation's deadline passed, D's staging
    slots all free once the quarantines ended, no transfer record past its lease."""
    assert_idle(mesh, within=HANDOFF_TIMEOUT_S + 1.0)
    wait_for(lambda: not transfer_records(registry), HANDOFF_TIMEOUT_S + 1.0, "no transfer record left")
    wait_for(
        lambda: stats(mesh, "r1").pd_slots_free == slots,
        HANDOFF_TIMEOUT_S + QUARANTINE_S + 1.0,
        "every staging slot of r1 free again",
    )
    s = stats(mesh, "r1")
    assert s.pd_slots_held == s.pd_slots_quarantined == 0
    assert stats(mesh, "r0").pd_slots_free == 0, "the prefill replica made a hand-off slab"


@dataclass
class Seen:
    """What one client stream through the router got, and how it ended."""

    prompt: int  # index into the Prompts
    tokens: list[int] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.OK
    finished: bool = False
    cut_at: int = -1  # tokens received when the test cut it (a cancel, a deadline; -1: not cut)
    started: float = 0.0  # time.monotonic()
    ended: float = 0.0


ENDS = (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def wrong(seen: Seen, prompts: Prompts, ends: tuple[grpc.StatusCode, ...] = ENDS) -> str:
    """What is wrong with one stream ("" if nothing): an end not in ``ends``, a completed stream
    whose tokens are not the reference, tokens that are not a prefix of it."""
    want = prompts.want[seen.prompt]
    if seen.code not in ends:
        return f"ended with {seen.code}"
    if seen.finished and seen.tokens != want:
        return f"completed with {seen.tokens}, want {want}"
    if seen.tokens != want[: len(seen.tokens)]:
        return f"got {seen.tokens}, not a prefix of {want}"
    if seen.code == grpc.StatusCode.OK and not seen.finished:
        return "ended without a finish"
    return ""


def dead_services(mesh: Mesh) -> list[str]:
    """The services of the mesh that are not running (should be none)."""
    return [svc.name for svc in mesh.services if not svc.alive()]


def generate(address: str, prompt: list[int], timeout: float = 30.0) -> tuple[str, list[int]]:
    """One uncancelled request through the router: (the replica that served it, its tokens)."""
    with RouterClient(address) as client:
        replica, tokens = "", []
        for resp in client.stream(prompt, max_tokens=NEW_TOKENS, ignore_eos=True, timeout=timeout):
            replica = replica or resp.replica
            tokens.extend(resp.token_ids)
    return replica, tokens


# ---- a head over gRPC, as the router (or a prefill replica) would call it ------------------------


def head_stub(mesh: Mesh, replica: str) -> tuple[grpc.Channel, stage_pb2_grpc.StageWorkerStub]:
    channel = grpc.insecure_channel(head_address(mesh, replica))
    return channel, stage_pb2_grpc.StageWorkerStub(channel)


def reserve(
    stub: stage_pb2_grpc.StageWorkerStub, transfer_id: str, prompt: list[int], ttl_s: float
) -> stage_pb2.HandoffTarget:
    request = stage_pb2.ReserveHandoffRequest(
        transfer_id=transfer_id, epoch=1, prompt_ids=prompt, ttl_s=ttl_s
    )
    return stub.ReserveHandoff(request, timeout=RPC_TIMEOUT_S).target


@dataclass
class Submitted:
    """One Submit stream, read to its end."""

    tokens: list[int]
    finish: str
    block_sums: list[int]


def open_submit(
    stub: stage_pb2_grpc.StageWorkerStub, prompt: list[int], handoff: stage_pb2.Handoff | None = None
) -> Iterator[stage_pb2.SubmitResponse]:
    """A request straight to a head (a plain one, or either half of a hand-off): its stream."""
    request = stage_pb2.SubmitRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=prompt,
        sampling=sampling_pb2.SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
        handoff=handoff,
    )
    return stub.Submit(request, timeout=RPC_TIMEOUT_S)


def read(stream: Iterator[stage_pb2.SubmitResponse]) -> Submitted:
    out = Submitted([], "", [])
    for resp in stream:
        out.tokens.extend(resp.token_ids)
        out.finish = resp.finish_reason or out.finish
        out.block_sums.extend(resp.block_sums)
    return out


def submit(
    stub: stage_pb2_grpc.StageWorkerStub, prompt: list[int], handoff: stage_pb2.Handoff | None = None
) -> Submitted:
    """A request straight to a head, read to its end."""
    return read(open_submit(stub, prompt, handoff))

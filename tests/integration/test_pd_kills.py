"""P/D hand-offs when a process dies or freezes: SIGKILL and SIGSTOP of the prefill replica P, the
decode replica D, the router and Redis (the registry), each while clients send requests back to
back through the router, so the signal finds requests at every step of the hand-off.

Proven, for each (signal, victim):
- no stream gets a wrong token: a completed one has transformers' greedy tokens, a cut one a prefix
  of them; a stream in flight at the signal ends on its own, and only as the victim's failure
  allows (UNAVAILABLE; a deadline while a replica or the router is frozen; never an error when
  Redis dies or freezes: the transfer records are a soft dependency), and one that D was already
  decoding when P died or froze goes on to its end;
- while the victim is down the survivors free what it left them (idle heads, every KV block and
  staging slot back) within a few seconds of the deadline (D's reservations: the router's
  handoff_timeout_s; a frozen router's streams: the client's deadline), and serve: a new request
  through the router succeeds with the right tokens (on the other replica alone when one is down);
- afterwards (a killed router or Redis restarted, a frozen one continued) hand-offs run again with
  the right tokens, nothing is left held anywhere, the registry holds no transfer record past its
  lease, and no service died of a peer's failure (only a killed replica is gone).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from tests.checkpoints import make_checkpoint
from tests.integration.pd_cases import (
    HANDOFF_TIMEOUT_S,
    NEW_TOKENS,
    Prompts,
    Seen,
    assert_idle,
    dead_services,
    generate,
    make_pool,
    pd_mesh,
    router_sees,
    transfer_records,
    wrong,
)
from tests.mesh_fixtures import service, wait_for
from tests.redis_server import RedisServer
from trellis.deploy.mesh import Mesh
from trellis.wire.router_client import RouterClient

pytestmark = pytest.mark.timeout(300)

LOAD_TIMEOUT_S = 5.0  # each load stream's deadline (a frozen router's streams end on their own)
WORKERS = 4  # clients sending back to back
# How long the load runs into the signal: new requests meet the failure at every step (the
# registry's calls time out after 1 s: Redis stays down longer).
EXPOSURE_S = 2.0
RECOVER_S = 20.0  # a restarted or continued service serving again
OK, CANCELLED = grpc.StatusCode.OK, grpc.StatusCode.CANCELLED
UNAVAILABLE, DEADLINE = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED
SURVIVOR = {"prefill": "r1", "decode": "r0"}  # the replica serving alone while its peer is down
REPLICA_OF = {"prefill": "r0", "decode": "r1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("pdk") / "ckpt", seed=8)


@pytest.fixture(scope="module")
def pool(checkpoint: Path) -> Prompts:
    return make_pool(checkpoint, 16, seed=3)


class Load:
    """WORKERS clients sending the pool's prompts back to back through the router."""

    def __init__(self, address: str, pool: Prompts) -> None:
        self.address, self.pool = address, pool
        self.seen: list[Seen] = []
        self._current: dict[int, tuple[Seen, grpc.Future]] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(WORKERS)]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        rng = random.Random(k)
        with RouterClient(self.address) as client:
            while not self._stop.is_set():
                seen = Seen(rng.randrange(len(self.pool.ids)), started=time.monotonic())
                prompt = self.pool.ids[seen.prompt]
                stream = client.stream(prompt, max_tokens=NEW_TOKENS, ignore_eos=True, timeout=LOAD_TIMEOUT_S)
                self._current[k] = (seen, stream)
                try:
                    for resp in stream:
                        seen.tokens.extend(resp.token_ids)
                        seen.finished = seen.finished or bool(resp.finish_reason)
                except grpc.RpcError as e:
                    seen.code = e.code()
                seen.ended = time.monotonic()
                self.seen.append(seen)
                if seen.code != OK:
                    self._stop.wait(0.05)  # a dead router refuses at once: do not spin

    def wait_served(self, n: int) -> None:
        wait_for(lambda: sum(s.finished for s in self.seen) >= n, 30, f"{n} load requests served")

    def in_flight(self) -> list[Seen]:
        return [seen for seen, _ in self._current.values() if not seen.ended]

    def stop(self) -> list[Seen]:
        """Stop sending; the streams still open are cancelled (cut_at set). Every stream it had."""
        self._halt()
        assert not any(t.is_alive() for t in self._threads), "a load stream did not end by its deadline"
        return self.seen

    def _halt(self) -> None:
        self._stop.set()
        for seen, stream in list(self._current.values()):
            if not seen.ended:
                seen.cut_at = len(seen.tokens)
                stream.cancel()
        for t in self._threads:
            t.join(LOAD_TIMEOUT_S + 5)

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt()  # a no-op once stopped; else the test failed first: no threads left behind


@contextmanager
def signalled(pid: int, sig: signal.Signals) -> Iterator[None]:
    """Send ``sig``; a SIGSTOP is followed by SIGCONT on the way out, whatever happens."""
    os.kill(pid, sig)
    try:
        yield
    finally:
        if sig == signal.SIGSTOP:
            os.kill(pid, signal.SIGCONT)


def victim_pid(mesh: Mesh, redis_server: RedisServer, victim: str) -> int:
    if victim == "redis":
        return redis_server.pid
    proc = service(mesh, f"{REPLICA_OF[victim]}/stage-0" if victim in REPLICA_OF else victim).proc
    assert proc is not None
    return proc.pid


def ends(sig: signal.Signals, victim: str) -> tuple[grpc.StatusCode, ...]:
    """How a load stream may end: a dead replica or router is UNAVAILABLE (a request with no token
    yet runs on the other replica), a frozen one also the client's deadline (before the router
    tells it is down); Redis dying or freezing ends none (the records are a soft dependency)."""
    if victim == "redis":
        return (OK,)
    return (OK, UNAVAILABLE, DEADLINE) if sig == signal.SIGSTOP else (OK, UNAVAILABLE)


def run_into(load: Load, at_signal: list[Seen], sig: signal.Signals, victim: str, pool: Prompts) -> None:
    """Let the load meet the signal (``at_signal``: its streams in flight then), then check every
    stream it had."""
    assert at_signal, "no request was in flight at the signal"
    time.sleep(EXPOSURE_S)  # an exposure, not a wait: new requests meet the failure meanwhile
    wait_for(lambda: all(s.ended for s in at_signal), LOAD_TIMEOUT_S + 1, "the streams cut by the signal end")
    seen = load.stop()  # what it cancels may end CANCELLED too
    allowed = ends(sig, victim)
    bad = [p for s in seen if (p := wrong(s, pool, allowed + ((CANCELLED,) if s.cut_at >= 0 else ())))]
    assert not bad, f"{len(bad)} of {len(seen)} streams wrong, e.g. {bad[:3]}"
    assert all(s.cut_at < 0 for s in at_signal), "a stream in flight at the signal did not end on its own"
    if victim == "prefill":  # a stream past P's token is D's alone: P's failure cannot cut it
        cut = [s for s in seen if len(s.tokens) > 1 and s.cut_at < 0 and s.code != OK]
        assert not cut, f"{len(cut)} streams D was decoding were cut by P's failure: {cut[:3]}"


def survive(mesh: Mesh, pool: Prompts, victim: str) -> None:
    """While the victim is down: the survivors are idle (what it left them is freed) and serve."""
    if victim in SURVIVOR:
        alone = SURVIVOR[victim]
        assert_idle(mesh, (alone,), within=HANDOFF_TIMEOUT_S + 3)
        wait_for(lambda: router_sees(mesh.router.address, {alone}), RECOVER_S, f"the router on {alone} alone")
        assert generate(mesh.router.address, pool.ids[0]) == (alone, pool.want[0])
    elif victim == "router":
        assert_idle(mesh, within=LOAD_TIMEOUT_S + 3)
    else:  # Redis: the hand-offs go on without their records
        assert generate(mesh.router.address, pool.ids[1]) == ("r0->r1", pool.want[1])


def recover(mesh: Mesh, redis_server: RedisServer, victim: str, sig: signal.Signals) -> set[str]:
    """A killed router or Redis started again; returns the replicas serving from now on (a killed
    replica stays dead: its peer serves alone)."""
    if sig == signal.SIGKILL and victim == "router":
        mesh.router.proc.wait(timeout=10)
        mesh.start_service(mesh.router)
    elif sig == signal.SIGKILL and victim == "redis":
        redis_server.restart()  # empty: the stages register again, the router finds them
    if sig == signal.SIGKILL and victim in REPLICA_OF:
        return {SURVIVOR[victim]}
    return {"r0", "r1"}


def served_by(router: str, pool: Prompts, replica: str) -> bool:
    """A request through the router was served by ``replica`` (P->D for a pair); its tokens are
    right whoever served it. False too when the router has no replica for it just now."""
    try:
        got, tokens = generate(router, pool.ids[2])
    except grpc.RpcError as e:
        if e.code() != UNAVAILABLE:
            raise
        return False
    assert tokens == pool.want[2], f"{got} gave {tokens}, want {pool.want[2]}"
    return got == replica


def serves_again(mesh: Mesh, registry: str, pool: Prompts, up: set[str]) -> None:
    """The replicas ``up`` serve through the router (hand-offs when both are), and afterwards
    nothing is held anywhere: not on their heads, not in the router, not in the registry."""
    router = mesh.router.address
    wait_for(lambda: router_sees(router, up), RECOVER_S, f"the router on {sorted(up)}")
    pair = "r0->r1" if len(up) == 2 else next(iter(up))
    # Not one try: a registry back from a freeze or a restart may drop a lease or two first (the
    # stages claim them again within a beat), and the router a replica until it sees it back.
    wait_for(lambda: served_by(router, pool, pair), RECOVER_S, f"a request served by {pair}")
    assert_idle(mesh, tuple(sorted(up)), within=HANDOFF_TIMEOUT_S + 3)
    wait_for(lambda: router_sees(router, up, idle=True), 5, "the router counts nothing in flight")
    wait_for(lambda: not transfer_records(registry), HANDOFF_TIMEOUT_S + 1, "no transfer record left")


def check_services(mesh: Mesh, pids: dict[str, int], sig: signal.Signals, victim: str) -> None:
    """No service died of a peer's failure: only a killed replica is gone, only a killed router was
    restarted, every other process is the one the mesh started."""
    killed = {f"{REPLICA_OF[victim]}/stage-0"} if sig == signal.SIGKILL and victim in REPLICA_OF else set()
    assert set(dead_services(mesh)) == killed, "a service died of its peer's failure"
    restarted = {"router"} if (sig, victim) == (signal.SIGKILL, "router") else set()
    assert {name for name, pid in pids.items() if service(mesh, name).proc.pid != pid} == restarted


@pytest.mark.parametrize("victim", ["prefill", "decode", "router", "redis"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
def test_a_peer_killed_or_frozen_mid_handoff(
    sig: signal.Signals, victim: str, checkpoint: Path, pool: Prompts, tmp_path: Path
) -> None:
    with RedisServer() as redis_server, pd_mesh(checkpoint, tmp_path, redis_server.url) as mesh:
        pids = {svc.name: svc.proc.pid for svc in mesh.services if svc.proc is not None}
        with Load(mesh.router.address, pool) as load:
            load.wait_served(2 * WORKERS)
            at_signal = load.in_flight()
            with signalled(victim_pid(mesh, redis_server, victim), sig):
                run_into(load, at_signal, sig, victim, pool)
                survive(mesh, pool, victim)
        serves_again(mesh, redis_server.url, pool, recover(mesh, redis_server, victim, sig))
        check_services(mesh, pids, sig, victim)

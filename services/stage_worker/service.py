"""One stage of one replica as a service: its TP ranks, its place in the UCX ring, its life cycle.

Start-up: spawn the TP peers and load the shard; listen for the predecessor on UCX; serve gRPC
(health NOT_SERVING); connect to the successor; the head sends Hello round the ring and, once
it returns, every stage is up: health turns SERVING and the member registers (Redis).
If the ring breaks (a stage died), the head fails its requests with UNAVAILABLE and every
stage of the replica exits non-zero, for its supervisor to restart the replica.

Drain (SIGTERM / SIGINT, or the Drain RPC): health turns NOT_SERVING at once (the router sends
no new work, but keeps the streams: see trellis/routing/replicas.py), the head refuses new
requests (UNAVAILABLE "replica X is draining") and the gRPC server keeps streaming the admitted
ones until they finish, at most engine.drain_grace_s. Then, on a signal, the head stops the ring
and the stage exits 0. A replica drained by the Drain RPC does not exit: it stays drained (no new
requests) until it is restarted.

This is the domain side: it knows no protobuf. The servicer (servicer.py) converts requests and
StageStats to and from the wire; __main__.py builds the server and hands it to `run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import uuid
from collections.abc import Sequence
from typing import Protocol

from trellis.core import log
from trellis.core.kv_names import fingerprint_of
from trellis.core.kv_store_api import SlotLayout
from trellis.core.model_config import ModelConfig
from trellis.core.request import RequestLimits
from trellis.core.spec import DeploySpec
from trellis.core.stage_api import StageStats
from trellis.metrics.handoff_clock import HandoffClock
from trellis.registry import Member, Registry, RegistryError, ReplicaLoad, open_registry
from trellis.registry.block_publisher import BlockPublisher
from trellis.registry.locations import replica_location
from trellis.runtime.bootstrap import launch_from_spec, link_ring, start_head
from trellis.runtime.executor import StageExecutor
from trellis.runtime.handoff_side import HandoffSide, default_slots
from trellis.runtime.head import Head
from trellis.runtime.kv_setup import StoreUse, attach_store
from trellis.runtime.stage_loop import serve_stage
from trellis.scheduling.block_manager import BlockEvent, BlockEventKind
from trellis.transport.ucx import Link, LinkClosed, Listener

RING_STOP_TIMEOUT_S = 30.0  # after the drain: how long the ring's Stop may take to come round
SERVER_GRACE_S = 2.0  # for the last responses of finished requests to leave


class Server(Protocol):
    """What the life cycle needs of its gRPC server (trellis.wire.server.WireServer)."""

    async def start(self) -> None: ...
    async def set_serving(self, serving: bool) -> None: ...
    async def stop(self, grace: float | None) -> None: ...


class StageService:
    def __init__(self, spec: DeploySpec, replica: int, stage: int, cfg: ModelConfig) -> None:
        """`cfg`: the model's config, as DeploySpec.check_model read it."""
        self.spec = spec
        self.replica_spec = spec.replicas[replica]
        self.stage_spec = self.replica_spec.stages[stage]
        self.launch = launch_from_spec(spec, cfg, replica, stage)
        self.limits = RequestLimits(vocab_size=cfg.vocab_size, max_model_len=self.launch.max_model_len)
        self.fingerprint = fingerprint_of(cfg, spec.model.name, spec.model.dtype, spec.engine.block_size)
        self._canary = self.fingerprint.canary()  # the router compares it with its own (kv-aware)
        self.executor = StageExecutor(self.launch)
        self.head: Head | None = None  # on stage 0, once the ring is up
        self.handoff: HandoffSide | None = None  # the head's P/D side, with the head
        self.ready = False
        self.draining = False
        self._registry: Registry | None = None  # once registered (not with the embedded registry)
        self._publisher: BlockPublisher | None = None  # the head's blocks in the global index
        self.instance_id = uuid.uuid4().hex  # one per process start: a restart inherits nothing
        self._server: Server | None = None  # once run() started it
        self._stopped = asyncio.Event()
        self._links: list[Link] = []
        self._handoff = HandoffClock()  # a later stage's sends (the head keeps its own)
        self._log = log.get()

    # ---- facts for the servicer --------------------------------------------------------------
    @property
    def is_head(self) -> bool:
        return self.launch.stage == 0

    def cached_run(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the head's KV cache holds now (0 off the head)."""
        head = self.head
        return 0 if head is None else head.scheduler.block_manager.cached_run(hashes)

    def stats(self) -> StageStats:
        head = self.head
        base = StageStats(
            replica=self.launch.replica,
            stage=self.launch.stage,
            ready=self.ready,
            draining=self.draining,
            handoff_bytes_sent=sum(link.payload_bytes_sent for link in self._links),
            handoff_bytes_received=sum(link.payload_bytes_received for link in self._links),
            handoff_seconds=(self._handoff if head is None else head.handoff).seconds,
            kv_canary=self._canary,
        )
        if head is None:
            return base
        st = head.scheduler.stats()
        return dataclasses.replace(
            base,
            num_blocks=head.scheduler.config.num_blocks,
            free_blocks=st.get("free_blocks", 0),
            running=st.get("running", 0),
            waiting=st.get("waiting", 0),
            in_flight_steps=head.scheduler.num_in_flight(),
            steps=head.steps,
            generated_tokens=head.generated_tokens,
            stage_busy_s=tuple(head.stage_busy.snapshot()),
            prefix_query_tokens=st.get("prefix_query_tokens", 0),
            prefix_hit_tokens=st.get("prefix_hit_tokens", 0),
            store_loaded_blocks=st.get("store_loaded_blocks", 0),
            store_voided_loads=st.get("store_voided_loads", 0),
            store_committed_blocks=0 if head.kv_agent is None else head.kv_agent.stats.committed_blocks,
            store_errors=0 if head.kv_agent is None else head.kv_agent.stats.errors,
            preemptions=st.get("preemptions", 0),
            **self.handoff_stats(),
        )

    def handoff_stats(self) -> dict[str, int]:
        """StageStats' pd_* fields: the head's hand-off counters and its scheduler's."""
        if self.head is None or self.handoff is None:
            return {}
        side, book = self.handoff.stats, self.head.scheduler.handoffs
        slots = book.staging.counts() if book.staging is not None else {}
        return {
            "pd_prefills": side.sent,
            "pd_fallbacks": book.fallbacks,
            "pd_blocks_sent": book.blocks_sent,
            "pd_reserved": side.reserved,
            "pd_committed": side.committed,
            "pd_recomputed": side.recomputed,
            "pd_voided": book.voided,
            "pd_blocks_loaded": book.blocks_loaded,
            "pd_slots_free": slots.get("free", 0),
            "pd_slots_held": slots.get("held", 0),
            "pd_slots_quarantined": slots.get("quarantined", 0),
        }

    async def drain(self, timeout: float) -> bool:
        """Take no new requests from now on (for good: until restarted), health NOT_SERVING; wait
        (up to timeout) until the admitted ones are done. True if none is left."""
        if not self.draining:
            self._log.info("stage draining", in_flight=self.head.num_requests if self.head else 0)
        self.draining = True  # first, before any await: Submit refuses from here on
        if self._server is not None:
            await self._server.set_serving(False)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.head is not None and self.head.busy and loop.time() < end:
            await asyncio.sleep(0.05)
        return self.head is None or not self.head.busy

    # ---- life cycle ----------------------------------------------------------------------------
    async def run(self, server: Server) -> int:
        """Serve until SIGTERM / SIGINT or the ring stops; the exit code (0: stopped cleanly)."""
        st, launch = self.stage_spec, self.launch
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, self._stopped.set)
        self._server = server
        await server.start()  # health NOT_SERVING until the ring is up
        self._log.info("stage loading", layers=list(launch.layers), port=st.port)
        await self.executor.start()
        listener = Listener(st.ucx_port, self.executor.ctx.device)
        code = 0
        try:
            outbound, inbound = await link_ring(self.executor, listener)
            self._links = [link for link in (outbound, inbound) if link is not None]
            work = asyncio.create_task(self._serve(inbound, outbound))
            await self._wait_ready(work)
            if not self.draining:  # a Drain RPC during start-up holds
                await server.set_serving(True)
            await self._register()
            self._log.info("stage serving", replica=launch.replica, stage=launch.stage)
            stop = asyncio.create_task(self._stopped.wait())
            done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                await server.set_serving(False)
                code = 0 if work.result() else 1
            else:  # the drain turns health NOT_SERVING (not a stopped server: admitted streams go on)
                code = await self._shutdown(work)
            if self._publisher is not None:
                await self._publisher.close()
            if self._registry is not None:
                await self._registry.close()
        finally:
            await server.stop(grace=SERVER_GRACE_S)
            await self.executor.stop()
            for link in self._links:
                await link.close()
            listener.close()
        self._log.info("stage exits", code=code)
        return code

    async def _serve(self, inbound: Link | None, outbound: Link | None) -> bool:
        """Run this stage until the ring stops (True) or fails (False)."""
        if not self.is_head:
            assert inbound is not None and outbound is not None  # a later stage is never alone
            self.ready = True
            try:
                end = await serve_stage(self.executor, inbound, outbound, self._handoff)
            except LinkClosed as e:  # a neighbour died (e.g. kill -9): this replica is broken
                self._log.error("ring broken", error=str(e))
                return False
            return end.stopped
        head = self.head = await start_head(self.executor, outbound, inbound, fingerprint=self.fingerprint)
        self.handoff = self._handoff_side(head)
        if self.spec.kv_store is not None:
            await attach_store(head, self.fingerprint, StoreUse.from_spec(self.spec.kv_store))
        self.ready = True
        reporter = asyncio.create_task(self._report_load())
        try:
            await head.run()
        finally:
            reporter.cancel()
            self.handoff.close()
            if head.kv_agent is not None:
                await head.kv_agent.close()
        if head.failed is not None:
            await asyncio.sleep(1.0)  # let the UNAVAILABLE statuses reach the router
            return False
        return True

    def _handoff_side(self, head: Head) -> HandoffSide:
        """The head's P/D side; a decode replica makes its hand-off slab now (others on first use)."""
        cfg, engine = self.executor.ctx.cfg, self.spec.engine
        layout = SlotLayout(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            engine.block_size,
            self.spec.model.dtype,
        )
        side = HandoffSide(
            head,
            self.fingerprint,
            layout,
            replica=self.launch.replica,
            num_slots=default_slots(self.launch.max_model_len, engine.block_size, engine.handoff_slots),
            shm_dir=engine.handoff_dir,
        )
        if self.replica_spec.role == "decode":
            side.ensure_slab()
        return side

    async def _wait_ready(self, work: asyncio.Task) -> None:
        while not self.ready:
            if work.done():
                work.result()  # raises what broke the start
                raise RuntimeError("the stage stopped while starting")
            await asyncio.sleep(0.02)

    async def _register(self) -> None:
        if self.spec.registry == "embedded":
            return
        registry = open_registry(self.spec.registry, self.spec)
        st, launch = self.stage_spec, self.launch
        self._registry = registry
        await registry.register(
            Member(
                replica=launch.replica,
                stage=launch.stage,
                num_stages=launch.num_stages,
                grpc_address=f"{st.host}:{st.port}",
                ucx_address=f"{st.host}:{st.ucx_port}",
                layers=launch.layers,
                tp=launch.tp,
                role=self.replica_spec.role,
                instance_id=self.instance_id,
            ),
            launch.engine.lease_ttl_s,
        )
        if self.head is not None:
            self._publish_blocks(registry, self.head)

    def _publish_blocks(self, registry: Registry, head: Head) -> None:
        """The head's prefix cache in the global block index, at most ~50 ms behind, under
        "{replica}@{instance}" (the router's KV-aware policy reads it)."""
        publisher = self._publisher = BlockPublisher(
            registry, replica_location(self.launch.replica, self.instance_id)
        )

        def on_event(event: BlockEvent) -> None:
            if event.kind is BlockEventKind.REGISTERED:
                publisher.added(event.hashes)
            elif event.kind is BlockEventKind.EVICTED:
                publisher.removed(event.hashes)

        bm = head.scheduler.block_manager
        bm.add_listener(on_event)
        publisher.start()

    async def _report_load(self) -> None:
        """Every engine.load_report_s, the replica's load to the registry (the router balances by
        it). A failed report is logged when the failures start and when they end, then retried."""
        if self.spec.registry == "embedded":
            return
        failing = False
        while True:
            await asyncio.sleep(self.launch.engine.load_report_s)
            registry, head = self._registry, self.head
            if registry is None or head is None:
                continue
            s = self.stats()
            load = ReplicaLoad(
                replica=self.launch.replica,
                outstanding=head.num_requests,
                running=s.running,
                waiting=s.waiting,
                free_blocks=s.free_blocks,
            )
            try:
                await registry.report_load(load)
            except RegistryError as e:
                if not failing:
                    self._log.warning("cannot report the replica's load", error=str(e))
                failing = True
                continue
            if failing:
                self._log.info("reporting the replica's load again")
            failing = False

    async def _shutdown(self, work: asyncio.Task) -> int:
        """SIGTERM: the head drains (engine.drain_grace_s) and stops the ring; other stages refuse
        nothing (they take no requests) and wait for the ring's Stop. 0 once the ring stopped."""
        head = self.head
        if head is None and self._server is not None:  # no new work for this replica from here on
            await self._server.set_serving(False)
        if head is not None:
            grace = self.launch.engine.drain_grace_s
            if not await self.drain(timeout=grace):
                self._log.warning(
                    "drain grace expired, cutting the rest", grace_s=grace, left=head.num_requests
                )
            await head.stop()
        try:
            await asyncio.wait_for(work, RING_STOP_TIMEOUT_S)
        except TimeoutError:
            work.cancel()
            return 1
        return 0

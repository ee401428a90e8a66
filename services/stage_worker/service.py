"""One stage of one replica as a service: its TP ranks, its place in the UCX ring, its gRPC API.

Start-up: spawn the TP peers and load the shard; listen for the predecessor on UCX; serve gRPC
(health NOT_SERVING); connect to the successor; the head sends Hello round the ring and, once
it returns, every stage is up: health turns SERVING and the member registers (Redis).
If the ring breaks (a stage died), the head fails its requests with UNAVAILABLE and every
stage of the replica exits non-zero, for its supervisor to restart the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from services.stage_worker.servicer import StageWorkerServicer
from trellis.core import log
from trellis.core.handoff_rules import rank_ucx_ports
from trellis.core.layout import default_num_blocks
from trellis.core.spec import DeploySpec, SpecError
from trellis.registry import Member, ReplicaLoad, open_registry
from trellis.runtime.executor import StageExecutor
from trellis.runtime.head import Head, ring_handshake
from trellis.runtime.launch import StageLaunch
from trellis.runtime.rank import model_config
from trellis.runtime.stage_loop import serve_stage
from trellis.runtime.stage_proc import LINK_TIMEOUT_S
from trellis.scheduling.scheduler import Scheduler, SchedulerConfig
from trellis.transport.ucx import Link, LinkClosed, Listener, connect
from trellis.v1 import stage_pb2, stage_pb2_grpc

LEASE_TTL_S = 3.0
LOAD_REPORT_S = 0.5


def launch_from_spec(spec: DeploySpec, replica: int, stage: int) -> StageLaunch:
    rep = spec.replicas[replica]
    st = rep.stages[stage]
    nxt = rep.stages[(stage + 1) % len(rep.stages)]
    where = f"replicas[{replica}].stages[{stage}]"
    for name in ("port", "ucx_port"):
        if getattr(st, name) == 0:
            raise SpecError(f"{where}.{name}: a mesh stage needs an explicit port")
    if st.tp > 1 and st.dist_port == 0:
        raise SpecError(f"{where}.dist_port: a stage with tp > 1 needs a rendezvous port")
    m = spec.model
    probe = StageLaunch(
        m.path,
        m.preset,
        m.load_format,
        m.dtype,
        st.layers,
        stage,
        len(rep.stages),
        st.tp,
        st.device,
        st.gpus,
        st.host,
        st.dist_port,
        spec.engine.block_size,
        1,
    )
    cfg = model_config(probe)
    spec.check_layers(cfg.num_hidden_layers)
    max_len = m.max_model_len or cfg.max_position_embeddings
    num_blocks = spec.engine.num_blocks or (
        0
        if st.device == "cuda"
        else default_num_blocks(
            cfg,
            block_size=spec.engine.block_size,
            max_model_len=max_len,
            max_num_seqs=spec.engine.max_num_seqs,
        )
    )
    return StageLaunch(
        model_path=m.path,
        preset=m.preset,
        load_format=m.load_format,
        dtype=m.dtype,
        layers=st.layers,
        stage=stage,
        num_stages=len(rep.stages),
        tp=st.tp,
        device=st.device,
        gpus=st.gpus,
        dist_host=st.host,
        dist_port=st.dist_port,
        block_size=spec.engine.block_size,
        num_blocks=num_blocks,
        replica=rep.name,
        cuda_graphs=spec.engine.cuda_graphs and st.device == "cuda",
        max_model_len=max_len,
        max_num_seqs=spec.engine.max_num_seqs,
        gpu_memory_utilization=spec.engine.gpu_memory_utilization,
        ucx_ports=rank_ucx_ports(st.ucx_port, st.tp, len(rep.stages)),
        next_host=nxt.host,
        next_ucx_ports=rank_ucx_ports(nxt.ucx_port, nxt.tp, len(rep.stages)),
    )


class StageService:
    def __init__(self, spec: DeploySpec, replica: int, stage: int) -> None:
        self.spec = spec
        self.replica_spec = spec.replicas[replica]
        self.stage_spec = self.replica_spec.stages[stage]
        self.launch = launch_from_spec(spec, replica, stage)
        self.executor = StageExecutor(self.launch)
        self.head: Head | None = None
        self.ready = False
        self.draining = False
        self._stopped = asyncio.Event()
        self._links: list[Link] = []
        self._log = log.get()

    # ---- facts for the servicer --------------------------------------------------------------
    @property
    def cfg(self):
        return self.executor.ctx.cfg

    @property
    def max_model_len(self) -> int:
        return self.spec.model.max_model_len or self.cfg.max_position_embeddings

    @property
    def default_max_tokens(self) -> int:
        return 16

    def request_problem(self, req: stage_pb2.SubmitRequest) -> str | None:
        n = len(req.prompt_ids)
        if n == 0:
            return "prompt_ids is empty"
        if n >= self.max_model_len:
            return f"prompt has {n} tokens; the context is {self.max_model_len}"
        vocab = self.cfg.vocab_size
        bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            return f"prompt_ids: token id {bad} is outside the vocabulary [0, {vocab})"
        return None

    def stats(self) -> stage_pb2.StageStats:
        s = stage_pb2.StageStats(
            replica=self.launch.replica, stage=self.launch.stage, draining=self.draining, ready=self.ready
        )
        if self.head is not None:
            s.num_blocks = self.head.scheduler.config.num_blocks
            st = self.head.scheduler.stats()
            s.free_blocks = st.get("free_blocks", 0)
            s.running = st.get("running", 0)
            s.waiting = st.get("waiting", 0)
            s.in_flight_steps = self.head.scheduler.num_in_flight()
            s.steps = self.head.steps
            s.generated_tokens = self.head.generated_tokens
            s.stage_busy_s.extend(self.head.stage_busy.snapshot())
        return s

    async def drain(self, timeout: float) -> bool:
        """Take no new requests; wait (up to timeout) until the ones in flight are done."""
        self.draining = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.head is not None and self.head.busy and loop.time() < end:
            await asyncio.sleep(0.05)
        return self.head is None or not self.head.busy

    # ---- life cycle ----------------------------------------------------------------------------
    async def run(self) -> int:
        st, launch = self.stage_spec, self.launch
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, self._stopped.set)
        health = health_aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.aio.server()
        stage_pb2_grpc.add_StageWorkerServicer_to_server(StageWorkerServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_insecure_port(f"{st.host}:{st.port}")
        await server.start()
        self._log.info("stage loading", layers=list(launch.layers), port=st.port)
        await self.executor.start()
        listener = Listener(st.ucx_port, self.executor.ctx.device)
        nxt = self.replica_spec.stages[(launch.stage + 1) % launch.num_stages]
        code = 0
        try:
            if launch.num_stages > 1:
                outbound = await connect(
                    nxt.host, nxt.ucx_port, self.executor.ctx.device, timeout=LINK_TIMEOUT_S
                )
                inbound = await listener.accept(timeout=LINK_TIMEOUT_S)
                self._links = [outbound, inbound]
                await self.executor.peers_linked()
            else:
                outbound = inbound = None
            work = asyncio.create_task(self._serve(inbound, outbound))
            await self._wait_ready(work)
            await health.set("", health_pb2.HealthCheckResponse.SERVING)
            registry = await self._register()
            self._log.info("stage serving", replica=launch.replica, stage=launch.stage)
            stop = asyncio.create_task(self._stopped.wait())
            done, _ = await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
            await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            if work in done:
                code = 0 if work.result() else 1
            else:
                code = await self._shutdown(work)
            if registry is not None:
                await registry.close()
        finally:
            await server.stop(grace=2.0)
            await self.executor.stop()
            for link in self._links:
                await link.close()
            listener.close()
        self._log.info("stage exits", code=code)
        return code

    async def _serve(self, inbound: Link | None, outbound: Link | None) -> bool:
        """Run this stage until the ring stops (True) or fails (False)."""
        launch = self.launch
        if launch.stage != 0:
            self.ready = True
            try:
                end = await serve_stage(self.executor, inbound, outbound)
            except LinkClosed as e:  # a neighbour died (e.g. kill -9): this replica is broken
                self._log.error("ring broken", error=str(e))
                return False
            return end.stopped
        e = self.spec.engine
        num_blocks = await ring_handshake(self.executor, outbound, inbound, LINK_TIMEOUT_S)
        sched = Scheduler(
            SchedulerConfig(
                num_blocks=num_blocks,
                block_size=launch.block_size,
                max_num_seqs=e.max_num_seqs,
                max_num_batched_tokens=e.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                eos_token_ids=self.cfg.eos_token_ids,
                max_in_flight=launch.num_stages,
                max_decode_burst=e.decode_burst,
            )
        )
        self.head = Head(
            self.executor, sched, num_stages=launch.num_stages, outbound=outbound, inbound=inbound
        )
        self.ready = True
        reporter = asyncio.create_task(self._report_load())
        try:
            await self.head.run()
        finally:
            reporter.cancel()
        if self.head.failed is not None:
            await asyncio.sleep(1.0)  # let the UNAVAILABLE statuses reach the router
            return False
        return True

    async def _wait_ready(self, work: asyncio.Task) -> None:
        while not self.ready:
            if work.done():
                work.result()  # raises what broke the start
                raise RuntimeError("the stage stopped while starting")
            await asyncio.sleep(0.02)

    async def _register(self):
        if self.spec.registry == "embedded":
            return None
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
            ),
            LEASE_TTL_S,
        )
        return registry

    async def _report_load(self) -> None:
        while self.spec.registry != "embedded":
            await asyncio.sleep(LOAD_REPORT_S)
            registry = getattr(self, "_registry", None)
            if registry is None or self.head is None:
                continue
            s = self.stats()
            with contextlib.suppress(Exception):
                await registry.report_load(
                    ReplicaLoad(
                        replica=self.launch.replica,
                        outstanding=self.head.num_requests,
                        running=s.running,
                        waiting=s.waiting,
                        free_blocks=s.free_blocks,
                    )
                )

    async def _shutdown(self, work: asyncio.Task) -> int:
        """SIGTERM: the head drains and stops the ring; other stages wait for the ring's Stop."""
        if self.head is not None:
            await self.drain(timeout=30.0)
            await self.head.stop()
        try:
            await asyncio.wait_for(work, 30.0)
        except TimeoutError:
            work.cancel()
            return 1
        return 0

"""Run every service of a deploy spec on this host: spawn, wait until SERVING, stop them all.

Used by `trellis up`, `trellis demo` and the integration tests. Children get SIGKILL if this
process dies (Linux parent-death signal), so none outlives it.

The KV store (a spec with `kv_store:`) starts first and stops last, and is the one service the
mesh serves without: the stage workers recompute what it would have given them. Its death is a
warning and a restart after a backoff (`tend`), never the end of the mesh.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core.processes import spawn_module
from trellis.core.spec import DeploySpec
from trellis.deploy.processes import has_entry_point, processes_for

log = logging.getLogger("trellis.mesh")

KV_STORE_READY_S = 30.0  # the stage workers start after the store serves, or after this anyway
KV_RESTART_BACKOFF_S = (1.0, 60.0)  # first delay, doubling up to the last
KV_STABLE_S = 60.0  # up this long after a restart: the next death starts the backoff over
KV_CONFIG_EXIT = 2  # the store's "cannot be, as configured" (one line on its stderr): not restarted


@dataclass
class Service:
    name: str  # "router", "REPLICA/stage-S" or "kv-store"
    address: str  # host:port of its gRPC server
    module: str  # run as `python -m module args`
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # what the spec implies; the mesh's env wins
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class MeshError(RuntimeError):
    pass


class MeshInterrupted(MeshError):
    """Start-up was stopped on purpose (Ctrl-C / SIGTERM): stop the mesh, exit without an error."""


class Mesh:
    def __init__(
        self,
        spec: DeploySpec,
        *,
        spec_path: str | Path | None = None,
        registry: str | None = None,
        env: dict[str, str] | None = None,
        log_dir: str | Path | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.warn = warn or log.warning  # the KV store's troubles (the mesh serves on)
        self.log_dir = Path(log_dir) if log_dir is not None else None  # else children share our stderr
        if spec_path is None:
            fd, name = tempfile.mkstemp(prefix="trellis-spec-", suffix=".yaml")
            os.close(fd)
            spec.dump(name)
            spec_path, self._tmp = name, name
        else:
            self._tmp = None
        self.spec_path = str(spec_path)
        self.env = {**os.environ, **(env or {})}  # over each process's own env (processes.py)
        # The one description of the processes, which the deploy generators render too.
        self.processes = processes_for(spec, self.spec_path, registry)
        built = [
            (p.kind, Service(p.name, p.health.address, p.module, list(p.args), env=p.environment))
            for p in self.processes
        ]
        self.router = next(svc for kind, svc in built if kind == "router")
        self.stages: list[Service] = [svc for kind, svc in built if kind == "stage"]
        self.kv_store: Service | None = next((svc for kind, svc in built if kind == "kv_store"), None)
        if self.kv_store is not None and not has_entry_point(self.kv_store.module):
            self.warn(
                f"the spec has a kv_store, but {self.kv_store.module} is not installed here: "
                "serving without it (the stage workers recompute)"
            )
            self.kv_store = None
        self._stopping = False
        self._kv_backoff = KV_RESTART_BACKOFF_S[0]
        self._kv_restart_at: float | None = None  # when the dead store is started again
        self._kv_started_at = 0.0

    @property
    def services(self) -> list[Service]:
        """Every service, in start order: the KV store, the stages, the router."""
        return [*([self.kv_store] if self.kv_store else []), *self.stages, self.router]

    @property
    def essential(self) -> list[Service]:
        """The services the mesh cannot serve without (all but the KV store)."""
        return [*self.stages, self.router]

    def start_service(self, svc: Service) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{svc.name.replace('/', '-')}.log", "ab")  # noqa: SIM115 - the child owns it
        svc.proc = spawn_module(svc.module, svc.args, env={**svc.env, **self.env}, stdout=out, stderr=out)
        if out is not None:
            out.close()  # the child holds its own descriptor

    def start(
        self,
        *,
        progress: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
        kv_ready_s: float = KV_STORE_READY_S,
    ) -> None:
        """Start the KV store and give it up to `kv_ready_s` to serve (the workers use it from
        their first admission; one that does not serve by then is a warning), then the stages,
        then the router. MeshInterrupted as soon as `stop` is set."""
        if self.kv_store is not None:
            self._start_kv_store()
            self._wait_kv_store(kv_ready_s, progress, stop or threading.Event())
        for svc in self.stages:
            self.start_service(svc)
        self.start_service(self.router)

    def _start_kv_store(self) -> None:
        assert self.kv_store is not None
        self.start_service(self.kv_store)
        self._kv_started_at = time.monotonic()
        self._kv_restart_at = None

    def _wait_kv_store(self, timeout: float, progress, stop: threading.Event) -> None:
        svc = self.kv_store
        assert svc is not None
        end = time.monotonic() + timeout
        while True:
            if not svc.alive():
                self.tend()  # a warning, and a restart after the backoff
                return
            if health(svc.address):
                if progress:
                    progress(f"{svc.name} serving at {svc.address}")
                return
            if time.monotonic() > end:
                self.warn(
                    f"{svc.name} not serving at {svc.address} after {timeout:.0f}s: starting the stage "
                    "workers anyway (they use the store once it serves)"
                )
                return
            if stop.wait(0.1):
                raise MeshInterrupted("interrupted while starting")

    def tend(self) -> Service | None:
        """Look after the running mesh: a dead KV store is a warning and a restart after a backoff
        (doubling from 1 s to 60 s, starting over once it stayed up 60 s; never for exit code 2,
        its configuration error, which a restart repeats). Returns the first dead service the mesh
        cannot serve without (a stage, the router), else None."""
        svc = self.kv_store
        if svc is not None and not self._stopping and svc.proc is not None and not svc.alive():
            now = time.monotonic()
            code = svc.proc.poll()
            if self._kv_restart_at is None and code == KV_CONFIG_EXIT:
                self.warn(
                    f"{svc.name} exited with code {code} (its configuration: the line above says "
                    "why): serving on without it (the stage workers recompute), not restarting it"
                )
                self._kv_restart_at = float("inf")
            elif self._kv_restart_at is None:
                if now - self._kv_started_at > KV_STABLE_S:
                    self._kv_backoff = KV_RESTART_BACKOFF_S[0]
                self._kv_restart_at = now + self._kv_backoff
                self.warn(
                    f"{svc.name} exited with code {code}: serving on without it (the stage "
                    f"workers recompute); restarting it in {self._kv_backoff:.0f}s"
                )
                self._kv_backoff = min(2 * self._kv_backoff, KV_RESTART_BACKOFF_S[1])
            elif now >= self._kv_restart_at:
                self.warn(f"restarting {svc.name}")
                self._start_kv_store()
        return next((s for s in self.essential if s.proc is not None and not s.alive()), None)

    def wait_ready(self, timeout: float = 600.0, progress=None, stop: threading.Event | None = None) -> None:
        """Block until every stage and the router report SERVING; raise MeshError if one dies or
        time runs out, MeshInterrupted as soon as `stop` is set (Ctrl-C / SIGTERM while starting).
        The KV store is not waited for (start gave it its chance); its death is `tend`'s."""
        stop = stop or threading.Event()
        end = time.monotonic() + timeout
        pending = {s.name for s in self.essential}
        while pending:
            self.tend()
            for svc in self.essential:
                if stop.is_set():
                    raise MeshInterrupted("interrupted while starting")
                if svc.name in pending and not svc.alive():
                    raise MeshError(f"{svc.name} exited with code {svc.proc.poll()} while starting")
                if svc.name in pending and health(svc.address):
                    pending.discard(svc.name)
                    if progress:
                        progress(f"{svc.name} serving at {svc.address}")
            if pending and time.monotonic() > end:
                raise MeshError(f"not serving after {timeout:.0f}s: {', '.join(sorted(pending))}")
            if pending and stop.wait(0.2):
                raise MeshInterrupted("interrupted while starting")
        self._wait_router_sees_replicas(end, stop)

    def _wait_router_sees_replicas(self, end: float, stop: threading.Event) -> None:
        from trellis.wire.router_client import RouterClient

        with RouterClient(self.router.address) as c:
            while time.monotonic() < end:
                info = c.info()
                # Every replica of the spec (with Redis a replica may register a poll later than
                # another: "any" let a mesh count as ready with one replica still unseen).
                seen = {r.name for r in info.replicas if all(s.alive for s in r.stages)}
                if seen >= {r.name for r in self.spec.replicas}:
                    return
                if stop.wait(0.2):
                    raise MeshInterrupted("interrupted while starting")
        raise MeshError("the router does not see the replicas as serving")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the router and the stages (the router first, then the stages drain), SIGKILL
        stragglers; then the KV store, once no worker reads its slab any more."""
        self._stopping = True
        end = time.monotonic() + timeout
        _terminate([self.router, *self.stages], end)
        if self.kv_store is not None:
            _terminate([self.kv_store], max(end, time.monotonic() + KV_STOP_MIN_S))
        if self._tmp:
            Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


KV_STOP_MIN_S = 5.0  # the store's own stop, however long the workers took


def _terminate(services: list[Service], end: float) -> None:
    """SIGTERM each, wait for all until `end` (monotonic), SIGKILL the stragglers."""
    for svc in services:
        if svc.alive():
            svc.proc.send_signal(signal.SIGTERM)
    for svc in services:
        if svc.proc is None:
            continue
        try:
            svc.proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()


def health(address: str, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING

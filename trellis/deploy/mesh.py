"""Run every service of a deploy spec on this host: spawn, wait until SERVING, stop them all.

Used by `trellis up`, `trellis demo` and the integration tests. Children get SIGKILL if this
process dies (Linux parent-death signal), so none outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core.processes import spawn_module
from trellis.core.spec import DeploySpec
from trellis.deploy.processes import processes_for


@dataclass
class Service:
    name: str  # "router" or "REPLICA/stage-S"
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
    ) -> None:
        self.spec = spec
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
        self.others: list[Service] = [svc for kind, svc in built if kind == "kv_store"]

    @property
    def services(self) -> list[Service]:
        return [*self.others, self.router, *self.stages]

    def start_service(self, svc: Service) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{svc.name.replace('/', '-')}.log", "ab")  # noqa: SIM115 - the child owns it
        svc.proc = spawn_module(svc.module, svc.args, env={**svc.env, **self.env}, stdout=out, stderr=out)
        if out is not None:
            out.close()  # the child holds its own descriptor

    def start(self) -> None:
        for svc in [*self.others, *self.stages]:
            self.start_service(svc)
        self.start_service(self.router)

    def wait_ready(self, timeout: float = 600.0, progress=None, stop: threading.Event | None = None) -> None:
        """Block until every service reports SERVING; raise MeshError if one dies or time runs out,
        MeshInterrupted as soon as `stop` is set (Ctrl-C / SIGTERM while starting)."""
        stop = stop or threading.Event()
        end = time.monotonic() + timeout
        pending = {s.name for s in self.services}
        while pending:
            for svc in self.services:
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
                if info.replicas and all(all(s.alive for s in r.stages) for r in info.replicas):
                    return
                if stop.wait(0.2):
                    raise MeshInterrupted("interrupted while starting")
        raise MeshError("the router does not see the replicas as serving")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM everyone (the router first, then the stages drain), SIGKILL stragglers."""
        for svc in [self.router, *self.stages, *self.others]:
            if svc.alive():
                svc.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for svc in self.services:
            if svc.proc is None:
                continue
            try:
                svc.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()
        if self._tmp:
            Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def health(address: str, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING

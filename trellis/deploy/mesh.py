"""Run every service of a deploy spec on this host: spawn, wait until SERVING, stop them all.

Used by `trellis up`, `trellis demo` and the integration tests. Children get SIGKILL if this
process dies (Linux parent-death signal), so none outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trellis.core.processes import spawn_module
from trellis.core.spec import DeploySpec


@dataclass
class Service:
    name: str  # "router" or "REPLICA/stage-S"
    address: str  # host:port of its gRPC server
    module: str  # run as `python -m module args`
    args: list[str]
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class MeshError(RuntimeError):
    pass


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
        self.env = {**os.environ, **(env or {})}
        # torch's default (a compute thread per core in every process) oversubscribes the cores when
        # several CPU ranks share a host, and each step crawls (10x and worse): split the cores instead.
        ranks = sum(st.tp for rep in spec.replicas for st in rep.stages)
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
        # ucxx's default waits for a UCX request by yielding in a loop, so an idle stage leader (always
        # waiting on its inbound link) spins a core, which CPU ranks need for compute: python futures let
        # it sleep, for ~0.6 ms more per hop (bench/mesh_cpu.py). GPU hosts keep the faster default.
        if all(st.device == "cpu" for rep in spec.replicas for st in rep.stages):
            self.env.setdefault("UCXPY_ENABLE_PYTHON_FUTURE", "1")
        extra = ["--registry", registry] if registry else []
        self.router = Service(
            "router",
            f"{spec.router.host}:{spec.router.port}",
            "services.router",
            ["--spec", self.spec_path, *extra],
        )
        self.stages: list[Service] = []
        for rep in spec.replicas:
            for j, st in enumerate(rep.stages):
                self.stages.append(
                    Service(
                        f"{rep.name}/stage-{j}",
                        f"{st.host}:{st.port}",
                        "services.stage_worker",
                        [
                            "--spec",
                            self.spec_path,
                            "--replica",
                            rep.name,
                            "--stage",
                            str(j),
                        ],
                    )
                )

    @property
    def services(self) -> list[Service]:
        return [self.router, *self.stages]

    def start_service(self, svc: Service) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{svc.name.replace('/', '-')}.log", "ab")  # noqa: SIM115 - the child owns it
        svc.proc = spawn_module(svc.module, svc.args, env=self.env, stdout=out, stderr=out)
        if out is not None:
            out.close()  # the child holds its own descriptor

    def start(self) -> None:
        for svc in self.stages:
            self.start_service(svc)
        self.start_service(self.router)

    def wait_ready(self, timeout: float = 600.0, progress=None) -> None:
        """Block until every service reports SERVING; raise MeshError if one dies or time runs out."""
        end = time.monotonic() + timeout
        pending = {s.name for s in self.services}
        while pending:
            for svc in self.services:
                if svc.name in pending and not svc.alive():
                    raise MeshError(f"{svc.name} exited with code {svc.proc.poll()} while starting")
                if svc.name in pending and health(svc.address):
                    pending.discard(svc.name)
                    if progress:
                        progress(f"{svc.name} serving at {svc.address}")
            if pending and time.monotonic() > end:
                raise MeshError(f"not serving after {timeout:.0f}s: {', '.join(sorted(pending))}")
            time.sleep(0.2)
        self._wait_router_sees_replicas(end)

    def _wait_router_sees_replicas(self, end: float) -> None:
        from trellis.wire.router_client import RouterClient

        with RouterClient(self.router.address) as c:
            while time.monotonic() < end:
                info = c.info()
                if info.replicas and all(all(s.alive for s in r.stages) for r in info.replicas):
                    return
                time.sleep(0.2)
        raise MeshError("the router does not see the replicas as serving")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM everyone (the router first, then the stages drain), SIGKILL stragglers."""
        for svc in [self.router, *self.stages]:
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

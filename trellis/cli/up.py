"""`trellis up [SPEC]` runs a mesh on this host; `trellis demo` runs the demo mesh for one request.

`run_mesh` is the one run loop (`trellis up` and `trellis serve`): check the spec against this host,
start, wait until serving, serve until Ctrl-C / SIGTERM or a stage or the router dies, stop. A
signal during start-up stops everything at once rather than after the weights have loaded. The KV
store (a spec with `kv_store:`) is the exception: its death is a warning and a restart after a
backoff while the mesh serves on (the stage workers recompute without it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

from trellis.core.spec import DeploySpec, SpecError, load

if TYPE_CHECKING:
    from trellis.deploy.mesh import Mesh

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STARTUP_STOP_S = 5.0  # a stage interrupted while loading has nothing to drain: SIGKILL after this
DEMO_PORT = 50051
DEFAULT_HTTP_PORT = 8000  # `trellis serve`'s OpenAI-compatible API, where vLLM users expect it


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="the services' log level (default: TRELLIS_LOG_LEVEL, else INFO: a line per request)",
    )


def add_up_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run every service of a deploy spec on this host (no SPEC: the demo mesh)")
    p.add_argument("spec", nargs="?", help="deploy spec (YAML); omitted: 2 stages x TP 2 on CPU, demo model")
    p.add_argument("--port", type=int, help="the router's port (default: the spec's, 50051 for the demo)")
    p.add_argument("--registry", help="override the spec's registry (redis://HOST:PORT/DB)")
    p.add_argument("--log-dir", help="write each service's logs to DIR/NAME.log instead of this terminal")
    add_log_level(p)
    p.set_defaults(func=run_up)
    d = sub.add_parser("demo", help="start the demo mesh, send one request through it, stop")
    d.add_argument("--port", type=int, default=DEMO_PORT)
    d.add_argument("--prompt", default="Pipeline parallelism gives each node")
    d.add_argument("--max-tokens", type=int, default=40)
    d.set_defaults(func=run_demo)


def say(msg: str) -> None:
    print(f"[trellis] {msg}", flush=True)


def fail(msg: str, code: int = 2) -> int:
    print(f"trellis: error: {msg}", file=sys.stderr)
    return code


def set_log_level(level: str | None, default: str) -> None:
    """The children's level: --log-level, else TRELLIS_LOG_LEVEL as set, else `default`."""
    os.environ["TRELLIS_LOG_LEVEL"] = level or os.environ.get("TRELLIS_LOG_LEVEL") or default


def demo_spec(port: int, *, http: bool = False) -> DeploySpec:
    from trellis.deploy.demo_model import demo_model
    from trellis.deploy.local_spec import local_spec

    say("preparing the demo model (made once, then cached)")
    path = demo_model()
    return local_spec(str(path), replicas=1, stages=2, tp=2, router_port=port, http=http)


def host_problem(spec: DeploySpec) -> str | None:
    """What stops this host from running the spec, in one line (a CUDA stage without CUDA, a busy
    port), before any process starts."""
    from trellis.deploy.local_spec import busy_port

    if any(st.device == "cuda" for rep in spec.replicas for st in rep.stages):
        from trellis.runtime.bootstrap import cuda_problem  # torch: only for a spec that wants CUDA

        if problem := cuda_problem(spec):
            return problem
    if spec.kv_store is not None and not spec.kv_store.port:
        return "kv_store.port: not set (0): the stage workers dial the store at the spec's host:port"
    return busy_port(spec)


def _spec(args: argparse.Namespace) -> DeploySpec:
    if args.spec is None:
        return demo_spec(args.port or DEMO_PORT)
    spec = load(args.spec)
    spec.check_model()  # one line naming the bad field, before any process starts
    if args.port is not None:
        from dataclasses import replace

        spec = replace(spec, router=replace(spec.router, port=args.port))
    return spec


def stop_event() -> threading.Event:
    """Set by Ctrl-C or SIGTERM from now on (start-up included)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def start_mesh(
    spec: DeploySpec,
    stop: threading.Event,
    *,
    registry: str | None = None,
    log_dir: str | None = None,
    env: dict[str, str] | None = None,
) -> Mesh:
    """Start the spec's services and wait until they serve; MeshError (MeshInterrupted on a signal)
    with the mesh stopped again."""
    from trellis.deploy.mesh import Mesh, MeshInterrupted

    mesh = Mesh(spec, registry=registry, log_dir=log_dir, env=env, warn=lambda m: say(f"warning: {m}"))
    n = len(mesh.stages)
    store = "the KV store, " if mesh.kv_store is not None else ""
    reps = len(spec.replicas)
    say(f"starting {store}{n} stage worker(s) in {reps} replica(s) and the router; loading weights")
    t0 = time.monotonic()

    def progress(m: str) -> None:
        say(f"{m} (+{time.monotonic() - t0:.1f}s)")

    try:
        mesh.start(progress=progress, stop=stop)
        mesh.wait_ready(progress=progress, stop=stop)
    except MeshInterrupted:
        say("interrupted while starting; stopping everything")
        mesh.stop(timeout=STARTUP_STOP_S)
        raise
    except BaseException:
        mesh.stop(timeout=STARTUP_STOP_S)
        raise
    return mesh


def run_mesh(
    spec: DeploySpec,
    *,
    registry: str | None = None,
    log_dir: str | None = None,
    env: dict[str, str] | None = None,
    on_ready: Callable[[Mesh], None] | None = None,
) -> int:
    """Run a spec's mesh until Ctrl-C / SIGTERM (exit 0) or until a service dies (exit 1)."""
    from trellis.deploy.mesh import MeshError, MeshInterrupted

    if problem := host_problem(spec):
        return fail(problem)
    stop = stop_event()
    try:
        mesh = start_mesh(spec, stop, registry=registry, log_dir=log_dir, env=env)
    except MeshInterrupted:
        say("stopped")
        return 0
    except MeshError as e:
        return fail(str(e), 1)
    say(f"serving: {summary(mesh)} (Ctrl-C to stop)")
    if on_ready is not None:
        on_ready(mesh)
    code = 0
    while not stop.wait(0.5):
        if (dead := mesh.tend()) is not None:  # the KV store is restarted there, not fatal
            say(f"{dead.name} exited with code {dead.proc.poll()}; stopping everything")
            code = 1
            break
    say("draining and stopping")
    mesh.stop()
    say("stopped")
    return code


def summary(mesh: Mesh) -> str:
    """Where the mesh serves: the router, and the KV store when there is one."""
    out = f"router at {mesh.router.address}"
    if (kv := mesh.kv_store) is not None:
        from trellis.deploy.mesh import health

        state = "" if kv.alive() and health(kv.address) else " (not serving yet: the workers recompute)"
        out += f", KV store {mesh.spec.kv_store.name!r} at {kv.address}{state}"
    return out


def run_up(args: argparse.Namespace) -> int:
    try:
        spec = _spec(args)
    except SpecError as e:
        return fail(str(e))
    set_log_level(args.log_level, "INFO")

    def hint(mesh: Mesh) -> None:
        say(f"try: trellis generate --router {mesh.router.address} 'Trellis serves'")

    return run_mesh(spec, registry=args.registry, log_dir=args.log_dir, on_ready=hint)


def run_demo(args: argparse.Namespace) -> int:
    from trellis.deploy.local_spec import port_or_free
    from trellis.deploy.mesh import MeshError, MeshInterrupted

    set_log_level(None, "WARNING")  # the demo's own lines are what a newcomer reads
    port = port_or_free("127.0.0.1", args.port)
    if port != args.port:
        say(f"port {args.port} is in use; the router takes a free one")
    try:
        spec = demo_spec(port, http=True)
    except KeyboardInterrupt:  # while the demo model is made (the first time), before any service
        return fail("interrupted", 130)
    if problem := host_problem(spec):
        return fail(problem)
    stop = stop_event()
    try:
        mesh = start_mesh(spec, stop)
    except MeshInterrupted:
        return 0
    except MeshError as e:
        return fail(str(e), 1)
    try:
        text = _demo_grpc(mesh, args)
        _demo_http(spec, args, text)
    finally:
        say("stopping the mesh")
        mesh.stop()
    return 0


def _demo_grpc(mesh: Mesh, args: argparse.Namespace) -> str:
    """One streamed request through the gRPC API; the text it generated."""
    from trellis.wire.router_client import RouterClient

    with RouterClient(mesh.router.address) as client:
        r = client.info().replicas[0]
        stages = (f"stage {s.index} layers [{s.layer_start},{s.layer_end}) TP {s.tp}" for s in r.stages)
        say(f"router at {mesh.router.address}; replica {r.name}: " + " -> ".join(stages))
        say(f"request: {args.prompt!r} (greedy, {args.max_tokens} tokens max), streaming:")
        print(args.prompt, end="", flush=True)
        t0, first, n, finish, parts = time.monotonic(), None, 0, "", []
        for resp in client.stream(args.prompt, max_tokens=args.max_tokens):
            first = first or time.monotonic()
            n += len(resp.token_ids)
            finish = resp.finish_reason or finish
            parts.append(resp.text)
            print(resp.text, end="", flush=True)
        print()
        t1 = time.monotonic()
        say(
            f"{n} tokens, finish: {finish}; first token after {1000 * ((first or t1) - t0):.0f} ms, "
            f"{n / max(t1 - t0, 1e-9):.1f} tokens/s"
        )
    return "".join(parts)


def _demo_http(spec: DeploySpec, args: argparse.Namespace, grpc_text: str) -> None:
    """The same request through the OpenAI-compatible HTTP API, and the curl line that repeats it."""
    url = f"http://{spec.router.host}:{spec.router.http_port}/v1/completions"
    body = {"model": spec.model.name, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
    data = json.dumps(body)
    say(f"the same request through the OpenAI-compatible API: POST {url}")
    request = urllib.request.Request(url, data.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            out = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        say(f"the HTTP API did not answer: {e}")
        return
    choice = out["choices"][0]
    same = "the same text as over gRPC" if choice["text"] == grpc_text else "text differs from gRPC's"
    say(f"{out['usage']['completion_tokens']} tokens, finish: {choice['finish_reason']}; {same}")
    again = url.replace(f":{spec.router.http_port}/", f":{DEFAULT_HTTP_PORT}/")
    say("to send it again: run `trellis serve` (it serves the demo model on CPU), then:")
    print(f"curl -s {again} -H 'Content-Type: application/json' -d {shlex.quote(data)}", flush=True)

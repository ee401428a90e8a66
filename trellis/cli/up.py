"""`trellis up [SPEC]` runs a mesh on this host; `trellis demo` runs the demo mesh for one request."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from trellis.core.spec import DeploySpec, SpecError, load


def add_up_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="run every service of a deploy spec on this host (no SPEC: the demo mesh)")
    p.add_argument("spec", nargs="?", help="deploy spec (YAML); omitted: 2 stages x TP 2 on CPU, demo model")
    p.add_argument("--port", type=int, help="the router's port (default: the spec's, 50051 for the demo)")
    p.add_argument("--registry", help="override the spec's registry (redis://HOST:PORT/DB)")
    p.add_argument("--log-dir", help="write each service's logs to DIR/NAME.log instead of this terminal")
    p.set_defaults(func=run_up)
    d = sub.add_parser("demo", help="start the demo mesh, send one request through it, stop")
    d.add_argument("--port", type=int, default=50051)
    d.add_argument("--prompt", default="Pipeline parallelism gives each node")
    d.add_argument("--max-tokens", type=int, default=40)
    d.set_defaults(func=run_demo)


def say(msg: str) -> None:
    print(f"[trellis] {msg}", flush=True)


def demo_spec(port: int) -> DeploySpec:
    from trellis.deploy.demo_model import demo_model
    from trellis.deploy.local_spec import local_spec

    say("preparing the demo model (made once, then cached)")
    path = demo_model()
    return local_spec(str(path), replicas=1, stages=2, tp=2, router_port=port)


def _spec(args: argparse.Namespace) -> DeploySpec:
    if args.spec is None:
        return demo_spec(args.port or 50051)
    spec = load(args.spec)
    spec.check_model()  # one line naming the bad field, before any process starts
    if args.port is not None:
        from dataclasses import replace

        spec = replace(spec, router=replace(spec.router, port=args.port))
    return spec


def _start(spec: DeploySpec, registry: str | None, log_dir: str | None = None):
    from trellis.deploy.mesh import Mesh

    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")
    mesh = Mesh(spec, registry=registry, log_dir=log_dir)
    n = len(mesh.stages)
    say(f"starting {n} stage worker(s) in {len(spec.replicas)} replica(s) and the router; loading weights")
    mesh.start()
    t0 = time.monotonic()
    mesh.wait_ready(progress=lambda m: say(f"{m} (+{time.monotonic() - t0:.1f}s)"))
    return mesh


def run_up(args: argparse.Namespace) -> int:
    try:
        spec = _spec(args)
    except SpecError as e:
        print(f"trellis: error: {e}", file=sys.stderr)
        return 2
    from trellis.deploy.mesh import MeshError

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        mesh = _start(spec, args.registry, args.log_dir)
    except MeshError as e:
        print(f"trellis: error: {e}", file=sys.stderr)
        return 1
    say(f"serving: router at {mesh.router.address} (Ctrl-C to stop)")
    say(f"try: trellis generate --router {mesh.router.address} 'Trellis serves'")
    code = 0
    while not stop.wait(0.5):
        dead = [s for s in mesh.services if not s.alive()]
        if dead:
            say(f"{dead[0].name} exited with code {dead[0].proc.poll()}; stopping everything")
            code = 1
            break
    say("draining and stopping")
    mesh.stop()
    say("stopped")
    return code


def run_demo(args: argparse.Namespace) -> int:
    from trellis.deploy.mesh import MeshError
    from trellis.wire.router_client import RouterClient

    try:
        mesh = _start(demo_spec(args.port), None)
    except MeshError as e:
        print(f"trellis: error: {e}", file=sys.stderr)
        return 1
    try:
        with RouterClient(mesh.router.address) as client:
            info = client.info()
            r = info.replicas[0]
            say(
                f"router at {mesh.router.address}; replica {r.name}: "
                + " -> ".join(
                    f"stage {s.index} layers [{s.layer_start},{s.layer_end}) TP {s.tp}" for s in r.stages
                )
            )
            say(f"request: {args.prompt!r} (greedy, {args.max_tokens} tokens max), streaming:")
            print(args.prompt, end="", flush=True)
            t0, first, n, finish = time.monotonic(), None, 0, ""
            for resp in client.stream(args.prompt, max_tokens=args.max_tokens):
                first = first or time.monotonic()
                n += len(resp.token_ids)
                finish = resp.finish_reason or finish
                print(resp.text, end="", flush=True)
            print()
            t1 = time.monotonic()
            say(
                f"{n} tokens, finish: {finish}; first token after {1000 * (first - t0):.0f} ms, "
                f"{n / max(t1 - t0, 1e-9):.1f} tokens/s"
            )
    finally:
        say("stopping the mesh")
        mesh.stop()
    return 0

"""`trellis serve MODEL_DIR | --preset NAME`: one command from a checkpoint to a serving mesh.

It lays dp replicas x pp stages x tp ranks onto this host (the GPUs it finds on cuda, processes on
CPU; or the planner's choice with --plan), picks the ports (the router's gRPC 50051 and the HTTP
API's 8000 unless they are taken), prints the spec it made (--write-spec keeps it: `trellis up FILE`
runs the same mesh) and runs the mesh until Ctrl-C, as `trellis up` does. The clients' API key
reaches the router through the environment variable router.api_key_env names, never the spec.
With no model on CPU it serves the demo model. --kv-store-bytes N adds the KV cache store (N bytes
of host memory, optionally a disk tier), which the replicas share through shared memory.
--prefill-replicas N makes N of the replicas prefill only and the rest decode only (P/D).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import yaml

from trellis.cli.up import DEFAULT_HTTP_PORT, add_log_level, fail, run_mesh, say, set_log_level
from trellis.core.errors import ConfigError
from trellis.core.spec import KV_WRITE_POLICIES, ROUTER_POLICIES, DeploySpec, KVStoreSpec

if TYPE_CHECKING:
    from trellis.deploy.mesh import Mesh

DEFAULT_PORT = 50051  # the router's gRPC API, as `trellis up` and the example specs
DTYPES = ("float32", "bfloat16", "float16")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model on this host with one command (OpenAI-compatible API)")
    p.add_argument("model", nargs="?", help="a local Hugging Face model directory (CPU default: the demo)")
    p.add_argument("--preset", help="a built-in model config with dummy weights (benchmarks)")
    p.add_argument("--tp", type=int, help="tensor-parallel ranks per stage (default 1)")
    p.add_argument("--pp", type=int, help="pipeline stages per replica (default 1)")
    p.add_argument("--dp", type=int, help="replicas (default: as many as the GPUs hold; 1 on CPU)")
    p.add_argument("--plan", action="store_true", help="let the planner choose tp / pp / dp for these GPUs")
    p.add_argument("--host", default="127.0.0.1", help="the address the router's APIs listen on")
    p.add_argument("--port", type=int, help=f"the router's gRPC port (default {DEFAULT_PORT} if free)")
    p.add_argument("--http-port", type=int, help=f"the HTTP API's port (default {DEFAULT_HTTP_PORT} if free)")
    p.add_argument("--metrics-port", type=int, default=0, help="the router's /metrics port (default: off)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the directory's)")
    p.add_argument("--api-key", help="clients must send this key (Authorization: Bearer KEY)")
    p.add_argument("--registry", help="redis://HOST:PORT/DB (default: embedded in the router)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where there is a GPU")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on CPU")
    p.add_argument("--max-model-len", type=int)
    kv = p.add_argument_group(
        "KV cache store",
        "a cache of prompts' KV blocks shared by the replicas, behind their own prefix caches (like "
        "vLLM's CPU offloading / LMCache): a prompt prefix computed once is copied in, not recomputed",
    )
    kv.add_argument(
        "--kv-store-bytes",
        type=int,
        default=0,
        metavar="N",
        help="host memory for the store, in bytes (e.g. 4294967296 for 4 GiB; default 0: no store)",
    )
    kv.add_argument(
        "--kv-store-disk",
        metavar="DIR",
        help="also keep the store's blocks on disk in DIR (kept across restarts; default: memory only)",
    )
    kv.add_argument(
        "--kv-store-disk-bytes",
        type=int,
        metavar="N",
        help="the most bytes the store keeps in --kv-store-disk (default 0: no limit of its own)",
    )
    kv.add_argument(
        "--kv-write-policy",
        choices=KV_WRITE_POLICIES,
        help="which blocks go to the store: second-use (a block reused once more, the default) or "
        "write-through (every full block)",
    )
    p.add_argument(
        "--router-policy",
        choices=ROUTER_POLICIES,
        default="least-load",
        help="how the router picks a replica: least-load (the default), or kv-aware (the one that "
        "holds most of the prompt's KV cache, itself or in the store, weighed against its load)",
    )
    pd = p.add_argument_group("prefill/decode disaggregation (docs/pd-disaggregation.md)")
    pd.add_argument(
        "--prefill-replicas",
        type=int,
        default=0,
        help="of the --dp replicas, this many only prefill (role prefill) and the rest decode (role "
        "decode), the KV moved between them (default 0: every replica does both)",
    )
    pd.add_argument(
        "--max-local-prefill-tokens",
        type=int,
        help="with --prefill-replicas: a prompt whose uncached part is at most this many tokens runs "
        "on the decode replica whole (default 512)",
    )
    p.add_argument("--write-spec", metavar="FILE", help="keep the spec it made (for `trellis up FILE`)")
    p.add_argument("--log-dir", help="write each service's logs to DIR/NAME.log instead of this terminal")
    add_log_level(p)
    p.set_defaults(func=run_serve)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    gpus: int  # GPUs this host has (0 on CPU)


def run_serve(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(args)
    except ConfigError as e:
        return fail(str(e))
    except KeyboardInterrupt:  # e.g. while the demo model is made, before any service started
        return fail("interrupted", 130)
    set_log_level(args.log_level, "INFO")
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="", flush=True)
    if args.write_spec:
        spec.dump(args.write_spec)
        say(f"wrote the spec to {args.write_spec} (`trellis up {args.write_spec}` runs the same mesh)")
    env = {spec.router.api_key_env: args.api_key} if args.api_key else None
    return run_mesh(spec, registry=None, log_dir=args.log_dir, env=env, on_ready=_announce(args))


def build_spec(args: argparse.Namespace) -> DeploySpec:
    """The spec of `trellis serve ARGS` on this host; ConfigError (one line) for what cannot be."""
    from trellis.deploy.local_spec import local_spec

    if args.model and args.preset:
        raise ConfigError("give a MODEL_DIR or --preset NAME, not both")
    for name in ("tp", "pp", "dp", "max_model_len"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    device = args.device or _default_device()
    model = args.model
    if model is None and args.preset is None:
        if device == "cuda":
            raise ConfigError("give a MODEL_DIR or --preset NAME (the demo model serves on CPU only)")
        from trellis.deploy.demo_model import demo_model

        say("no model given: serving the demo model (made once, then cached)")
        model = str(demo_model())
    if model is not None:
        from trellis.core.model_config import model_dir_problem

        if problem := model_dir_problem(model):
            raise ConfigError(problem)
    layout = _layout(args, device, model)
    kv_store = _kv_store(args)
    roles = _roles(args, layout.dp)
    spec = local_spec(
        model,
        preset=args.preset,
        shapes=tuple((layout.tp, layout.pp, role) for role in roles),
        router_port=_port(args.host, args.port, DEFAULT_PORT, "--port", "the router's gRPC API"),
        device=device,
        dtype=args.dtype or ("bfloat16" if device == "cuda" else "float32"),
        registry=args.registry or "embedded",
        max_model_len=args.max_model_len,
        host=args.host,
        http=True,
        http_port=_port(args.host, args.http_port, DEFAULT_HTTP_PORT, "--http-port", "the HTTP API"),
        metrics=bool(args.metrics_port),
        served_model_name=args.served_model_name,
        kv_store=kv_store,
        router_policy=args.router_policy,
        router=_pd_router(args),
    )
    if args.metrics_port:
        spec = replace(spec, router=replace(spec.router, metrics_port=args.metrics_port))
    spec.check_model()  # the layout against the model: one line naming the field
    return spec


def _roles(args: argparse.Namespace, dp: int) -> list[str]:
    """Each replica's role: --prefill-replicas of them prefill, the others decode (or all both)."""
    n = args.prefill_replicas
    if n < 0:
        raise ConfigError(f"--prefill-replicas must be >= 0, got {n}")
    if n and n >= dp:
        raise ConfigError(
            f"--prefill-replicas {n} leaves no decode replica of the {dp} (--dp): give --dp {n + 1} or more"
        )
    if args.max_local_prefill_tokens is not None and not n:
        raise ConfigError("--max-local-prefill-tokens needs --prefill-replicas N")
    return ["prefill"] * n + ["decode"] * (dp - n) if n else ["both"] * dp


def _pd_router(args: argparse.Namespace) -> dict[str, int]:
    if args.max_local_prefill_tokens is None:
        return {}
    if args.max_local_prefill_tokens < 0:
        raise ConfigError(f"--max-local-prefill-tokens must be >= 0, got {args.max_local_prefill_tokens}")
    return {"max_local_prefill_tokens": args.max_local_prefill_tokens}


def _kv_store(args: argparse.Namespace) -> KVStoreSpec | None:
    """The KV store the --kv-store-* flags ask for (None: --kv-store-bytes 0, no store)."""
    size = args.kv_store_bytes
    if size < 0:
        raise ConfigError(f"--kv-store-bytes must be >= 0, got {size}")
    if args.kv_store_disk_bytes is not None and args.kv_store_disk_bytes < 0:
        raise ConfigError(f"--kv-store-disk-bytes must be >= 0, got {args.kv_store_disk_bytes}")
    if args.kv_store_disk_bytes is not None and not args.kv_store_disk:
        raise ConfigError("--kv-store-disk-bytes needs --kv-store-disk DIR (where the blocks go)")
    if not size:
        for flag, value in (
            ("--kv-store-disk", args.kv_store_disk),
            ("--kv-write-policy", args.kv_write_policy),
        ):
            if value is not None:
                raise ConfigError(f"{flag} needs --kv-store-bytes N (the store's host memory; 0: no store)")
        return None
    disk = os.path.abspath(os.path.expanduser(args.kv_store_disk)) if args.kv_store_disk else None
    return KVStoreSpec(
        capacity_bytes=size,
        disk_path=disk,
        disk_capacity_bytes=args.kv_store_disk_bytes or 0,
        write_policy=args.kv_write_policy or KVStoreSpec.write_policy,
    )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _layout(args: argparse.Namespace, device: str, model: str | None) -> Layout:
    """tp x pp x dp from the flags (dp fills the GPUs when not given) or the planner's choice."""
    gpus = 0
    if device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ConfigError(
                "--device cuda: cuda asked for, but this host has no CUDA GPU; use --device cpu"
            )
    if args.plan:
        if device != "cuda":
            raise ConfigError("--plan lays a model onto GPUs, and this serves on CPU: give --tp/--pp/--dp")
        from trellis.cli.serve_plan import planned_layout

        tp, pp, dp = planned_layout(args.preset or model or "", gpus, args.tp, args.pp)
        say(f"the planner's choice for {gpus} GPU(s): {dp} replica(s) x {pp} stage(s) x TP {tp}")
        return Layout(tp, pp, dp, gpus)
    tp, pp = args.tp or 1, args.pp or 1
    dp = args.dp or (max(1, gpus // (tp * pp)) if gpus else 1)
    if gpus and tp * pp * dp > gpus:
        raise ConfigError(
            f"--tp {tp} x --pp {pp} x --dp {dp} needs {tp * pp * dp} GPUs, but this host has {gpus}"
        )
    return Layout(tp, pp, dp, gpus)


def _port(host: str, asked: int | None, default: int, flag: str, what: str) -> int:
    """The port asked for (checked when the mesh starts), else `default` if free, else 0 (free)."""
    from trellis.deploy.local_spec import port_or_free

    if asked is not None:
        if not 1 <= asked <= 65535:
            raise ConfigError(f"{flag} must be a port in 1..65535, got {asked}")
        return asked
    if port_or_free(host, default):
        return default
    say(f"port {default} ({what}) is in use on {host}: taking a free one ({flag} picks another)")
    return 0


def _announce(args: argparse.Namespace):
    def announce(mesh: Mesh) -> None:
        r = mesh.spec.router
        base = f"http://{r.host}:{r.http_port}/v1"
        name = mesh.spec.model.name
        say(f"OpenAI-compatible API at {base} (model {name!r}); gRPC at {mesh.router.address}")
        if mesh.kv_store is not None:
            kv = mesh.spec.kv_store
            size = kv.capacity_bytes
            amount = f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
            say(f"KV store at {mesh.kv_store.address}: {amount} of host memory ({kv.write_policy})")
        body = json.dumps({"model": name, "prompt": "Trellis serves", "max_tokens": 16})
        auth = f" -H {shlex.quote('Authorization: Bearer ' + args.api_key)}" if args.api_key else ""
        json_header = "-H 'Content-Type: application/json'"
        say(f"try: curl -s {base}/completions {json_header}{auth} -d {shlex.quote(body)}")

    return announce

"""`trellis deploy {compose,systemd,k8s} SPEC -o DIR`: deployment files for a spec, rendered from
the same description of its processes that `trellis up` runs (trellis.deploy.processes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trellis.core.spec import SpecError, load

TARGETS = ("compose", "systemd", "k8s")


def add_deploy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="write docker-compose, systemd or Kubernetes files for a deploy spec")
    p.add_argument("target", choices=TARGETS)
    p.add_argument("spec", help="deploy spec (YAML), validated against its model first")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write into")
    p.add_argument("--image", help="container image (compose, k8s; default trellis:cpu or trellis:cuda)")
    p.add_argument("--python", help="interpreter for systemd's ExecStart (default: this one)")
    p.add_argument(
        "--install-dir", help="systemd: the absolute directory the units are used from (default: DIR)"
    )
    p.add_argument("--namespace", default="default", help="k8s: the namespace of every object")
    p.add_argument("--router-replicas", type=int, default=1, help="k8s: routers to run (scales on its own)")
    p.set_defaults(func=run_deploy)


def render(args: argparse.Namespace) -> dict[str, str]:
    """The files for args.target, by relative path. Raises SpecError (one line) for a bad spec."""
    from trellis.deploy import compose, k8s, systemd
    from trellis.deploy.processes import processes_for

    spec = load(args.spec)
    spec.check_model()  # a spec its replicas cannot run is refused here, not deployed
    image = args.image or compose.default_image(spec)
    if args.target == "compose":
        return compose.render(spec, processes_for(spec, compose.CONTAINER_SPEC), image=image)
    if args.target == "systemd":
        install = Path(args.install_dir or args.output).absolute()
        python = str(Path(args.python or sys.executable).absolute())
        procs = processes_for(spec, systemd.spec_path(install))
        return systemd.render(spec, procs, install_dir=install, python=python)
    if args.router_replicas < 1:
        raise SpecError(f"--router-replicas: must be >= 1, got {args.router_replicas}")
    view = k8s.cluster_view(spec, args.namespace)
    return k8s.render(
        view,
        processes_for(view, k8s.CONTAINER_SPEC),
        image=image,
        namespace=args.namespace,
        router_replicas=args.router_replicas,
    )


def run_deploy(args: argparse.Namespace) -> int:
    try:
        files = render(args)
    except SpecError as e:
        print(f"trellis: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    for name, text in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"[trellis] wrote {len(files)} files to {out}: {', '.join(sorted(files))}")
    return 0

"""`trellis`: generate (offline or through a mesh), serve (a model, one command), up (run a mesh), demo,
plan."""

from __future__ import annotations

import argparse
import sys

from trellis.cli.deploy import add_deploy_parser
from trellis.cli.generate import add_generate_parser
from trellis.cli.serve import add_serve_parser
from trellis.cli.up import add_up_parsers


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trellis", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_up_parsers(sub)
    add_deploy_parser(sub)
    try:
        from trellis.planner.cli import add_parser as add_plan_parser

        add_plan_parser(sub)
    except ImportError:  # the planner is optional at import time only while it is being built
        pass
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

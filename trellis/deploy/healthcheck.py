"""A container's health check: one grpc.health.v1 Check with a deadline.

    python -m trellis.deploy.healthcheck HOST:PORT [--timeout SECONDS]

Exit 0 when the server answers SERVING, 1 otherwise (unreachable, NOT_SERVING, past the deadline),
with one line on stderr saying which. The compose generator's healthchecks run it.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, timeout: float) -> str | None:
    """None when `address` is SERVING, else why not (one line)."""
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return f"{address}: {e.code().name} ({e.details() or 'no details'})"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trellis.deploy.healthcheck", description=__doc__)
    ap.add_argument("address", metavar="HOST:PORT")
    ap.add_argument("--timeout", type=float, default=3.0, help="the Check's deadline in seconds")
    args = ap.parse_args(argv)
    problem = check(args.address, args.timeout)
    if problem:
        print(f"healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ports for local runs (the demo, tests, `trellis serve`): free ones, outside the ephemeral range.

Why not bind(0)? The kernel hands out those ports from the ephemeral range, which is also where
every outgoing connection gets its source port: a port that was free when picked can be taken, a
moment later, by a health check or a gloo connection of the mesh being started, and the listener
that wanted it fails ("Address already in use"). Ports below the ephemeral range are never given
to outgoing connections, so once free they stay free for whoever was told to bind them. Each port
is tried on every interface (a UCX listener binds all of them), and the ports of one call are held
open together so they differ.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below this lie well-known services' ports
ATTEMPTS = 512


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bind(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind(("", port))
    except OSError:
        s.close()
        return None
    return s


def _hold_run(n: int, rng: random.Random, high: int, held: set[int]) -> list[socket.socket]:
    """n consecutive ports below `high`, bound and held; OSError when none are found."""
    if high - n <= LOWEST:  # no room below the ephemeral range: let the kernel pick
        first = socket.socket()
        first.bind(("", 0))
        socks = [first]
        for port in range(first.getsockname()[1] + 1, first.getsockname()[1] + n):
            if (s := _bind(port)) is None:
                for t in socks:
                    t.close()
                raise OSError(f"no {n} consecutive free ports")
            socks.append(s)
        return socks
    for _ in range(ATTEMPTS):
        start = rng.randrange(LOWEST, high - n + 1)
        if any(p in held for p in range(start, start + n)):
            continue
        socks = []
        for port in range(start, start + n):
            if (s := _bind(port)) is None:
                break
            socks.append(s)
        if len(socks) == n:
            return socks
        for s in socks:
            s.close()
    raise OSError(f"no {n} consecutive free ports below {high} after {ATTEMPTS} tries")


def free_port_runs(sizes: list[int], host: str = "127.0.0.1", attempts: int = ATTEMPTS) -> list[int]:
    """For each size n, the first of n consecutive ports that were free a moment ago (all distinct:
    held open together). E.g. a stage whose TP rank r listens on ucx_port + r (trellis.core.spec).
    `host` and `attempts` are kept for callers; every interface is checked."""
    del host, attempts
    rng = random.Random()  # seeded from the OS: concurrent callers pick different ports
    high = _ephemeral_start()
    held: list[socket.socket] = []
    starts = []
    try:
        for n in sizes:
            run = _hold_run(n, rng, high, {s.getsockname()[1] for s in held})
            held.extend(run)
            starts.append(run[0].getsockname()[1])
        return starts
    finally:
        for s in held:
            s.close()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago, outside the ephemeral range."""
    return free_port_runs([1] * n, host)

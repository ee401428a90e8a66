"""Ports for local runs (the demo, tests): ask the OS for free ones."""

from __future__ import annotations

import socket


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_runs(sizes: list[int], host: str = "127.0.0.1", attempts: int = 64) -> list[int]:
    """For each size n, the first of n consecutive ports that were free a moment ago (all distinct:
    held open together). E.g. a stage whose TP rank r listens on ucx_port + r (trellis.core.spec)."""
    held: list[socket.socket] = []
    starts = []
    try:
        for n in sizes:
            for _ in range(attempts):
                run = [socket.socket()]
                try:
                    run[0].bind((host, 0))
                    start = run[0].getsockname()[1]
                    for port in range(start + 1, start + n):
                        run.append(socket.socket())
                        run[-1].bind((host, port))
                except (OSError, OverflowError):  # taken, or past 65535: try another start
                    for s in run:
                        s.close()
                    continue
                held.extend(run)
                starts.append(start)
                break
            else:
                raise OSError(f"no {n} consecutive free ports on {host} after {attempts} tries")
        return starts
    finally:
        for s in held:
            s.close()

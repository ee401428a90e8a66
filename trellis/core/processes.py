"""Process life, written once: start a Python module as a child that dies with its parent, and
leave a process at once. Stdlib only, so deploy, runtime and services all use it.

    python -m trellis.core.processes --parent PID MODULE [ARGS...]

is how a child starts: it arms the parent-death signal, checks that its parent is still there (it
may have died before the signal was armed), then runs MODULE as `python -m MODULE ARGS` would.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, NoReturn

PR_SET_PDEATHSIG = 1
LAUNCHER = "trellis.core.processes"  # this module, run as a child's entry point


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (e.g. after its
    parent's kill -9), so that no child outlives its parent. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn_module(
    module: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | None = None,
    stderr: IO[bytes] | None = None,
) -> subprocess.Popen:
    """Start `python -m module args` with this interpreter, as a child that dies with its parent.

    The child arms the signal itself (see the module docstring) rather than in a preexec_fn, which
    is unsafe in a parent with threads (a stage leader has compute, UCX and gRPC threads)."""
    argv = [sys.executable, "-m", LAUNCHER, "--parent", str(os.getpid()), module, *args]
    return subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr)


def exit_now(code: int) -> NoReturn:
    """Flush and leave without interpreter teardown: a thread stuck in a collective (a dead NCCL
    peer) or a communicator left to exit must not hold the exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_child(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--parent":
        sys.exit("usage: python -m trellis.core.processes --parent PID MODULE [ARGS...]")
    parent, module = int(argv[1]), argv[2]
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the signal was armed
        exit_now(1)
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _run_child(sys.argv[1:])

"""A real, throwaway redis-server for tests: a free port, a temp dir, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


class RedisServerMissing(RuntimeError):
    """No redis-server binary on PATH."""


class RedisServerFailed(RuntimeError):
    """redis-server did not come up."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Start with `start()` (or `with RedisServer() as srv:`), connect to `srv.url`, `stop()` at the end."""

    def __init__(self, binary: str | None = None, start_timeout_s: float = 10.0) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisServerMissing("redis-server not found on PATH (scripts/ensure-redis.sh installs it)")
        self.binary = found
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._dir = tempfile.TemporaryDirectory(prefix="trellis-redis-")
        # Another process may grab the free port before redis binds it: try a few.
        for _ in range(5):
            self.port = free_port()
            if self._launch(Path(self._dir.name)):
                return self
        tail = self._log_tail()
        self.stop()
        raise RedisServerFailed(f"redis-server did not start; its log ends with:\n{tail}")

    @property
    def pid(self) -> int:
        """The server's process id (a test may kill or stop it)."""
        if self._proc is None:
            raise RedisServerFailed("redis-server is not running")
        return self._proc.pid

    def restart(self) -> None:
        """Start it again on the same port, empty, after it died (a test killed it)."""
        if self._proc is not None:
            self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is None or not self._launch(Path(self._dir.name)):
            raise RedisServerFailed(f"redis-server did not restart on port {self.port}: {self._log_tail()}")

    def _launch(self, workdir: Path) -> bool:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--logfile",
            str(workdir / "redis.log"),
        ]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False  # exited, e.g. the port was taken
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.02)
        finally:
            client.close()
        self._terminate()
        return False

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        log = Path(self._dir.name) / "redis.log"
        return "\n".join(log.read_text().splitlines()[-10:]) if log.exists() else "(no log)"

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        self._terminate()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""The mesh's commands as a user runs them (real subprocesses):

- a malformed spec makes the router, a stage worker and `trellis up` exit non-zero with one line on
  stderr naming the field at fault, never a traceback;
- `trellis up SPEC` serves, `trellis generate --router` prints what offline `trellis generate` prints
  for the same checkpoint, and SIGTERM stops it with exit 0 and no process left behind.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.mesh_fixtures import descendants, pid_alive
from trellis.deploy.local_spec import local_spec

pytestmark = pytest.mark.timeout(420)

PY = sys.executable
ENV = {**os.environ, "TRELLIS_LOG_LEVEL": "WARNING"}
SERVE_TIMEOUT_S = 240.0

COMMANDS = {
    "router": [PY, "-m", "services.router", "--spec"],
    "stage_worker": [PY, "-m", "services.stage_worker", "--replica", "r0", "--stage", "0", "--spec"],
    "trellis up": [PY, "-m", "trellis.cli", "up"],
}


def stage(raw: dict[str, Any], j: int) -> dict[str, Any]:
    return raw["replicas"][0]["stages"][j]


# (case id, edit of a good spec's YAML data (or the file's text), the field the message must name, words)
BAD_SPECS: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    ("unknown field", lambda r: stage(r, 0).update(tpp=2), "replicas[0].stages[0].tpp", "unknown field"),
    ("tp zero", lambda r: stage(r, 1).update(tp=0), "replicas[0].stages[1].tp", "must be >= 1"),
    ("tp splits no heads", lambda r: stage(r, 0).update(tp=3), "replicas[0].stages[0].tp", "does not divide"),
    (
        "layers not tiling",
        lambda r: stage(r, 1).update(layers=[3, 4]),
        "replicas[0].stages[1].layers",
        "expected 2",
    ),
    (
        "overlapping ports",
        lambda r: stage(r, 1).update(port=stage(r, 0)["port"]),
        "replicas[0].stages[1].port",
        "already used by replicas[0].stages[0].port",
    ),
    ("missing model", lambda r: r["model"].update(path="/nonexistent/model"), "model.path", "does not exist"),
    ("bad YAML", lambda r: "model: {path: [unclosed\n", "", "not valid YAML (line"),
]


@pytest.fixture(scope="module")
def good_spec(plain_ckpt: Path) -> dict[str, Any]:
    return local_spec(str(plain_ckpt), replicas=1, stages=2, tp=2).to_dict()


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("edit", "field", "words"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_a_malformed_spec_is_one_line_naming_the_field(
    tmp_path: Path,
    good_spec: dict[str, Any],
    command: str,
    edit: Callable[[dict[str, Any]], Any],
    field: str,
    words: str,
) -> None:
    raw = copy.deepcopy(good_spec)
    text = edit(raw)
    path = tmp_path / "spec.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(raw))
    done = subprocess.run(
        [*COMMANDS[command], str(path)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: {field}" in lines[0] and words in lines[0], lines[0]


# ---- trellis up ------------------------------------------------------------------------------------


class Lines:
    """A process's stdout, line by line, read on a thread (so waiting for a line can time out)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"no line matching {pattern!r}; got: {self.seen}")


@pytest.fixture
def up(tmp_path: Path, tokenized_ckpt: Path) -> Iterator[tuple[subprocess.Popen, Lines, Path]]:
    """`trellis up SPEC` for 1 replica x 2 stages x TP 2, killed (with its children) if a test leaves it."""
    spec = tmp_path / "mesh.yaml"
    local_spec(str(tokenized_ckpt), replicas=1, stages=2, tp=2).dump(spec)
    stderr = (tmp_path / "up.stderr").open("w")
    proc = subprocess.Popen(
        [PY, "-m", "trellis.cli", "up", str(spec)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        yield proc, Lines(proc), spec
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
        stderr.close()


def generate(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [PY, "-m", "trellis.cli", "generate", *args, "--max-tokens", "12", "--ignore-eos", "--json"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds text (e.g. the spec's path)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and text in cmdline and pid_alive(int(entry)):
            out.append(int(entry))
    return out


def test_trellis_up_serves_like_offline_and_stops_cleanly(
    up: tuple[subprocess.Popen, Lines, Path], tokenized_ckpt: Path
) -> None:
    proc, lines, spec = up
    address = lines.wait_for(r"serving: router at (\S+)", SERVE_TIMEOUT_S).group(1)
    children = descendants(proc.pid)
    assert len(children) == 1 + 2 * 2  # the router and 2 stages x TP 2 ranks
    prompts = ["--prompt-ids", "1,2,3,4,5", "--prompt-ids", "300,7", "Trellis serves café"]

    remote = generate("--router", address, *prompts)
    offline = generate("--model", str(tokenized_ckpt), *prompts)
    assert remote == offline
    assert [len(r["token_ids"]) for r in remote] == [12, 12, 12] and remote[2]["text"]

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    lines.wait_for(r"stopped", 5.0)
    assert [p for p in children if pid_alive(p)] == []
    assert processes_naming(str(spec)) == []

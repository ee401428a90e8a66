"""Issue 2 acceptance: `trellis generate` (a real subprocess) turns bad input into one line on stderr
that names the problem and a non-zero exit, never a traceback. And an engine whose later stage cannot
load fails at once with a clear error instead of waiting for a ring that will never form."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_checkpoint
from tests.integration.engine_cases import small_cpu_env
from trellis.engine import Engine, EngineArgs, EngineError

KIND = "llama-gqa"  # 8 attention heads, 2 kv heads, 4 layers, 512 positions
CLI_TIMEOUT_S = 120
WRONG_SHAPE_TENSOR = "model.layers.3.mlp.down_proj.weight"  # read only by the last stage of PP 2


def trellis_exe() -> str:
    exe = Path(sys.executable).with_name("trellis")
    return str(exe) if exe.exists() else shutil.which("trellis") or "trellis"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(KIND, tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(KIND, tmp_path_factory.mktemp("sharded") / "ckpt", shards=3)


@pytest.fixture
def broken(tmp_path: Path) -> Callable[[Path], Path]:
    """A fresh copy of a checkpoint to damage."""

    def copy(source: Path) -> Path:
        return Path(shutil.copytree(source, tmp_path / "broken"))

    return copy


def corrupt_config(path: Path) -> None:
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 6')


def truncate_weights(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def drop_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


def garble_last_shard(path: Path) -> None:
    last = sorted(path.glob("model-*.safetensors"))[-1]
    last.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json at all")


def change_architecture(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))


def wrong_tensor_shape(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors[WRONG_SHAPE_TENSOR] = tensors[WRONG_SHAPE_TENSOR][:, :100].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


# name -> (which checkpoint, how to damage a copy of it (None: use as is), extra CLI args, what stderr says)
CASES: dict[str, tuple[str, Callable[[Path], None] | None, list[str], str]] = {
    "missing-directory": ("none", None, [], "does not exist"),
    "corrupt-config": ("good", corrupt_config, [], "config.json is not valid JSON"),
    "truncated-safetensors": ("good", truncate_weights, [], "cannot open safetensors file"),
    "missing-safetensors": ("good", drop_weights, [], "no model.safetensors"),
    "corrupt-last-shard-pp2": ("sharded", garble_last_shard, ["--pp", "2"], "cannot open safetensors file"),
    "wrong-tensor-shape": ("good", wrong_tensor_shape, [], WRONG_SHAPE_TENSOR),
    "unsupported-architecture": ("good", change_architecture, [], "unsupported architecture 'GPT2"),
    "tp-not-dividing-heads": ("good", None, ["--tp", "3"], "tensor parallel size 3 does not divide the 8"),
    "pp-above-layer-count": ("good", None, ["--pp", "5"], "PP 5 is larger than the model's 4 layers"),
    "prompt-beyond-context": ("good", None, ["--prompt-ids", ",".join(["7"] * 600)], "600 tokens"),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with small_cpu_env():
        yield


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(
    case: str, tmp_path: Path, good: Path, sharded: Path, broken: Callable[[Path], Path]
) -> None:
    source, damage, extra, expected = CASES[case]
    if source == "none":
        model = tmp_path / "no-such-model"
    elif damage is None:
        model = good
    else:
        model = broken(good if source == "good" else sharded)
        damage(model)
    cmd = [trellis_exe(), "generate", "--model", str(model), "--prompt-ids", "1,2,3", "--max-tokens", "4"]
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, f"{case}: exit 0; stdout: {proc.stdout!r}"
    assert "Traceback" not in proc.stderr, f"{case}: traceback on stderr:\n{proc.stderr}"
    assert len(lines) == 1, f"{case}: expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("trellis: error: ")
    assert expected in lines[0], f"{case}: {expected!r} not in {lines[0]!r}"
    assert proc.stdout == ""


@pytest.mark.timeout(120)
def test_a_stage_that_cannot_load_fails_the_engine_fast(tmp_path: Path, good: Path) -> None:
    """The last stage's tensor has the wrong shape: its process exits while the head waits to link."""
    model = Path(shutil.copytree(good, tmp_path / "ckpt"))
    wrong_tensor_shape(model)
    started = time.monotonic()
    with pytest.raises(EngineError, match="stage 1 exited with code 1 while starting"):
        Engine(EngineArgs(model=str(model), pp=2))
    assert time.monotonic() - started < 60

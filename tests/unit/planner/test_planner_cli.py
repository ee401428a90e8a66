"""`trellis plan` end to end: the report, JSON, exit codes and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trellis.core.spec import load
from trellis.planner import cli


def plan(capsys: pytest.CaptureFixture[str], args: str, *more: str) -> tuple[int, str, str]:
    """Run the CLI with ``args`` (split on spaces) and ``more`` (taken whole); return code, stdout, stderr."""
    code = cli.main([*args.split(), *more])
    out, err = capsys.readouterr()
    return code, out, err


def test_classic_refusal_shows_the_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = plan(capsys, "--model llama-3-70b --dtype fp16 --gpu h100-sxm --gpus-per-node 1")
    assert code == 1 and not err
    assert "REFUSED: llama-3-70b in fp16 fits no layout of 1 x h100-sxm" in out
    assert "= 141.11 GB" in out and "short by 69.85 GB per GPU" in out
    assert "327,680 bytes per token" in out


def test_one_node_report_and_simulation(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys, "plan --model llama-3-70b --gpu h100-sxm --simulate 2000")
    assert code == 0
    assert "Best plan: TP 4 x PP 1 x DP 2 = 8 GPUs" in out
    expected = ("weights read", "KV read", "all-reduce    160 x", "TPOT", "why it loses", "Simulated: 2,000")
    assert all(line in out for line in expected)


def test_json_output_is_complete(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(
        capsys, "--model llama-3.1-405b --gpu h100-sxm --nodes 4 --json --simulate 500 --rate 1"
    )
    doc = json.loads(out)
    assert code == 0
    assert doc["model"]["kv_bytes_per_token"] == 2 * 126 * 8 * 128 * 2
    assert doc["best"]["tp"] == 8 and doc["best"]["rate_req_s"] == pytest.approx(1.0, rel=1e-3)
    assert doc["simulation"]["requests"] == 500
    assert {"why", "capacity_req_s", "memory_per_gpu"} <= set(doc["candidates"][0])


def test_emit_spec_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spec.yaml"
    code, out, _ = plan(
        capsys, "--model llama-3-70b --gpu h100-sxm --nodes 2 --base-port 41000 --emit-spec", str(path)
    )
    assert code == 0 and "Wrote the deploy spec" in out
    spec = load(path)
    assert spec.router.port == 41000 and len(spec.replicas) == 4
    spec.check_layers(80)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "llama-9", "--gpu", "h100-sxm"], "unknown model 'llama-9'"),
        (["--model", "llama-3-8b", "--gpu", "b300"], "unknown GPU 'b300'"),
        (["--model", "llama-3-8b", "--gpu", "h100-sxm", "--nodes", "0"], "nodes must be >= 1"),
        (["--model", "llama-3-8b"], "--gpu TYPE"),
        (["--gpu", "h100-sxm"], "--model is required"),
        (["--model", "llama-3-8b", "--gpu", "h100-sxm", "--prompt-len", "many"], "--prompt-len"),
        (["--model", "llama-3-8b", "--gpu", "h100-sxm", "--rate", "1", "--concurrency", "2"], "not both"),
        (["--model", "llama-3-8b", "--gpu", "h100-sxm", "--cluster", "x.yaml"], "not both"),
        (["--model", "llama-3-8b", "--cluster", "/nonexistent/c.yaml"], "cannot read the cluster file"),
        (["--model", "llama-3-8b", "--gpu", "h100-sxm", "--calibration", "/nonexistent.json"], "calibration"),
        (
            ["--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "3"],
            "TP 3 does not divide the 64 attention",
        ),
        (["--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "16"], "add --cross-node-tp"),
        (["--model", "llama-3-8b", "--gpu", "h100-sxm", "--pp", "40"], "only 32 layers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = plan(capsys, "", *argv)
    assert code == 2 and not out
    assert err.startswith("trellis plan: error: ") and message in err and err.count("\n") == 1


def test_inconsistent_cluster_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("gpu: h100-sxm\nnodes: 3\nhosts: [a, b]\n")
    code, _, err = plan(capsys, "--model llama-3-8b --cluster", str(f))
    assert code == 2 and "inconsistent cluster: 2 hosts named but nodes is 3" in err


def test_nothing_meets_the_slo_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys, "--model llama-3-70b --gpu h100-sxm --tpot-slo 0.001")
    assert code == 1 and "No layout meets the SLOs" in out and "misses the TPOT SLO even alone" in out


def test_closed_loop_clients(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = plan(capsys, "--model llama-3-8b --gpu h100-sxm --concurrency 64 --simulate 1000")
    assert code == 0 and "at 64 clients (closed loop)" in out
    # 64 clients over 8 replicas: 8 requests each, most decoding, the rest prefilling or queued.
    decoding = int(re.search(r"Load:\s+(\d+) seqs decoding per replica", out).group(1))  # type: ignore[union-attr]
    assert 5 <= decoding <= 8


def test_add_parser_wires_into_a_parent_parser() -> None:
    parser = argparse.ArgumentParser(prog="trellis")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--model", "llama-3-8b", "--gpu", "h200", "--tp", "2"])
    assert args.command == "plan" and args.tp == 2 and args.max_batched_tokens == 2048
    assert args.func is cli.run


def test_module_runs_as_a_program() -> None:
    argv = ["--model", "mistral-7b", "--gpu", "a100-80g", "--objective", "latency", "--top", "3"]
    cmd = [sys.executable, "-m", "trellis.planner.cli", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Best plan: TP 8 x PP 1" in proc.stdout

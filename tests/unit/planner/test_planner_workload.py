"""Workload lengths, sampling and clusters from YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trellis.planner.errors import PlanError
from trellis.planner.hardware import load_cluster, parse_cluster
from trellis.planner.workload import Workload, parse_lengths, sample_requests


def test_length_forms_and_their_statistics() -> None:
    fixed = parse_lengths("512", "x", 8192)
    assert (fixed.mean(), fixed.p99(), fixed.maximum()) == (512, 512, 512)
    uni = parse_lengths("uniform:100:300", "x", 8192)
    assert uni.mean() == 200 and uni.maximum() == 300 and uni.p99() == 298
    logn = parse_lengths("lognormal:1000:0.5", "x", 4000)
    assert logn.maximum() == 4000
    samples = logn.sample(np.random.default_rng(0), 200_000)
    assert samples.mean() == pytest.approx(1000, rel=0.02) and samples.max() <= 4000
    assert np.percentile(samples, 99) == pytest.approx(logn.p99(), rel=0.03)


@pytest.mark.parametrize("text", ["abc", "uniform:5", "uniform:9:3", "lognormal:100", "0", "normal:1:2"])
def test_bad_lengths_are_one_clear_error(text: str) -> None:
    with pytest.raises(PlanError, match="--prompt-len"):
        parse_lengths(text, "--prompt-len", 8192)


def test_sampled_requests_are_poisson_and_clipped() -> None:
    w = Workload(
        parse_lengths("lognormal:3000:1.0", "p", 8192), parse_lengths("uniform:1:500", "o", 8192), rate=50.0
    )
    r = sample_requests(w, 50_000, seed=1, max_len=4096)
    gaps = np.diff(r.arrival)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.02) and gaps.std() == pytest.approx(1 / 50, rel=0.03)
    assert np.all(r.prompt + r.output <= 4096) and np.all(r.output >= 1)
    again = sample_requests(w, 50_000, seed=1, max_len=4096)
    assert np.array_equal(r.prompt, again.prompt)


def test_cluster_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "gpu: {preset: h100-sxm, memory_gb: 64}\nnodes: 2\ngpus_per_node: 4\n"
        "inter_node: {kind: ethernet, gb_per_s: 25, latency_us: 8}\n"
    )
    c = load_cluster(f)
    assert c.total_gpus == 8 and c.gpu.memory_bytes == 64e9 and c.gpu.hbm_bytes_per_s == 3.35e12
    assert c.inter.kind == "ethernet" and c.inter.bytes_per_s == 25e9 and c.intra.kind == "nvlink"
    custom = parse_cluster({"gpu": {"name": "x1", "memory_gb": 32, "hbm_tb_per_s": 1, "bf16_tflops": 100}})
    assert custom.gpu.name == "x1" and custom.gpu.fp8_flops is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"gpu": "h900"}, "unknown GPU 'h900'"),
        ({"gpu": "h100-sxm", "nodes": 0}, "nodes must be >= 1"),
        ({"gpu": "h100-sxm", "nodes": 3, "hosts": ["a", "b"]}, "2 hosts named but nodes is 3"),
        ({"gpu": "h100-sxm", "hosts": ["a", "a"]}, "named twice"),
        ({"gpu": "h100-sxm", "intra_node": {"kind": "infiniband"}}, "is a network"),
        ({"gpu": "h100-sxm", "inter_node": {"gb_per_s": 0}}, "bandwidth > 0"),
        ({"gpu": "h100-sxm", "color": "red"}, "unknown field"),
        ({"gpu": {"name": "x"}}, "bf16_tflops: required for a GPU that is not a preset"),
        ({"nodes": 2}, "gpu: required"),
    ],
)
def test_inconsistent_clusters_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_cluster(raw)

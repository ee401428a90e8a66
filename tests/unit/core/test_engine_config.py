"""The one engine configuration: validated once naming the field, whole through JSON, and what a
StageLaunch carries to every rank."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trellis.core.engine_config import EngineConfig
from trellis.core.errors import ConfigError, SpecError
from trellis.core.spec import parse
from trellis.runtime.launch import StageLaunch


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"max_in_flight": 0}, "engine.max_in_flight: must be >= 1, got 0"),
        ({"num_blocks": 0}, "engine.num_blocks: must be >= 1, got 0"),
        ({"decode_burst": 0}, "engine.decode_burst: must be >= 1, got 0"),
        ({"block_size": True}, "engine.block_size: expected int, got True"),
        ({"seed": 1.5}, "engine.seed: expected int, got 1.5"),
        ({"enable_prefix_caching": "no"}, "engine.enable_prefix_caching: expected bool, got 'no'"),
        ({"gpu_memory_utilization": 1.5}, "engine.gpu_memory_utilization: must be in [0.05, 1], got 1.5"),
        ({"link_timeout_s": 0}, "engine.link_timeout_s: must be > 0, got 0"),
        ({"seed": 2**63}, "engine.seed: must be < 2^63"),
    ],
)
def test_a_bad_knob_is_refused_naming_the_field(knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        EngineConfig(**knobs)
    assert str(err.value).startswith(message), str(err.value)


def test_none_means_unset_and_ints_pass_for_floats() -> None:
    cfg = EngineConfig(num_blocks=None, max_in_flight=None, stop_timeout_s=5)
    assert cfg.in_flight(3) == 3 and EngineConfig(max_in_flight=1).in_flight(3) == 1


def test_the_config_travels_whole_through_json() -> None:
    cfg = EngineConfig(seed=7, num_blocks=12, enable_prefix_caching=False, link_timeout_s=9.5)
    assert EngineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"^engine\.blocks: unknown field"):
        EngineConfig.from_dict({"blocks": 3})


def test_every_knob_can_be_set_in_a_spec_and_a_bad_one_is_a_spec_error() -> None:
    knobs = EngineConfig(seed=3, max_in_flight=2, one_shot_max_bytes=4096, lease_ttl_s=6.0).to_dict()
    raw = {
        "model": {"preset": "tiny", "load_format": "dummy"},
        "replicas": [{"name": "r", "stages": [{"layers": [0, 1]}]}],
        "engine": knobs,
    }
    assert parse(raw).engine.to_dict() == knobs
    with pytest.raises(SpecError, match=r"^engine\.max_in_flight: must be >= 1, got 0$"):
        parse({**raw, "engine": {"max_in_flight": 0}})


def test_a_stage_launch_round_trips_through_json() -> None:
    launch = StageLaunch(
        model_path=None,
        preset="tiny",
        load_format="dummy",
        dtype="float32",
        max_model_len=128,
        replica="r0",
        layers=(0, 2),
        stage=0,
        num_stages=2,
        tp=2,
        device="cpu",
        gpus=(),
        dist_host="127.0.0.1",
        dist_port=7005,
        ucx_ports=(7001, 7002),
        next_host="127.0.0.1",
        next_ucx_ports=(7011, 7012),
        engine=EngineConfig(seed=5, decode_burst=2),
    )
    assert StageLaunch.from_json(launch.to_json()) == launch
    with pytest.raises(TypeError):
        StageLaunch("x")  # type: ignore[misc]  # keyword-only

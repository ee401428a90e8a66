"""The deploy spec: a valid spec round-trips; every malformed one is rejected naming the field at fault."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trellis.core.spec import DeploySpec, SpecError, load, parse


def good() -> dict[str, Any]:
    """One replica of two stages, one replica of one stage: every section present."""
    return {
        "model": {"path": "/models/llama", "dtype": "float32", "max_model_len": 256},
        "replicas": [
            {
                "name": "r0",
                "stages": [
                    {"layers": [0, 2], "tp": 2, "port": 7000, "ucx_port": 7001, "dist_port": 7005},
                    {"layers": [2, 4], "tp": 2, "port": 7010, "ucx_port": 7011, "dist_port": 7015},
                ],
            },
            {"name": "r1", "role": "decode", "stages": [{"layers": [0, 4], "port": 7020, "ucx_port": 7021}]},
        ],
        "router": {"port": 7100, "max_queue": 8},
        "engine": {"block_size": 16, "num_blocks": 64, "cuda_graphs": False},
        "registry": "redis://127.0.0.1:6379/0",
    }


def edited(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    raw = copy.deepcopy(good())
    change(raw)
    return raw


def stage0(raw: dict[str, Any]) -> dict[str, Any]:
    return raw["replicas"][0]["stages"][0]


def test_a_good_spec_parses_and_round_trips(tmp_path: Path) -> None:
    spec = parse(good())
    assert [r.name for r in spec.replicas] == ["r0", "r1"]
    assert spec.replicas[0].stages[1].layers == (2, 4)
    assert spec.replicas[1].role == "decode"
    assert (spec.router.port, spec.router.max_queue, spec.engine.num_blocks) == (7100, 8, 64)
    spec.check_layers(4)
    path = tmp_path / "spec.yaml"
    spec.dump(path)
    assert load(path) == spec


def test_defaults_fill_what_is_left_out() -> None:
    spec = parse(
        {
            "model": {"preset": "tiny", "load_format": "dummy"},
            "replicas": [{"name": "only", "stages": [{"layers": [0, 1]}]}],
        }
    )
    assert spec.registry == "embedded"
    assert spec.router.max_queue > 0 and spec.engine.block_size > 0
    assert spec.replicas[0].stages[0].tp == 1 and spec.replicas[0].stages[0].device == "cpu"


# (case id, edit of the good spec, the field path the message must start with, words it must hold)
MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("missing model", lambda r: r.pop("model"), "spec.model", "required"),
    ("missing replicas", lambda r: r.pop("replicas"), "spec.replicas", "required"),
    ("unknown top-level field", lambda r: r.update(replica=[]), "spec.replica", "unknown field"),
    ("unknown stage field", lambda r: stage0(r).update(gpu=0), "replicas[0].stages[0].gpu", "unknown field"),
    ("no model path nor preset", lambda r: r["model"].pop("path"), "model.path", "exactly one"),
    ("both path and preset", lambda r: r["model"].update(preset="tiny"), "model.path", "exactly one"),
    ("preset with real weights", lambda r: r.update(model={"preset": "tiny"}), "model.load_format", "dummy"),
    ("bad dtype", lambda r: r["model"].update(dtype="fp8"), "model.dtype", "one of"),
    ("zero max_model_len", lambda r: r["model"].update(max_model_len=0), "model.max_model_len", ">= 1"),
    ("tp zero", lambda r: stage0(r).update(tp=0), "replicas[0].stages[0].tp", ">= 1"),
    ("tp as text", lambda r: stage0(r).update(tp="two"), "replicas[0].stages[0].tp", "expected int"),
    ("tp as a boolean", lambda r: stage0(r).update(tp=True), "replicas[0].stages[0].tp", "expected int"),
    (
        "layers reversed",
        lambda r: stage0(r).update(layers=[2, 0]),
        "replicas[0].stages[0].layers",
        "start < end",
    ),
    (
        "layers not a pair",
        lambda r: stage0(r).update(layers=[0]),
        "replicas[0].stages[0].layers",
        "two integers",
    ),
    ("layers missing", lambda r: stage0(r).pop("layers"), "replicas[0].stages[0].layers", "required"),
    ("bad device", lambda r: stage0(r).update(device="tpu"), "replicas[0].stages[0].device", "one of"),
    (
        "cuda without gpus",
        lambda r: stage0(r).update(device="cuda"),
        "replicas[0].stages[0].gpus",
        "one GPU per",
    ),
    ("gpus on cpu", lambda r: stage0(r).update(gpus=[0, 1]), "replicas[0].stages[0].gpus", "takes no GPUs"),
    (
        "port out of range",
        lambda r: stage0(r).update(port=70000),
        "replicas[0].stages[0].port",
        "out of range",
    ),
    ("negative port", lambda r: r["router"].update(port=-1), "router.port", ">= 0"),
    (
        "port overlaps the router",
        lambda r: r["replicas"][1]["stages"][0].update(port=7100),
        "replicas[1].stages[0].port",
        "router.port",
    ),
    (
        "ports overlap across stages",
        lambda r: r["replicas"][0]["stages"][1].update(ucx_port=7001),
        "replicas[0].stages[1].ucx_port",
        "replicas[0].stages[0].ucx_port",
    ),
    (
        "a TP rank's UCX port overlaps",  # rank 1 of stage 0 listens on ucx_port + 1 = 7002
        lambda r: stage0(r).update(dist_port=7002),
        "replicas[0].stages[0].dist_port",
        "TP rank 1's UCX port",
    ),
    (
        "a TP rank's UCX port out of range",
        lambda r: stage0(r).update(ucx_port=65535),
        "replicas[0].stages[0].ucx_port",
        "past 65535",
    ),
    ("duplicate replica name", lambda r: r["replicas"][1].update(name="r0"), "replicas[1].name", "duplicate"),
    ("no stages", lambda r: r["replicas"][0].update(stages=[]), "replicas[0].stages", "non-empty"),
    ("no replicas", lambda r: r.update(replicas=[]), "replicas", "non-empty"),
    ("bad role", lambda r: r["replicas"][0].update(role="leader"), "replicas[0].role", "one of"),
    (
        "stage not a mapping",
        lambda r: r["replicas"][0]["stages"].__setitem__(1, [2, 4]),
        "replicas[0].stages[1]",
        "mapping",
    ),
    ("zero max_queue", lambda r: r["router"].update(max_queue=0), "router.max_queue", ">= 1"),
    ("bad registry", lambda r: r.update(registry="etcd://x"), "registry", "redis://"),
    ("cuda_graphs not a bool", lambda r: r["engine"].update(cuda_graphs="yes"), "engine.cuda_graphs", "bool"),
    ("unknown engine field", lambda r: r["engine"].update(blocks=3), "engine.blocks", "unknown field"),
]


@pytest.mark.parametrize(
    ("change", "field", "words"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_spec_names_the_field(
    change: Callable[[dict[str, Any]], None], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        parse(edited(change))
    message = str(err.value)
    assert message.startswith(f"{field}:"), message
    assert words in message, message
    assert "\n" not in message


def test_a_spec_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"^spec: expected a mapping, got list"):
        parse([good()])


@pytest.mark.parametrize(
    ("stages", "field", "words"),
    [
        ([[0, 2], [3, 4]], "replicas[0].stages[1].layers", "starts at 3, expected 2"),
        ([[1, 2], [2, 4]], "replicas[0].stages[0].layers", "starts at 1, expected 0"),
        ([[0, 2], [2, 3]], "replicas[0].stages", "cover layers [0, 3) but the model has 4"),
    ],
    ids=["gap", "late start", "short"],
)
def test_stage_layers_must_tile_the_model(stages: list[list[int]], field: str, words: str) -> None:
    raw = good()
    for st, layers in zip(raw["replicas"][0]["stages"], stages, strict=True):
        st["layers"] = layers
    spec = parse(raw)
    with pytest.raises(SpecError) as err:
        spec.check_layers(4)
    assert str(err.value).startswith(f"{field}:") and words in str(err.value), str(err.value)


def test_load_reports_bad_yaml_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: /m\nreplicas: [\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        load(bad)
    with pytest.raises(SpecError, match=r"nope\.yaml: cannot read the spec"):
        load(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match=r"^spec: expected a mapping"):
        load(empty)


def test_load_names_a_field_deep_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    DeploySpec.dump(parse(good()), path)
    path.write_text(path.read_text().replace("tp: 2", "tp: -2", 1))
    with pytest.raises(SpecError, match=r"^replicas\[0\]\.stages\[0\]\.tp: must be >= 1, got -2"):
        load(path)


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory with only its config.json: all check_model reads."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return tmp_path


def with_model(path: Path, change: Callable[[dict[str, Any]], None] = lambda r: None) -> DeploySpec:
    raw = edited(change)
    raw["model"]["path"] = str(path)
    return parse(raw)


def test_check_model_accepts_a_spec_the_model_fits(model_dir: Path) -> None:
    with_model(model_dir).check_model()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (
            lambda r: stage0(r).update(tp=3),
            "replicas[0].stages[0].tp",
            "does not divide the 8 attention heads",
        ),
        (lambda r: r["replicas"][1]["stages"][0].update(tp=16), "replicas[1].stages[0].tp", "16"),
        (
            lambda r: stage0(r).update(layers=[0, 3]),
            "replicas[0].stages[1].layers",
            "starts at 2, expected 3",
        ),
        (lambda r: r["replicas"][1]["stages"][0].update(layers=[0, 5]), "replicas[1].stages", "model has 4"),
    ],
    ids=["tp splits no heads", "tp larger than the heads", "stages overlap", "more layers than the model"],
)
def test_check_model_names_the_field_the_model_does_not_fit(
    model_dir: Path, change: Callable[[dict[str, Any]], None], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        with_model(model_dir, change).check_model()
    assert str(err.value).startswith(f"{field}:") and words in str(err.value), str(err.value)


def test_only_a_replica_of_several_stages_takes_a_port_per_tp_rank() -> None:
    # One stage hands nothing on: its TP peers listen on no port, so ucx_port + 1 stays free.
    raw = edited(lambda r: r["replicas"][1]["stages"][0].update(tp=2, dist_port=7022))
    assert parse(raw).replicas[1].stages[0].tp == 2


def test_check_model_wants_one_tp_size_per_replica(model_dir: Path) -> None:
    spec = with_model(model_dir, lambda r: r["replicas"][0]["stages"][1].update(tp=1))
    with pytest.raises(SpecError, match=r"^replicas\[0\]\.stages\[1\]\.tp: 1, but stage 0 has 2: .*same TP"):
        spec.check_model()


def test_check_model_wants_tp_to_split_the_hidden_states(tmp_path: Path) -> None:
    # 8 heads of 8 dimensions over a residual stream of 65 columns: TP 2 splits the heads, not it.
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "hidden_size": 65, "head_dim": 8}))
    with pytest.raises(SpecError, match=r"^replicas\[0\]\.stages\[0\]\.tp: hidden_size 65 .* TP size 2"):
        with_model(tmp_path).check_model()


def test_check_model_names_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^model\.path: .*does not exist"):
        with_model(tmp_path / "nowhere").check_model()
    preset = parse(
        {
            "model": {"preset": "no-such-model", "load_format": "dummy"},
            "replicas": [{"name": "r", "stages": [{"layers": [0, 1]}]}],
        }
    )
    with pytest.raises(SpecError, match=r"^model\.preset: unknown model preset"):
        preset.check_model()

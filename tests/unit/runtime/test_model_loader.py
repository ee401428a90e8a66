"""Loading checkpoints: each rank reads only its stage's layers and its TP slice, sharded indexes,
tied embeddings on a later stage, dummy weights, and a clear ModelError for every broken file."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_checkpoint
from trellis.core.errors import ModelError
from trellis.core.model_config import load_model_config
from trellis.runtime.model.llama import LlamaStageModel
from trellis.runtime.model.loader import build_stage_model, load_weights
from trellis.runtime.model.parallel import TPGroup


@pytest.fixture(scope="module")
def gqa_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def gqa_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-gqa", tmp_path_factory.mktemp("sharded"), shards=3)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama-tied", tmp_path_factory.mktemp("tied"))


def empty_model(path: Path, layers: tuple[int, int], tp: TPGroup) -> LlamaStageModel:
    return LlamaStageModel(load_model_config(path), layers, tp=tp, dtype=torch.float32)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118


def test_sharded_index_loads_the_same_weights(gqa_single: Path, gqa_sharded: Path) -> None:
    index = json.loads((gqa_sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3
    single, sharded = (
        empty_model(gqa_single, (0, 4), TPGroup.single()),
        empty_model(gqa_sharded, (0, 4), TPGroup.single()),
    )
    load_weights(single, gqa_single)
    report = load_weights(sharded, gqa_sharded)
    assert report.files_opened == files
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_rank_reads_only_its_layers_and_slices(gqa_single: Path) -> None:
    shapes = checkpoint_shapes(gqa_single)
    model = empty_model(gqa_single, (2, 4), TPGroup(1, 2))  # last stage, rank 1 of 2
    report = load_weights(model, gqa_single)
    wanted = {n for n in shapes if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(report.elements_read) == wanted | {"model.norm.weight", "lm_head.weight"}
    for name, read in report.elements_read.items():
        numel = torch.Size(shapes[name]).numel()
        if name == "lm_head.weight":
            assert read == (1000 - 512) * 64  # rank 1's vocab shard [512, 1024) holds 488 real rows
        elif len(shapes[name]) == 1:
            assert read == numel  # norms are small and whole on every rank
        else:
            assert read == numel // 2, name


def test_replicated_kv_heads_read_one_head(gqa_single: Path) -> None:
    full_k = load_file(str(gqa_single / "model.safetensors"))["model.layers.0.self_attn.k_proj.weight"]
    k_rows = []
    for rank in range(4):  # 2 kv heads over 4 ranks: ranks 0, 1 share head 0; ranks 2, 3 share head 1
        model = empty_model(gqa_single, (0, 1), TPGroup(rank, 4))
        report = load_weights(model, gqa_single)
        assert report.elements_read["model.layers.0.self_attn.k_proj.weight"] == full_k.numel() // 2
        qkv = model.model.layers["0"].self_attn.qkv_proj
        k_rows.append(qkv.weight[qkv.q_size : qkv.q_size + qkv.kv_size])
    assert torch.equal(k_rows[0], full_k[:8]) and torch.equal(k_rows[1], full_k[:8])
    assert torch.equal(k_rows[2], full_k[8:]) and torch.equal(k_rows[3], full_k[8:])


def test_tied_head_loads_the_embedding_on_a_later_stage(tied: Path) -> None:
    embedding = load_file(str(tied / "model.safetensors"))["model.embed_tokens.weight"]
    assert "lm_head.weight" not in checkpoint_shapes(tied)
    last = empty_model(tied, (2, 4), TPGroup.single())
    report = load_weights(last, tied)
    assert last.model.embed_tokens is None and last.lm_head is not None
    assert report.elements_read["model.embed_tokens.weight"] == embedding.numel()
    assert torch.equal(last.lm_head.weight[:1000], embedding)
    first = empty_model(tied, (0, 2), TPGroup.single())
    report = load_weights(first, tied)
    assert first.lm_head is None and torch.equal(first.model.embed_tokens.weight[:1000], embedding)
    assert not any(name.startswith("model.layers.2.") for name in report.elements_read)


def test_dummy_weights_read_no_files() -> None:
    cfg = load_model_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
        }
    )

    def build(seed: int, rank: int = 0) -> LlamaStageModel:
        return build_stage_model(
            cfg,
            layers=(1, 4),
            tp=TPGroup(rank, 2),
            device=torch.device("cpu"),
            dtype=torch.bfloat16,
            model_path=None,
            load_format="dummy",
            seed=seed,
        )

    a, b, c = build(5), build(5), build(6)
    assert a.model.layers["1"].mlp.gate_up_proj.weight.dtype == torch.bfloat16
    for (name, x), y, z in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), name
        assert torch.isfinite(x.float()).all(), name
        if "norm" in name:
            assert (x == 1).all()
        else:
            assert not torch.equal(x, z), name
    head = build(5, rank=1).lm_head
    assert head is not None and not head.weight[head.valid_rows :].any() and head.valid_rows == 488


def test_bad_load_format_and_missing_path(gqa_single: Path) -> None:
    cfg = load_model_config(gqa_single)
    with pytest.raises(ModelError, match="unknown load_format 'pt'"):
        build_stage_model(
            cfg,
            layers=(0, 4),
            tp=TPGroup.single(),
            device=torch.device("cpu"),
            dtype=torch.float32,
            model_path=str(gqa_single),
            load_format="pt",
        )
    with pytest.raises(ModelError, match="load_format 'auto' needs a model path"):
        build_stage_model(
            cfg,
            layers=(0, 4),
            tp=TPGroup.single(),
            device=torch.device("cpu"),
            dtype=torch.float32,
            model_path=None,
        )


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_files_are_model_errors(gqa_single: Path, gqa_sharded: Path, tmp_path: Path) -> None:
    model = empty_model(gqa_single, (0, 4), TPGroup.single())
    with pytest.raises(ModelError, match=r"model directory .* does not exist"):
        load_weights(model, tmp_path / "absent")
    with pytest.raises(ModelError, match=r"no model.safetensors or model.safetensors.index.json in"):
        load_weights(model, tmp_path)
    broken = copy_checkpoint(gqa_sharded, tmp_path / "sharded")
    second = sorted(broken.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(ModelError, match=rf"{second.name} \(listed in .*index.json\) is missing"):
        load_weights(model, broken)
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not a valid safetensors index"):
        load_weights(model, broken)


def test_corrupt_safetensors_names_the_file(gqa_single: Path, tmp_path: Path) -> None:
    broken = copy_checkpoint(gqa_single, tmp_path / "corrupt")
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match=r"cannot open safetensors file .*model.safetensors"):
        load_weights(empty_model(gqa_single, (0, 4), TPGroup.single()), broken)


def test_truncated_safetensors_names_the_file(gqa_single: Path, tmp_path: Path) -> None:
    broken = copy_checkpoint(gqa_single, tmp_path / "truncated")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"cannot open safetensors file .*truncated/model.safetensors"):
        load_weights(empty_model(gqa_single, (0, 4), TPGroup.single()), broken)


def test_missing_tensor_is_named(gqa_single: Path, tmp_path: Path) -> None:
    broken = copy_checkpoint(gqa_single, tmp_path / "missing")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(
        ModelError, match=r"tensor model\.layers\.3\.mlp\.up_proj\.weight is missing from the checkpoint"
    ):
        load_weights(empty_model(gqa_single, (2, 4), TPGroup.single()), broken)
    load_weights(empty_model(gqa_single, (0, 2), TPGroup.single()), broken)  # a stage that does not need it


def test_wrong_shape_is_named(gqa_single: Path, tmp_path: Path) -> None:
    broken = copy_checkpoint(gqa_single, tmp_path / "shape")
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(
        ModelError, match=r"tensor model.norm.weight: shape mismatch: checkpoint gives \[63\]"
    ):
        load_weights(empty_model(gqa_single, (2, 4), TPGroup.single()), broken)


def test_a_dropped_model_is_freed_without_the_cycle_collector(gqa_single: Path) -> None:
    # Weight loaders must not point back at their module: GPU memory would outlive the model until gc ran.
    model = build_stage_model(
        load_model_config(gqa_single),
        layers=(0, 4),
        tp=TPGroup.single(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        model_path=str(gqa_single),
    )
    weight = weakref.ref(model.model.layers["0"].self_attn.qkv_proj.weight)
    gc.disable()
    try:
        del model
        assert weight() is None
    finally:
        gc.enable()

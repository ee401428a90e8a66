"""P/D on one GPU: a prefill replica and a decode replica (two processes sharing GPU 0) behind the
router, the KV handed over through the decode replica's hand-off slab in GPU memory (opened by the
prefill replica through CUDA IPC), the decode replica's steps in CUDA graphs: greedy tokens equal
transformers' (float32), and both sides' per-slot checksums agree (no voided load). Also the slab's
round trip between two processes, with the code the stages run. Run: pytest -m gpu tests/gpu."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from tests.checkpoints import make_checkpoint, reference_generate
from tests.integration.engine_cases import make_prompts
from tests.mesh_fixtures import StreamReader, head_address, running_mesh, stage_stats, wait_for
from trellis.core.engine_config import EngineConfig
from trellis.deploy.local_spec import local_spec
from trellis.deploy.mesh import health
from trellis.wire.router_client import RouterClient

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
NEW_TOKENS = 8


def test_device_slab_between_two_processes() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "pd_handoff.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--device", "cuda", "--blocks", "64", "--reps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout[out.stdout.index("{") :])
    assert record["checksums_agree"]


@pytest.mark.parametrize("p_stages", [1, 2], ids=["tp1-to-tp1", "pp2-to-tp1"])
def test_pd_mesh_on_one_gpu_is_exact(tmp_path: Path, p_stages: int) -> None:
    ckpt = make_checkpoint("llama-gqa", tmp_path / "ckpt", seed=3)
    prompts = make_prompts(1000, tuple(40 + 9 * i for i in range(12)), seed=4)
    want = reference_generate(ckpt, prompts, NEW_TOKENS)
    spec = local_spec(
        str(ckpt),
        device="cuda",
        dtype="float32",
        shapes=((1, p_stages, "prefill"), (1, 1, "decode")),  # PP 2: two processes each write
        gpus=(0,) * (p_stages + 1),
        engine=EngineConfig(num_blocks=256, max_num_seqs=16, handoff_slots=256),
        router={"max_local_prefill_tokens": 0},
    )
    with running_mesh(spec) as mesh:
        wait_for(lambda: health(mesh.router.address), 120, "router serving")
        with RouterClient(mesh.router.address) as client:
            readers = [
                StreamReader(client.stream(p, max_tokens=NEW_TOKENS, ignore_eos=True, timeout=120))
                for p in prompts
            ]
            results = [r.join(180) for r in readers]
        assert all(r.code == grpc.StatusCode.OK for r in results), [r.details for r in results]
        assert [r.token_ids for r in results] == want
        p_stats, d_stats = (stage_stats(head_address(mesh, r)) for r in ("r0", "r1"))
        assert d_stats.pd_committed == len(prompts) and d_stats.pd_voided == 0 and p_stats.pd_fallbacks == 0
        assert d_stats.pd_blocks_loaded == p_stats.pd_blocks_sent > 0

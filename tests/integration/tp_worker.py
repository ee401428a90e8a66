"""One TP rank of a real multi-process stage, spawned by test_tp_runner.py: joins a gloo group, builds
its runners (one per pipeline stage, run one after the other), drives the prompts, and reports back.
Kept apart from the test module so spawned ranks do not import transformers.
"""

from __future__ import annotations

import json
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tests.stage_driver import drive
from trellis.core.model_config import load_model_config
from trellis.core.sampling import SamplingParams
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import StageRunner


def run_rank(rank: int, world: int, port: int, scenario: dict[str, Any], results: Any) -> None:
    """Put one JSON report on ``results``: this rank's tokens and first-step logits, or its error."""
    torch.set_num_threads(1)  # ranks share two cores
    try:
        # A short collective timeout: if a peer dies, the others fail fast instead of hanging.
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        tp = TPGroup.from_world()
        cfg = load_model_config(scenario["path"])
        runners = [
            StageRunner(
                cfg,
                layers=tuple(layers),
                tp=tp,
                device=torch.device("cpu"),
                dtype=torch.float32,
                block_size=scenario["block_size"],
                num_blocks=scenario["num_blocks"],
                model_path=scenario["path"],
            )
            for layers in scenario["stages"]
        ]
        sampling = [SamplingParams(**params) for params in scenario["sampling"]]
        result = drive(
            runners,
            scenario["prompts"],
            scenario["new_tokens"],
            tp=tp,
            sampling=sampling,
            chunk_size=scenario.get("chunk_size"),
        )
        report = {"rank": rank, "tokens": result.tokens, "first_logits": result.first_logits}
    except Exception as exc:
        report = {"rank": rank, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put(json.dumps(report))  # plain JSON text, no tensors

"""Run one offline Engine in a process of its own and write what it generated to a directory.

A TP > 1 engine's head rank lives in the process that opens it; NCCL then belongs to that process
for good, so each multi-GPU test runs its engine here, not in pytest:

    python -m tests.gpu.engine_child OUT_DIR '{"model": ..., "prompts": [[...]], "max_tokens": N, ...}'

Writes OUT_DIR/tokens.json and OUT_DIR/first_logits.safetensors before closing the engine, and
OUT_DIR/closed once close() returned, so the parent can tell results from a clean exit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import SamplingParams
from trellis.engine import Engine, EngineArgs


def main() -> None:
    out = Path(sys.argv[1])
    spec = json.loads(sys.argv[2])
    prompts, max_tokens = spec.pop("prompts"), spec.pop("max_tokens")
    knobs = {k: spec.pop(k) for k in list(spec) if k in EngineConfig.__dataclass_fields__}
    args = EngineArgs(device="cuda", return_logits=True, engine=EngineConfig(num_blocks=512, **knobs), **spec)
    engine = Engine(args)
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    logits = {str(i): o.first_logits.float().contiguous() for i, o in enumerate(outs)}
    save_file(logits, str(out / "first_logits.safetensors"))
    (out / "tokens.json").write_text(json.dumps([o.token_ids for o in outs]))
    start = time.perf_counter()
    engine.close()
    (out / "closed").write_text(f"{time.perf_counter() - start:.2f}")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Shared pieces of the offline-engine acceptance tests: prompts, checkpoint variants, logit error,
and one compute thread per process so a TP x PP replica's processes do not fight over the cores."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trellis.core.sampling import SamplingParams

NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
LOGITS_RTOL = 1e-4
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def make_prompts(vocab: int, lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lengths]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude (elementwise relative error
    is meaningless for logits near zero)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def shrink_vocab(path: Path, vocab: int) -> Path:
    """Cut a single-file checkpoint's vocabulary to its first ``vocab`` ids, in place (embedding and
    LM head rows, and config.json): e.g. to get a size that no TP split or padding divides."""
    weights_file = path / "model.safetensors"
    tensors = load_file(weights_file)
    for name in VOCAB_TENSORS:
        if name in tensors:
            tensors[name] = tensors[name][:vocab].contiguous()
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["vocab_size"] = vocab
    config_file.write_text(json.dumps(config, indent=2))
    return path


# Children inherit these. On a 2-core machine, TP x PP processes with torch's default thread pools
# oversubscribe the cores and each step crawls (10x and worse). UCX's 5 s default for the peer-info
# exchange of a new link was seen to expire on a loaded machine, resetting a stage's link.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "UCXPY_CONNECT_TIMEOUT": "60"}


@contextmanager
def small_cpu_env() -> Iterator[None]:
    """One compute thread in this process and every replica process started inside (see CHILD_ENV)."""
    old_env = {name: os.environ.get(name) for name in CHILD_ENV}
    old_threads = torch.get_num_threads()
    os.environ.update(CHILD_ENV)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        for name, value in old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

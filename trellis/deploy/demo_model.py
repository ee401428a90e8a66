"""The demo's small model, made on first use: a BPE tokenizer and a tiny Llama trained for a
few seconds on a built-in text, so that `make run` shows real words without any download."""

from __future__ import annotations

import json
import os
from pathlib import Path

from trellis.core import log

CORPUS = Path(__file__).with_name("demo_corpus.txt")
VERSION = "v1"  # bump to rebuild cached demo models
# A plain chat template, so /v1/chat/completions works on the demo: each message on its own
# "role: content" line, then "assistant:" for the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("TRELLIS_CACHE") or Path.home() / ".cache" / "trellis"
    return Path(root) / f"demo-llama-{VERSION}"


def demo_model(path: Path | None = None, *, train_steps: int = 160) -> Path:
    """The demo checkpoint directory, building it (under a minute on 2 idle cores) if missing."""
    path = path or cache_dir()
    if (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file():
        write_tokenizer_config(path)  # a model cached before the chat template gets it too
        return path
    logger = log.get()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    text = CORPUS.read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text],
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    ids = torch.tensor(tok.encode(text).ids)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    ctx, batch = 48, 8
    logger.info("training the demo model", steps=train_steps, tokens=len(ids))
    for step in range(train_steps):
        starts = torch.randint(0, len(ids) - ctx - 1, (batch,))
        x = torch.stack([ids[s : s + ctx] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 40 == 0 or step == train_steps - 1:
            logger.info("demo model training", step=step, loss=round(loss.item(), 3))
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save(str(tmp / "tokenizer.json"))
    write_tokenizer_config(tmp)
    tmp.replace(path)  # atomic: a half-written model is never taken for a cached one
    return path


def write_tokenizer_config(path: Path) -> None:
    """tokenizer_config.json with the chat template and the special tokens, if it is missing."""
    target = path / "tokenizer_config.json"
    if not target.is_file():
        config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}
        target.write_text(json.dumps(config, indent=2))

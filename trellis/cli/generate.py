"""`trellis generate`: run prompts offline on a local engine (or through a running mesh's router)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from trellis.core import log
from trellis.core.engine_config import EngineConfig
from trellis.core.sampling import DEFAULT_MAX_TOKENS


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids expects comma-separated integers, got {text!r}"
        ) from None


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for prompts (offline engine or --router)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt texts (needs tokenizer.json)")
    p.add_argument(
        "--prompt-ids",
        type=_ids,
        action="append",
        default=[],
        metavar="1,2,3",
        help="a prompt as token ids (repeatable)",
    )
    p.add_argument("--model", help="a local Hugging Face model directory")
    p.add_argument("--preset", help="a built-in model config with dummy weights (benchmarks)")
    p.add_argument("--router", help="HOST:PORT of a running mesh's router instead of a local engine")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--num-blocks", type=int)
    p.add_argument("--block-size", type=int, default=EngineConfig.block_size)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    p.set_defaults(func=run_generate)


def fail(message: str) -> int:
    print(f"trellis: error: {message}", file=sys.stderr)
    return 2


def run_generate(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRELLIS_LOG_LEVEL", "WARNING")  # children inherit it
    log.configure("cli")
    if not args.prompts and not args.prompt_ids:
        return fail("give at least one PROMPT or --prompt-ids")
    if args.router:
        from trellis.cli.remote import generate_remote

        return generate_remote(args)
    return _generate_offline(args)


def _generate_offline(args: argparse.Namespace) -> int:
    from trellis.core.errors import ConfigError
    from trellis.core.model_config import model_dir_problem
    from trellis.core.request import sampling_problem
    from trellis.core.sampling import SamplingParams
    from trellis.core.tokenizer import TokenizerMissing, decode, encode, load_tokenizer
    from trellis.engine import Engine, EngineArgs, EngineError

    if not args.model and not args.preset:
        return fail("give --model DIR (or --preset NAME, or --router HOST:PORT)")
    if args.model and (problem := model_dir_problem(args.model)):
        return fail(problem)  # before the tokenizer: "has no tokenizer.json" would mislead
    tok = None
    try:
        if args.model:
            tok = load_tokenizer(args.model)
    except TokenizerMissing as e:
        if args.prompts:
            return fail(str(e))
    except Exception as e:
        return fail(f"cannot read the tokenizer: {e}")
    prompts = [encode(tok, t) for t in args.prompts] + args.prompt_ids
    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
    )
    # The values alone, before any process starts (the engine checks the rest, against the model).
    if problem := sampling_problem(sampling, vocab_size=2**31):
        return fail(problem)
    try:  # the engine checks every request with the one validator (trellis.core.request)
        with Engine(
            EngineArgs(
                model=args.model,
                preset=args.preset,
                tp=args.tp,
                pp=args.pp,
                device=args.device,
                dtype=args.dtype,
                load_format=args.load_format,
                max_model_len=args.max_model_len,
                engine=EngineConfig(num_blocks=args.num_blocks, block_size=args.block_size),
            )
        ) as engine:
            outs = engine.generate(prompts, sampling)
    except (EngineError, ConfigError) as e:
        return fail(str(e))
    for out in outs:
        text = decode(tok, out.token_ids) if tok is not None else ""
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_token_ids": out.prompt_token_ids,
                        "token_ids": out.token_ids,
                        "text": text,
                        "finish_reason": out.finish_reason,
                    }
                )
            )
        else:
            print(text if tok is not None else " ".join(map(str, out.token_ids)))
    return 0

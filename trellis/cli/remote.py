"""`trellis generate --router HOST:PORT`: the same options and output as offline, through a mesh.

Text is printed as it arrives (the same text, once complete, as offline); --json prints each
prompt's object when it is done. A model without a tokenizer has no text: its token ids are
printed at the end, as offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from trellis.wire.router_client import RouterClient


def generate_remote(args: argparse.Namespace) -> int:
    prompts: list[str | list[int]] = [*args.prompts, *args.prompt_ids]
    sampling: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "ignore_eos": args.ignore_eos,
    }
    with RouterClient(args.router) as client:
        for p in prompts:
            try:
                if args.json:
                    _print_json(client, p, sampling)
                else:
                    _stream_text(client, p, sampling)
            except grpc.RpcError as e:
                print(f"trellis: error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
    return 0


def _print_json(client: RouterClient, prompt: str | list[int], sampling: dict[str, Any]) -> None:
    out = client.generate(prompt, **sampling)
    doc = {
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": out.token_ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
    }
    print(json.dumps(doc))


def _stream_text(client: RouterClient, prompt: str | list[int], sampling: dict[str, Any]) -> None:
    ids: list[int] = []
    texted = False
    for resp in client.stream(prompt, **sampling):
        ids.extend(resp.token_ids)
        if resp.text:
            texted = True
            print(resp.text, end="", flush=True)
    print("" if texted else " ".join(map(str, ids)), flush=True)

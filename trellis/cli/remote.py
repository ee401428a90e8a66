"""`trellis generate --router HOST:PORT`: the same options and output as offline, through a mesh."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from trellis.wire.router_client import RouterClient


def generate_remote(args: argparse.Namespace) -> int:
    prompts: list[str | list[int]] = [*args.prompts, *args.prompt_ids]
    with RouterClient(args.router) as client:
        for p in prompts:
            try:
                out = client.generate(
                    p,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    top_k=args.top_k,
                    seed=args.seed,
                    ignore_eos=args.ignore_eos,
                )
            except grpc.RpcError as e:
                print(f"trellis: error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt_token_ids": out.prompt_token_ids,
                            "token_ids": out.token_ids,
                            "text": out.text,
                            "finish_reason": out.finish_reason,
                        }
                    )
                )
            else:
                print(out.text if out.text else " ".join(map(str, out.token_ids)))
    return 0

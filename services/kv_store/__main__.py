"""The KV store service: a host tier of shared-memory block slots over an optional disk tier.

    python -m services.kv_store --spec SPEC

Serves trellis.v1.KVStore on kv_store.host:port (docs/kv-plane.md, "The store"). A spec without
a kv_store section, a model that cannot be read, a slab that does not fit in kv_store.shm_dir or
a port that cannot be bound: one line `kv_store: error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from trellis.core import log
from trellis.core.errors import ConfigError
from trellis.core.spec import SpecError, load


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m services.kv_store")
    ap.add_argument("--spec", required=True)
    args = ap.parse_args()
    try:
        spec = load(args.spec)
        if spec.kv_store is None:
            raise SpecError("the spec has no kv_store section")
        cfg = spec.check_model()
    except SpecError as e:
        print(f"kv_store: error: {e}", file=sys.stderr)
        return 2
    log.configure("kv_store")
    from services.kv_store.service import serve  # grpc and prometheus, once the spec is known good

    try:
        return asyncio.run(serve(spec, cfg))
    except ConfigError as e:  # capacity below one slot, shm_dir without room, a port taken
        print(f"kv_store: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

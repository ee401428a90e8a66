"""The KV store's library: a host tier of shared-memory slots over an optional disk tier.

No torch, no grpc, no protobuf here (the floors in pyproject.toml): the service in
services/kv_store converts messages, trellis/wire/kv_store_client.py is the client.
"""

from __future__ import annotations

from trellis.kv_store.store import KVStore, OnBlocks, layout_of

__all__ = ["KVStore", "OnBlocks", "layout_of"]

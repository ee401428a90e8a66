"""The KV store's gRPC API: protobuf in, the domain KVStore (trellis/kv_store), protobuf out.

Every rule is the store's; errors of the tree it raises (InvalidRequest for bad hashes bytes, a
parents list of another length, a negative TTL) become statuses in the server's interceptor
(trellis/wire/server.py). A TTL or timeout of 0 (unset in proto3) means the spec's.
"""

from __future__ import annotations

import asyncio

import grpc

from trellis.core.errors import InvalidRequest
from trellis.kv_store import KVStore
from trellis.v1 import kv_store_pb2 as pb
from trellis.v1 import kv_store_pb2_grpc
from trellis.wire.kv_store_client import pack_hashes, unpack_hashes


def _seconds(value: float, field: str) -> float | None:
    if value < 0:
        raise InvalidRequest(f"{field}: must be > 0 seconds (or 0 for the store's default), got {value!r}")
    return value or None


class KVStoreServicer(kv_store_pb2_grpc.KVStoreServicer):
    def __init__(self, store: KVStore) -> None:
        self.store = store

    async def Info(self, request: pb.KVInfoRequest, context: grpc.aio.ServicerContext) -> pb.KVStoreInfo:
        i = self.store.info()
        lay = i.layout
        return pb.KVStoreInfo(
            name=i.name,
            instance_id=i.instance_id,
            fingerprint=i.fingerprint,
            canary=i.canary,
            slab_path=i.slab_path,
            num_slots=i.num_slots,
            layout=pb.KVSlotLayout(
                num_layers=lay.num_layers,
                num_kv_heads=lay.num_kv_heads,
                head_dim=lay.head_dim,
                block_size=lay.block_size,
                dtype=lay.dtype,
            ),
        )

    async def Lookup(self, request: pb.KVLookupRequest, context: grpc.aio.ServicerContext) -> pb.KVStoreRun:
        run = self.store.lookup(unpack_hashes(request.hashes))
        return pb.KVStoreRun(host=run.host, total=run.total)

    async def Acquire(self, request: pb.KVAcquireRequest, context: grpc.aio.ServicerContext) -> pb.KVLease:
        hashes = unpack_hashes(request.hashes)
        ttl = _seconds(request.lease_ttl_s, "lease_ttl_s")
        # Off the loop: promoting disk blocks reads files (the store's lock serializes the calls).
        lease = await asyncio.to_thread(self.store.acquire, hashes, ttl)
        return pb.KVLease(
            lease_id=lease.lease_id,
            instance_id=lease.instance_id,
            slots=lease.slots,
            expires_at=lease.expires_at,
        )

    async def Release(
        self, request: pb.KVReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.KVReleaseResponse:
        return pb.KVReleaseResponse(valid=self.store.release(request.lease_id))

    async def BeginPut(
        self, request: pb.KVBeginPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.KVPutTicket:
        hashes = unpack_hashes(request.hashes)
        parents = unpack_hashes(request.parents, "parents")
        t = self.store.begin_put(hashes, parents, _seconds(request.timeout_s, "timeout_s"))
        return pb.KVPutTicket(
            put_id=t.put_id, instance_id=t.instance_id, hashes=pack_hashes(t.hashes), slots=t.slots
        )

    async def CommitPut(
        self, request: pb.KVCommitPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.KVCommitPutResponse:
        n = self.store.commit_put(request.put_id, unpack_hashes(request.hashes))
        return pb.KVCommitPutResponse(committed=n)

    async def AbortPut(
        self, request: pb.KVAbortPutRequest, context: grpc.aio.ServicerContext
    ) -> pb.KVAbortPutResponse:
        return pb.KVAbortPutResponse(found=self.store.abort_put(request.put_id))

    async def Stats(self, request: pb.KVStatsRequest, context: grpc.aio.ServicerContext) -> pb.KVStoreStats:
        s = self.store.stats()
        return pb.KVStoreStats(**{f: getattr(s, f) for f in type(s).__dataclass_fields__})

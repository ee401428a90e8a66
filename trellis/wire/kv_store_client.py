"""The KV store's control API over gRPC (trellis.v1.KVStore), answering the core types.

Every call has a deadline (`timeout_s`). A store that is down, slow or failing is `Unavailable`
with a one-line message naming its address: the caller recomputes instead (docs/kv-plane.md).
An INVALID_ARGUMENT answer (a bug of the caller) is `InvalidRequest`. Block hashes travel as
packed little-endian uint64 (`pack_hashes` / `unpack_hashes`, also used by the servicer).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import grpc

from trellis.core.errors import InvalidRequest, Unavailable
from trellis.core.kv_store_api import Lease, PutTicket, SlotLayout, StoreInfo, StoreRun, StoreStats
from trellis.v1 import kv_store_pb2 as pb
from trellis.v1 import kv_store_pb2_grpc

HASH_BYTES = 8


def pack_hashes(hashes: Sequence[int]) -> bytes:
    """Block names as packed little-endian uint64."""
    try:
        return struct.pack(f"<{len(hashes)}Q", *hashes)
    except struct.error as e:
        raise InvalidRequest(f"hashes: each must be an unsigned 64-bit integer ({e})") from None


def unpack_hashes(data: bytes, field: str = "hashes") -> list[int]:
    """The inverse of pack_hashes; InvalidRequest naming `field` unless len(data) is a multiple of 8."""
    if len(data) % HASH_BYTES:
        raise InvalidRequest(
            f"{field}: {len(data)} bytes is not a whole number of 8-byte little-endian uint64 hashes"
        )
    return list(struct.unpack(f"<{len(data) // HASH_BYTES}Q", data))


def stats_from_pb(s: pb.KVStoreStats) -> StoreStats:
    return StoreStats(**{f: getattr(s, f) for f in StoreStats.__dataclass_fields__})


class KVStoreClient:
    """One store's KVStore service over one channel; `close()` at the end."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = kv_store_pb2_grpc.KVStoreStub(self._channel)

    async def _call(self, method: str, request: object) -> object:
        try:
            return await getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            detail = (e.details() or e.code().name.lower()).strip().splitlines()[0]
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(detail) from None
            raise Unavailable(
                f"kv store at {self.address}: {method} failed: {e.code().name}: {detail}"
            ) from None

    async def info(self) -> StoreInfo:
        r = await self._call("Info", pb.KVInfoRequest())
        assert isinstance(r, pb.KVStoreInfo)
        lay = r.layout
        return StoreInfo(
            name=r.name,
            instance_id=r.instance_id,
            fingerprint=r.fingerprint,
            canary=r.canary,
            slab_path=r.slab_path,
            num_slots=r.num_slots,
            layout=SlotLayout(lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype),
        )

    async def lookup(self, hashes: Sequence[int]) -> StoreRun:
        r = await self._call("Lookup", pb.KVLookupRequest(hashes=pack_hashes(hashes)))
        assert isinstance(r, pb.KVStoreRun)
        return StoreRun(host=r.host, total=r.total)

    async def acquire(self, hashes: Sequence[int], ttl_s: float) -> Lease:
        req = pb.KVAcquireRequest(hashes=pack_hashes(hashes), lease_ttl_s=ttl_s)
        r = await self._call("Acquire", req)
        assert isinstance(r, pb.KVLease)
        return Lease(r.lease_id, r.instance_id, tuple(r.slots), r.expires_at)

    async def release(self, lease_id: str) -> bool:
        r = await self._call("Release", pb.KVReleaseRequest(lease_id=lease_id))
        assert isinstance(r, pb.KVReleaseResponse)
        return r.valid

    async def begin_put(self, hashes: Sequence[int], parents: Sequence[int], timeout_s: float) -> PutTicket:
        req = pb.KVBeginPutRequest(
            hashes=pack_hashes(hashes), parents=pack_hashes(parents), timeout_s=timeout_s
        )
        r = await self._call("BeginPut", req)
        assert isinstance(r, pb.KVPutTicket)
        return PutTicket(r.put_id, r.instance_id, tuple(unpack_hashes(r.hashes)), tuple(r.slots))

    async def commit_put(self, put_id: str, hashes: Sequence[int]) -> int:
        r = await self._call("CommitPut", pb.KVCommitPutRequest(put_id=put_id, hashes=pack_hashes(hashes)))
        assert isinstance(r, pb.KVCommitPutResponse)
        return r.committed

    async def abort_put(self, put_id: str) -> bool:
        r = await self._call("AbortPut", pb.KVAbortPutRequest(put_id=put_id))
        assert isinstance(r, pb.KVAbortPutResponse)
        return r.found

    async def stats(self) -> StoreStats:
        r = await self._call("Stats", pb.KVStatsRequest())
        assert isinstance(r, pb.KVStoreStats)
        return stats_from_pb(r)

    async def close(self) -> None:
        await self._channel.close()

"""Request deserializers that never raise: bad bytes become INVALID_ARGUMENT, not UNKNOWN.

grpc.aio calls a method's `request_deserializer` outside the handler, and whatever it raises
(protobuf's DecodeError for corrupt wire bytes or bad UTF-8 in a string field) is answered
`UNKNOWN: Unexpected DecodeError` before any interceptor or handler can map it. So the server's
interceptor swaps in `checked(...)`, which returns an `Undecodable` instead of raising; the wrapped
behavior answers it with INVALID_ARGUMENT (trellis/wire/server.py) and the servicer never sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor

from trellis.wire.wire_diagnosis import first_problem

Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse; `detail` is the client's one line."""

    detail: str


def checked(deserialize: Deserializer | None, method: str) -> Deserializer | None:
    """`deserialize` (a generated `Message.FromString`) made to return an Undecodable, never raise."""
    if deserialize is None:
        return None  # the handler takes raw bytes: nothing to parse
    descriptor: Descriptor | None = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else f"request for {method}"

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or whatever else a parser raises: the bytes are the client's
            where = first_problem(data, descriptor) if descriptor is not None else None
            return Undecodable(f"the request is not a valid {type_name}: {where or _why(e)}")

    return safe


def _why(error: Exception) -> str:
    """upb's reason without its "Error parsing message with type '...': " prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split("': ", 1)[-1]

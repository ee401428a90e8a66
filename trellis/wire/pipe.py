"""The messages of the stage-to-stage pipe, as plain Python values and as protobuf headers.

Downstream a stage sends `Activations` (the plan, as the bytes the head encoded once, plus the
shape/dtype of the hidden states that follow as a raw payload; with TP > 1 only rank 0's column
slice, the other ranks' slices follow as
`HiddenSlice`s on their own links); the last stage sends `Result`s to the head; `Stop` drains a
link, `PipeError` tells the receiver that the sender failed, and `Hello` checks the ring at start.
Each stage appends its compute seconds for a plan to `stage_busy_s`, so the head learns them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from trellis.core.plan import StepResult
from trellis.v1 import plan_pb2
from trellis.wire.plan_codec import result_from_pb, result_to_pb


@dataclass(frozen=True)
class Activations:
    plan: bytes  # the serialized StepPlan (plan_codec.encode_plan at the head), forwarded untouched
    dtype: str  # "float32" | "bfloat16" | "float16"
    shape: tuple[int, ...]  # of the whole hidden states [tokens, hidden]
    slices: int = 1  # > 1: the payload is columns [0, hidden / slices); the rest go rank to rank
    stage_busy_s: tuple[float, ...] = ()  # compute seconds of each stage so far, stage 0 first
    kv_failed: bool = False  # a stage so far could not make the plan's KV copies
    kv_sums: tuple[int, ...] = ()  # the plan's hand-off checksums so far, summed over the stages

    @property
    def payload_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.shape[-1] // self.slices) if self.shape else self.shape


@dataclass(frozen=True)
class HiddenSlice:
    """Rank r of a stage to rank r of the next: the header of its column slice of one plan."""

    step_id: int
    rank: int
    dtype: str
    shape: tuple[int, ...]  # of the slice


@dataclass(frozen=True)
class Result:
    """The last stage's answer to the head, with every stage's compute seconds for that plan."""

    result: StepResult
    stage_busy_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class PipeError:
    message: str


@dataclass(frozen=True)
class Hello:
    """Sent round the ring once at start; its return proves every stage is loaded and linked.

    Each stage lowers num_blocks to its own KV-cache capacity: the head gets the ring's minimum.
    """

    token: str
    num_blocks: int


PipeMessage = Activations | HiddenSlice | Result | Stop | PipeError | Hello


def encode(msg: PipeMessage) -> bytes:
    match msg:
        case Activations(plan, dtype, shape, slices, busy, kv_failed, kv_sums):
            pb = plan_pb2.PipeMessage(
                activations=plan_pb2.Activations(
                    plan=plan,
                    dtype=dtype,
                    shape=shape,
                    slices=slices,
                    stage_busy_s=busy,
                    kv_failed=kv_failed,
                    kv_sums=kv_sums,
                )
            )
        case HiddenSlice(step_id, rank, dtype, shape):
            pb = plan_pb2.PipeMessage(
                slice=plan_pb2.HiddenSlice(step_id=step_id, rank=rank, dtype=dtype, shape=shape)
            )
        case Result(result, busy):
            pb = plan_pb2.PipeMessage(result=result_to_pb(result))
            pb.result.stage_busy_s.extend(busy)
        case Stop(reason):
            pb = plan_pb2.PipeMessage(stop=reason)
        case PipeError(message):
            pb = plan_pb2.PipeMessage(error=message)
        case Hello(token, num_blocks):
            pb = plan_pb2.PipeMessage(hello=plan_pb2.Hello(token=token, num_blocks=num_blocks))
        case _:
            raise TypeError(f"not a pipe message: {type(msg).__name__}")
    return pb.SerializeToString()


def decode(data: bytes) -> PipeMessage:
    pb = plan_pb2.PipeMessage()
    pb.ParseFromString(data)
    match pb.WhichOneof("body"):
        case "activations":
            a = pb.activations
            return Activations(
                a.plan,
                a.dtype,
                tuple(a.shape),
                a.slices or 1,
                tuple(a.stage_busy_s),
                a.kv_failed,
                tuple(a.kv_sums),
            )
        case "slice":
            h = pb.slice
            return HiddenSlice(h.step_id, h.rank, h.dtype, tuple(h.shape))
        case "result":
            return Result(result_from_pb(pb.result), tuple(pb.result.stage_busy_s))
        case "stop":
            return Stop(pb.stop)
        case "error":
            return PipeError(pb.error)
        case "hello":
            return Hello(pb.hello.token, pb.hello.num_blocks)
    raise ValueError("empty pipe message")

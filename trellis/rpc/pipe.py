"""The messages of the stage-to-stage pipe, as plain Python values and as protobuf headers.

Downstream a stage sends `Activations` (the plan plus the shape/dtype of the hidden states that
follow as a raw payload); the last stage sends `StepResult`s to the head; `Stop` drains a link
`PipeError` tells the receiver that the sender failed, and `Hello` checks the ring at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.stage_worker.plan import StepPlan, StepResult
from trellis.rpc.plan_codec import plan_from_pb, plan_to_pb, result_from_pb, result_to_pb
from trellis.v1 import plan_pb2


@dataclass(frozen=True)
class Activations:
    plan: StepPlan
    dtype: str  # "float32" | "bfloat16" | "float16"
    shape: tuple[int, ...]


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


PipeMessage = Activations | StepResult | Stop | PipeError | Hello


def encode(msg: PipeMessage) -> bytes:
    match msg:
        case Activations(plan, dtype, shape):
            pb = plan_pb2.PipeMessage(
                activations=plan_pb2.Activations(plan=plan_to_pb(plan), dtype=dtype, shape=shape)
            )
        case StepResult():
            pb = plan_pb2.PipeMessage(result=result_to_pb(msg))
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
            return Activations(plan_from_pb(a.plan), a.dtype, tuple(a.shape))
        case "result":
            return result_from_pb(pb.result)
        case "stop":
            return Stop(pb.stop)
        case "error":
            return PipeError(pb.error)
        case "hello":
            return Hello(pb.hello.token, pb.hello.num_blocks)
    raise ValueError("empty pipe message")

"""Start one TP rank of a stage: join the stage's process group, load its shard, build the runner."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trellis.core import log
from trellis.core.layout import stage_num_blocks
from trellis.core.model_config import ModelConfig, load_model_source
from trellis.runtime.control import ControlChannel
from trellis.runtime.launch import StageLaunch
from trellis.runtime.model.parallel import TPGroup
from trellis.runtime.runner import StageRunner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RankContext:
    launch: StageLaunch
    rank: int
    cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype
    runner: StageRunner
    control: ControlChannel


def start_rank(launch: StageLaunch, rank: int) -> RankContext:
    if launch.device == "cuda":
        device = torch.device("cuda", launch.gpus[rank])
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Every rank of the replica shares this host's cores: oversubscribed threads cost 10x.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (launch.tp * launch.num_stages)))
    dtype = DTYPES[launch.dtype]
    ctrl = data = None
    if launch.tp > 1:
        backend = "nccl" if launch.device == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{launch.dist_host}:{launch.dist_port}",
            rank=rank,
            world_size=launch.tp,
            timeout=timedelta(minutes=10),
            device_id=device if launch.device == "cuda" else None,
        )
        data = dist.group.WORLD
        ctrl = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    cfg = load_model_source(launch.model_path, launch.preset)
    tp = TPGroup(rank, launch.tp) if launch.tp > 1 else TPGroup.single()
    engine = launch.engine
    runner = StageRunner(
        cfg,
        layers=launch.layers,
        tp=tp,
        device=device,
        dtype=dtype,
        block_size=engine.block_size,
        num_blocks=stage_num_blocks(engine, cfg, device=launch.device, max_model_len=launch.max_model_len),
        model_path=launch.model_path,
        load_format=launch.load_format,
        seed=engine.seed,
        cuda_graphs=engine.cuda_graphs,  # the runner captures graphs on CUDA only
        max_model_len=launch.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        one_shot_max_bytes=engine.one_shot_max_bytes,
    )
    control = ControlChannel(tp=launch.tp, device=device, ctrl_group=ctrl, data_group=data)
    return RankContext(launch, rank, cfg, device, dtype, runner, control)


def stop_rank(ctx: RankContext) -> None:
    """Drop the rank's CUDA graphs, then leave the stage's process group.

    A graph that captured NCCL kernels keeps the communicator in use until the graph is destroyed,
    and on H200s destroy and abort of such a communicator were seen to block for minutes
    (bench/RESULTS.md): so the graphs go first, and the NCCL teardown still runs in a daemon
    thread given a few seconds (after that it is left to process exit); gloo groups are destroyed
    normally.
    """
    ctx.runner.release()
    if not dist.is_initialized():
        return
    if dist.get_backend() != "nccl":
        dist.destroy_process_group()
        return
    torch.cuda.synchronize()
    teardown = threading.Thread(target=dist.destroy_process_group, name="nccl-teardown", daemon=True)
    teardown.start()
    teardown.join(timeout=5.0)
    if teardown.is_alive():
        log.get().warning("NCCL teardown did not finish in 5 s; leaving it to process exit")


def dump_stacks_if_hung() -> None:
    """With TRELLIS_HANG_DUMP_S=N, print every thread's stack each N seconds (diagnosing hangs)."""
    import faulthandler
    import os

    if seconds := float(os.environ.get("TRELLIS_HANG_DUMP_S", "0")):
        faulthandler.dump_traceback_later(seconds, repeat=True)

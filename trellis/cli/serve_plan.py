"""`trellis serve --plan`: the planner's layout (tp, pp, dp) for the GPUs of this host.

The planner knows GPUs by preset; this host's GPU is matched to one by its CUDA name (an
"NVIDIA H200" is the h200 preset). The workload is the planner's default (1024 tokens in, 256 out,
TTFT p99 2 s, TPOT p99 50 ms), the objective throughput.
"""

from __future__ import annotations

from trellis.core.errors import ConfigError

DEFAULT_PROMPT_LEN = "1024"
DEFAULT_OUTPUT_LEN = "256"
TTFT_SLO_S = 2.0
TPOT_SLO_S = 0.05


def gpu_preset(cuda_name: str) -> str:
    """The planner's preset for a CUDA device name; ConfigError listing the known ones."""
    from trellis.planner.hardware import GPU_PRESETS

    squashed = cuda_name.lower().replace(" ", "").replace("-", "")
    for name in sorted(GPU_PRESETS, key=len, reverse=True):  # h100-sxm before a shorter match
        if name.split("-")[0].replace("-", "") in squashed:
            return name
    raise ConfigError(
        f"--plan: the planner does not know this GPU ({cuda_name}); known: {', '.join(GPU_PRESETS)}. "
        "Give --tp/--pp/--dp instead"
    )


def planned_layout(
    source: str, gpus: int, tp: int | None = None, pp: int | None = None, gpu_name: str | None = None
) -> tuple[int, int, int]:
    """(tp, pp, dp) of the planner's best layout of `source` (a preset or model directory) on one
    node of `gpus` GPUs named `gpu_name` (default: this host's GPU 0); --tp / --pp constrain it."""
    from trellis.planner.calibration import default_calibration
    from trellis.planner.errors import PlanError
    from trellis.planner.hardware import cluster_from_args
    from trellis.planner.model import load_model
    from trellis.planner.search import PlanOptions, make_plan
    from trellis.planner.workload import Workload, parse_lengths

    if gpu_name is None:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    try:
        model = load_model(source)
        cluster = cluster_from_args(gpu_preset(gpu_name), 1, gpus)
        workload = Workload(
            parse_lengths(DEFAULT_PROMPT_LEN, "--prompt-len", model.max_len),
            parse_lengths(DEFAULT_OUTPUT_LEN, "--output-len", model.max_len),
            None,
            None,
            TTFT_SLO_S,
            TPOT_SLO_S,
        )
        plan = make_plan(model, cluster, workload, default_calibration(), PlanOptions(tp=tp, pp=pp))
    except PlanError as e:
        raise ConfigError(f"--plan: {e}") from None
    if plan.best is None:
        raise ConfigError(f"--plan: no layout of {source} fits {gpus} x {gpu_name}; see `trellis plan`")
    lay = plan.best.layout
    return lay.tp, lay.pp, lay.dp

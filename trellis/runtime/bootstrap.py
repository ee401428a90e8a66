"""The one bootstrap of a replica's ring, shared by the offline engine and the stage service.

In order: the model's config is read from its source (trellis.core.model_config.load_model_source);
each stage's StageLaunch is built by `stage_launch` (from a deploy spec: `launch_from_spec`; for
one host: `local_ring_launches`); each stage leader starts its executor and links into the ring
(`link_ring`); the head sends Hello round the ring and builds its scheduler and Head
(`start_head`). The engine config travels whole in every StageLaunch; nothing else carries a knob.
"""

from __future__ import annotations

import torch

from trellis.core.engine_config import EngineConfig
from trellis.core.errors import ModelError
from trellis.core.handoff_rules import handoff_ranks, rank_ucx_ports, sliced_handoff_problem
from trellis.core.kv_names import KVFingerprint
from trellis.core.layout import split_layers
from trellis.core.model_config import ModelConfig, check_parallel
from trellis.core.net import free_ports
from trellis.core.spec import DeploySpec, ModelSpec, SpecError
from trellis.runtime.executor import StageExecutor
from trellis.runtime.head import Head, ring_handshake
from trellis.runtime.launch import StageLaunch
from trellis.scheduling.scheduler import Scheduler
from trellis.scheduling.scheduler_config import scheduler_config
from trellis.transport.ucx import Link, LinkClosed, Listener, connect

LOCAL_HOST = "127.0.0.1"


def stage_launch(
    model: ModelSpec,
    cfg: ModelConfig,
    engine: EngineConfig,
    *,
    replica: str,
    stage: int,
    num_stages: int,
    layers: tuple[int, int],
    tp: int,
    device: str,
    gpus: tuple[int, ...],
    dist_host: str,
    dist_port: int,
    ucx_ports: tuple[int, ...],
    next_host: str,
    next_ucx_ports: tuple[int, ...],
) -> StageLaunch:
    """The one way a StageLaunch is made: the model source, the placement, the engine config
    whole, and max_model_len resolved (the deployment's, else the model's)."""
    return StageLaunch(
        model_path=model.path,
        preset=model.preset,
        load_format=model.load_format,
        dtype=model.dtype,
        max_model_len=model.max_model_len or cfg.max_position_embeddings,
        replica=replica,
        layers=layers,
        stage=stage,
        num_stages=num_stages,
        tp=tp,
        device=device,
        gpus=gpus if device == "cuda" else (),
        dist_host=dist_host,
        dist_port=dist_port,
        ucx_ports=ucx_ports,
        next_host=next_host,
        next_ucx_ports=next_ucx_ports,
        engine=engine,
    )


def launch_from_spec(spec: DeploySpec, cfg: ModelConfig, replica: int, stage: int) -> StageLaunch:
    """Stage `stage` of replica `replica` of a spec already checked against its model
    (DeploySpec.check_model); a mesh stage needs its ports given, else SpecError naming the field."""
    rep = spec.replicas[replica]
    st = rep.stages[stage]
    nxt = rep.stages[(stage + 1) % len(rep.stages)]
    where = f"replicas[{replica}].stages[{stage}]"
    for name in ("port", "ucx_port"):
        if getattr(st, name) == 0:
            raise SpecError(f"{where}.{name}: a mesh stage needs an explicit port")
    if st.tp > 1 and st.dist_port == 0:
        raise SpecError(f"{where}.dist_port: a stage with tp > 1 needs a rendezvous port")
    n = len(rep.stages)
    return stage_launch(
        spec.model,
        cfg,
        spec.engine,
        replica=rep.name,
        stage=stage,
        num_stages=n,
        layers=st.layers,
        tp=st.tp,
        device=st.device,
        gpus=st.gpus,
        dist_host=st.host,
        dist_port=st.dist_port,
        ucx_ports=rank_ucx_ports(st.ucx_port, st.tp, n),
        next_host=nxt.host,
        next_ucx_ports=rank_ucx_ports(nxt.ucx_port, nxt.tp, n),
    )


def local_ring_launches(
    model: ModelSpec,
    cfg: ModelConfig,
    engine: EngineConfig,
    *,
    tp: int,
    pp: int,
    device: str,
    gpus: tuple[int, ...] = (),
    replica: str = "offline",
) -> list[StageLaunch]:
    """One replica of `pp` balanced stages of `tp` ranks on this host (gpus default 0..tp*pp-1),
    every port picked free; raises ModelError where the model cannot be laid out so."""
    stage_layers = split_layers(cfg.num_hidden_layers, pp)
    for layers in stage_layers:
        check_parallel(cfg, tp, layers)
    if pp > 1 and (problem := sliced_handoff_problem(cfg.hidden_size, tp)):
        raise ModelError(problem)
    gpus = gpus or tuple(range(tp * pp))
    # Every stage's UCX ports (its leader's ring port, then with the sliced hand-off one per peer
    # rank), then every stage's TP rendezvous port: taken in one call, so that none collide.
    ranks = handoff_ranks(tp, pp)
    flat = iter(free_ports(pp * (ranks + 1)))
    ucx_ports = [tuple(next(flat) for _ in range(ranks)) for _ in range(pp)]
    dist_ports = [next(flat) for _ in range(pp)]
    return [
        stage_launch(
            model,
            cfg,
            engine,
            replica=replica,
            stage=s,
            num_stages=pp,
            layers=stage_layers[s],
            tp=tp,
            device=device,
            gpus=gpus[s * tp : (s + 1) * tp],
            dist_host=LOCAL_HOST,
            dist_port=dist_ports[s],
            ucx_ports=ucx_ports[s],
            next_host=LOCAL_HOST,
            next_ucx_ports=ucx_ports[(s + 1) % pp],
        )
        for s in range(pp)
    ]


async def link_ring(executor: StageExecutor, listener: Listener | None) -> tuple[Link | None, Link | None]:
    """Link a started stage leader into its ring: (outbound, inbound), (None, None) with one stage.

    Connects to the successor, accepts the predecessor on `listener` (on the leader's ucx_ports[0]),
    then waits until every TP peer has its own links (sliced hand-off; HandoffError if one cannot).
    Within engine.link_timeout_s each (a line every ~10 s while the successor is not up; LinkClosed
    naming the address when time runs out); on failure, what was linked is closed again.
    """
    launch = executor.launch
    if launch.num_stages == 1:
        return None, None
    if listener is None:
        raise ValueError("a stage of a ring of several needs a listener for its predecessor")
    timeout = launch.engine.link_timeout_s
    device = executor.ctx.device
    successor = f"stage {(launch.stage + 1) % launch.num_stages}"
    outbound = await connect(
        launch.next_host, launch.next_ucx_ports[0], device, timeout=timeout, peer=successor
    )
    inbound: Link | None = None
    try:
        try:
            inbound = await listener.accept(timeout=timeout)
        except TimeoutError:
            predecessor = (launch.stage - 1) % launch.num_stages
            raise LinkClosed(
                f"stage {predecessor} did not connect to this stage's UCX port "
                f"{launch.ucx_ports[0]} within {timeout:.0f} s (engine.link_timeout_s)"
            ) from None
        await executor.peers_linked()
    except BaseException:
        for link in (outbound, inbound):
            if link is not None:
                await link.close()
        raise
    return outbound, inbound


async def start_head(
    executor: StageExecutor,
    outbound: Link | None,
    inbound: Link | None,
    *,
    fingerprint: KVFingerprint,
    return_logits: bool = False,
) -> Head:
    """On the head stage, once linked: Hello round the ring (every stage is up; the reply carries
    the KV blocks every stage can hold), then the scheduler from the engine config, and the Head.
    Block names are rooted in ``fingerprint`` (trellis.core.kv_names), as the router's and the
    store's are."""
    launch = executor.launch
    num_blocks = await ring_handshake(executor, outbound, inbound, launch.engine.link_timeout_s)
    config = scheduler_config(
        launch.engine,
        num_blocks=num_blocks,
        max_model_len=launch.max_model_len,
        eos_token_ids=executor.ctx.cfg.eos_token_ids,
        num_stages=launch.num_stages,
        cache_key=fingerprint.key,
    )
    return Head(
        executor,
        Scheduler(config),
        num_stages=launch.num_stages,
        outbound=outbound,
        inbound=inbound,
        return_logits=return_logits,
    )


def cuda_problem(spec: DeploySpec, only: tuple[int, int] | None = None) -> str | None:
    """One line when a stage of the spec (or only stage `only` = (replica, stage)) asks for CUDA on a
    host that has none; checked before a process loads anything, instead of torch's tracebacks."""
    wanted = [
        f"replicas[{r}].stages[{s}].device"
        for r, rep in enumerate(spec.replicas)
        for s, st in enumerate(rep.stages)
        if st.device == "cuda" and only in (None, (r, s))
    ]
    if not wanted or torch.cuda.is_available():
        return None
    return f"{wanted[0]}: cuda asked for, but this host has no CUDA GPU; use device: cpu"

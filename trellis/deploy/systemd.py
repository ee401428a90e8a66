"""systemd units for a spec: `trellis-router.service`, the template `trellis-stage@.service` (one
instance per stage, `trellis-stage@r0-stage-1`), `trellis-kv-store.service` for a spec with
`kv_store:`, and `trellis.target`, which wants them all.

Stages share one template because they differ only in their arguments and GPUs: each instance
reads env/INSTANCE.env (TRELLIS_STAGE_ARGS, CUDA_VISIBLE_DEVICES, the spec's env), so a fix to
the unit is made once, and `systemctl restart 'trellis-stage@*'` reaches every stage. The
arguments are the ProcessSpec's, verbatim, split on whitespace by systemd's `$VAR` expansion.

Each stage sees only its own GPUs (CUDA_VISIBLE_DEVICES in the spec's order), so the spec shipped
here numbers each stage's GPUs from 0 (processes.isolated_gpus): rank r still runs on the device
the written spec gave it. The API key is read by the router from an optional
`secrets.env` next to the units (not generated: you write it, mode 0600).

Scaling: a DP replica is one more entry under `replicas:` in the spec; re-render, and its stages
are new instances of the same template. More routers are more hosts (its port is the spec's).
A spec spread over several hosts gives the units of each host under HOST/.

The KV store is one unit of its own, whatever the number of stages. The stages on its host are
ordered After= it and Want it (soft: a store that fails to start fails no stage, which serves
without it, recomputing), so systemd starts it first and stops it after them. Its slab is a file
in kv_store.shm_dir (the host's /dev/shm by default), which the stage workers map: no unit here
has a private /dev/shm or /tmp.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlparse

from trellis.core.errors import SpecError
from trellis.core.spec import DeploySpec
from trellis.deploy.processes import STAGE_MODULE, ProcessSpec, by_machine, isolated_gpus, spec_text

STAGE_TEMPLATE = "trellis-stage@.service"
ROUTER_UNIT = "trellis-router.service"
TARGET = "trellis.target"
STOP_TIMEOUT_S = 60  # SIGTERM drains: admitted requests finish


def spec_path(install_dir: str | Path) -> str:
    """Where the units read the spec: processes_for(spec, spec_path(install_dir))."""
    return str(Path(install_dir) / "spec.yaml")


def render(
    spec: DeploySpec,
    procs: tuple[ProcessSpec, ...],
    *,
    install_dir: str | Path,
    python: str = sys.executable,
) -> dict[str, str]:
    """{filename: text}, relative to install_dir: the absolute directory the files are used from
    (EnvironmentFile= and --spec name it). `python` runs ExecStart (the one with trellis installed)."""
    install_dir = Path(install_dir)
    if not install_dir.is_absolute() or not Path(python).is_absolute():
        raise SpecError(f"systemd needs absolute paths: got {install_dir} and {python}")
    for p in procs:
        if any(not a or '"' in a or any(c.isspace() for c in a) for a in p.args):
            raise SpecError(f"{p.name}: an argument is empty or has whitespace or quotes: {p.args}")
    files = {"spec.yaml": spec_text(isolated_gpus(spec))}
    groups = by_machine(procs)
    for host, mine in groups.items():
        sub = "" if len(groups) == 1 else f"{host}/"
        files.update(_host_units(spec, mine, install_dir / sub, python, sub, host))
    return files


def _host_units(
    spec: DeploySpec, procs: tuple[ProcessSpec, ...], unit_dir: Path, python: str, sub: str, host: str
) -> dict[str, str]:
    out: dict[str, str] = {}
    redis = _redis_unit(spec, host)
    stages = [p for p in procs if p.kind == "stage"]
    names = [f"trellis-stage@{p.slug}.service" for p in stages]
    store = [f"trellis-{p.slug}.service" for p in procs if p.kind == "kv_store"]
    if stages:
        out[f"{sub}{STAGE_TEMPLATE}"] = _unit(
            "Trellis stage worker %i",
            f"{python} -m {STAGE_MODULE} $TRELLIS_STAGE_ARGS",
            [f"{unit_dir}/env/%i.env"],
            after=[*redis, *store],
            comment=(
                "# After/Wants the KV store: a start order only; a stage serves without it (recomputing)."
                if store
                else None
            ),
        )
        for p in stages:
            env = [*p.env, ("TRELLIS_STAGE_ARGS", " ".join(p.args))]
            if p.gpus:
                env.append(("CUDA_VISIBLE_DEVICES", ",".join(map(str, p.gpus))))
            out[f"{sub}env/{p.slug}.env"] = _env_file(p, env)
    wanted = [*store, *names]
    for p in procs:
        if p.kind == "stage":
            continue
        unit = ROUTER_UNIT if p.kind == "router" else f"trellis-{p.slug}.service"
        out[f"{sub}env/{p.slug}.env"] = _env_file(p, list(p.env))
        env_files = [f"{unit_dir}/env/{p.slug}.env"]
        if p.kind == "router":  # the API key lives there, written by hand (optional: '-')
            env_files.append(f"-{unit_dir}/secrets.env")
        out[f"{sub}{unit}"] = _unit(
            "Trellis router" if p.kind == "router" else "Trellis KV store",
            " ".join(p.argv(python)),
            env_files,
            after=[*redis, *(names if p.kind == "router" else [])],
        )
        if unit not in wanted:
            wanted.append(unit)
    out[f"{sub}{TARGET}"] = (
        "[Unit]\n"
        f"Description=Trellis: every service of the spec on {host}\n"
        f"Wants={' '.join(wanted)}\n"
        "\n[Install]\nWantedBy=multi-user.target\n"
    )
    return out


def _unit(
    description: str, exec_start: str, env_files: list[str], *, after: list[str], comment: str | None = None
) -> str:
    """A service unit; `after` are units it orders after and wants (pulled in with it)."""
    deps = ["network-online.target", *after]
    return "\n".join(
        [
            *([comment] if comment else []),
            "[Unit]",
            f"Description={description}",
            f"After={' '.join(deps)}",
            f"Wants={' '.join(deps)}",
            f"PartOf={TARGET}",
            "",
            "[Service]",
            "Type=simple",
            *(f"EnvironmentFile={f}" for f in env_files),
            f"ExecStart={exec_start}",
            "Restart=on-failure",
            "RestartSec=5",
            "KillMode=mixed",  # SIGTERM to the leader (it stops its TP ranks), SIGKILL to leftovers
            f"TimeoutStopSec={STOP_TIMEOUT_S}",
            "",
            "[Install]",
            f"WantedBy={TARGET}",
            "",
        ]
    )


def _env_file(p: ProcessSpec, env: list[tuple[str, str]]) -> str:
    lines = [f"# {p.name}: generated by `trellis deploy systemd` from the spec (no secrets here)"]
    # A value with spaces is quoted (systemd strips the quotes); none holds a quote (checked above).
    return "\n".join([*lines, *(f'{k}="{v}"' if " " in v else f"{k}={v}" for k, v in env)]) + "\n"


def _redis_unit(spec: DeploySpec, host: str) -> list[str]:
    """Debian's redis-server.service, when the registry is a Redis on this host."""
    if not spec.registry.startswith("redis://"):
        return []
    url = urlparse(spec.registry)
    return ["redis-server.service"] if url.hostname in ("127.0.0.1", "localhost", "::1", host) else []

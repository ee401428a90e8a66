"""Running `trellis deploy` and the real validators over its output (shared by the deploy tests)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from trellis.cli.main import main as trellis_main


def deploy(target: str, spec: Path, out: Path) -> Path:
    assert trellis_main(["deploy", target, str(spec), "-o", str(out)]) == 0
    return out


def check_compose_files(files: list[Path]) -> None:
    """`docker-compose config -q` accepts every file, with nothing on stderr."""
    for f in files:
        r = subprocess.run(
            ["docker-compose", "-f", str(f), "config", "-q"], cwd=f.parent, capture_output=True, text=True
        )
        assert r.returncode == 0 and not r.stderr.strip(), f"{f}: {r.stderr}"


def check_systemd_units(out: Path) -> None:
    """`systemd-analyze verify` accepts each host's target with its units (the stage template's
    instances included), with nothing on stderr."""
    for target in sorted(out.rglob("trellis.target")):
        units = [str(p) for p in sorted(target.parent.glob("*.service")) if "@." not in p.name]
        wants = re.search(r"^Wants=(.*)$", target.read_text(), re.M).group(1).split()
        units += [str(target.parent / u) for u in wants if "@" in u]  # instances of the stage template
        r = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(target), *units], capture_output=True, text=True
        )
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def k8s_documents(out: Path) -> list[dict]:
    """Every manifest document, each validated by kubernetes-validate (strict, latest schemas)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = [d for f in sorted(out.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    for doc in docs:  # raises ValidationError with the path of the bad field
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    return docs

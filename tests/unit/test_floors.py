"""The floors of the house hold: import-linter's contracts (pyproject.toml) pass on the tree.

`make lint` runs the same check; this test makes CI run it too, so a climbing import or a cycle
fails the build rather than rotting the plan.
"""

from __future__ import annotations

import os
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept() -> None:
    cwd = Path.cwd()
    os.chdir(ROOT)  # import-linter reads pyproject.toml from the working directory
    try:
        assert lint_imports(no_cache=True) == 0, "an import contract is broken: run `make lint`"
    finally:
        os.chdir(cwd)

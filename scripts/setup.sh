#!/usr/bin/env bash
# Make the venv and install everything Trellis needs, on a fresh CPU machine or a dev box.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
echo "[setup] venv at $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# A CPU build of torch; 2.13.0 lies on the CPU machines' disk. Keep whatever torch is already there.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "[setup] installing torch (CPU build)"
  pip install -q "torch==2.13.0" || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
echo "[setup] installing trellis and its dependencies"
pip install -q -e '.[cpu,dev]'
echo "[setup] done"

#!/usr/bin/env bash
# The tests start their own redis-server on a free port; make sure the binary exists.
set -euo pipefail
command -v redis-server >/dev/null && exit 0
echo "[setup] redis-server missing: installing it"
if command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q redis-server
fi
command -v redis-server >/dev/null || { echo "redis-server could not be installed" >&2; exit 1; }

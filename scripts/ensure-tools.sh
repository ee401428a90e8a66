#!/usr/bin/env bash
# The deploy generators' tests check their output with the real validators: docker-compose
# (`docker-compose config`; Debian's package) and systemd-analyze. Make sure they exist.
set -euo pipefail
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v systemd-analyze >/dev/null || missing+=(systemd)
[ ${#missing[@]} = 0 ] && exit 0
echo "[setup] ${missing[*]} missing: installing"
if command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q "${missing[@]}"
fi
command -v docker-compose >/dev/null || { echo "docker-compose could not be installed" >&2; exit 1; }

# Sourced by the device scripts: the carried wheels (.whl) and the repo on the path.
set -u
export PYTHONUNBUFFERED=1 TRELLIS_LOG_LEVEL=${TRELLIS_LOG_LEVEL:-WARNING} NCCL_NVLS_ENABLE=0
export UCX_WARN_UNUSED_ENV_VARS=n
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}

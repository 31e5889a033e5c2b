#!/usr/bin/env bash
# Run on the lent GPU machine (see bench/device_wheels.sh): install the carried wheels, then every
# measurement in one call of bench/accelerator.py within BUDGET seconds (default 540), results in $OUT.
#   bash bench/device_run.sh [BUDGET] [accelerator.py options, e.g. --skip parity_bf16]
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-540}
shift || true
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"; }
install .whl/*.whl || { echo "installing the carried wheels failed (run bench/device_wheels.sh here first)"; exit 1; }
if ! python3 -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))"; then
  install .whl/flax/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, flax, torch, diffusers, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, jax.devices())"
exec python3 bench/accelerator.py --out "${OUT:-out/accelerator}" --budget "$budget" "$@"

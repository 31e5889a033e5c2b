#!/usr/bin/env bash
# Run here, before lending: the wheels the lent GPU machine lacks, into .whl/ (git-ignored), for
# `run(command="bash bench/device_run.sh 540", carry=[".whl"], timeout_s=600)`. That machine has Python
# 3.12 with jax, flax, optax, orbax, torch and transformers, and no network; diffusers (the PyTorch
# reference) and importlib_metadata (which diffusers needs) travel as wheels, and flax too in case the
# machine's is older than this project needs (installed there only then).
set -euo pipefail
cd "$(dirname "$0")/.."
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
rm -rf .whl
get -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
get -d .whl/flax flax==0.12.8
du -sh .whl

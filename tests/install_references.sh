#!/usr/bin/env bash
# The PyTorch references that some tests compare against and that pip cannot put into the environment itself:
# pytorch-fid (its Fréchet distance and InceptionV3), without its dependencies, and torchvision (pytorch-fid's
# network is built from torchvision's Inception classes) into .test-deps/, a folder of its own that only the
# subprocess building that reference puts on its path. PyPI's torchvision is built against the CUDA torch: in
# the environment it would not import beside the CPU torch, and transformers would try to use it.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps pytorch-fid==0.3.0
pip install -q --no-deps --upgrade --target .test-deps torchvision==0.28.0
# The web app's browser tests drive Debian's chromium through Playwright (which downloads no browser here).
if ! command -v chromium >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium >/dev/null
fi

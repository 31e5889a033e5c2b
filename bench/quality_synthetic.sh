#!/usr/bin/env bash
# The paper's Table 1 on the synthetic world: a model against its baselines on the held-out benchmark split.
#
#   bash bench/quality_synthetic.sh [MODEL] [WORK]     (defaults: checkpoints/synthetic, runs/quality)
#   N=50 STEPS=25 bash bench/quality_synthetic.sh      (a quicker, noisier table)
#
# Writes WORK/benchmark (N items, 64² sources, the model's size), one results folder per row, and prints a
# Markdown table: the model at guidance scale 5, the model at scale 1 (no guidance), the model with the
# uncond vector only (scale 0: no exemplar), copy-paste of the reference into the box, the unchanged source.
# The CLIP-style score uses MODEL's own vision tower; the attribute classifier is trained on the generator's
# labels at the first run (about a minute) and cached in WORK/benchmark/attribute_classifier.
set -euo pipefail
MODEL=${1:-checkpoints/synthetic}
WORK=${2:-runs/quality}
N=${N:-200}
STEPS=${STEPS:-50}
SEED=${SEED:-0}

python -m pbe_jax.data.benchmark make "$WORK/benchmark" --n "$N" --size 64
python -m pbe_jax.data.benchmark baseline copy-paste "$WORK/benchmark" "$WORK/copy-paste"
python -m pbe_jax.data.benchmark baseline unchanged "$WORK/benchmark" "$WORK/unchanged"
edit() {  # edit SCALE NAME: the model's results at one guidance scale
  python sample.py --pretrained "$MODEL" --batch "$WORK/benchmark" --out "$WORK/$2" --scale "$1" \
    --steps "$STEPS" --seed "$SEED" --batch-size 25
}
edit 5 model
edit 1 model_no_guidance
edit 0 model_no_exemplar
python -m pbe_jax.eval "$WORK/model" "$WORK/model_no_guidance" "$WORK/model_no_exemplar" "$WORK/copy-paste" \
  "$WORK/unchanged" --benchmark "$WORK/benchmark" --model "$MODEL"

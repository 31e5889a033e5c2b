#!/usr/bin/env bash
# The paper's Table 1 on the synthetic world: a model against its baselines on the held-out benchmark split.
#
#   bash bench/quality_synthetic.sh [MODEL] [WORK] [NAME=MODEL2 ...]   (defaults: checkpoints/synthetic, runs/quality)
#   N=50 STEPS=25 bash bench/quality_synthetic.sh      (a quicker, noisier table)
#
# NAME=MODEL2 adds a row: another model (e.g. an ablation's runs/<run>/export) at guidance scale 5.
#
# Writes WORK/benchmark (N items, 64² sources, the model's size), one results folder per row, and prints a
# Markdown table: the model at guidance scale 5, the model at scale 1 (no guidance), the model with the
# uncond vector only (scale 0: no exemplar), copy-paste of the reference into the box, the unchanged source,
# and those two passed through MODEL's autoencoder (encode, decode: the ceiling of any edit it decodes).
# The CLIP-style score uses MODEL's own vision tower; the attribute classifier is trained on the generator's
# labels at the first run (about a minute) and cached in WORK/benchmark/attribute_classifier.
set -euo pipefail
MODEL=${1:-checkpoints/synthetic}
WORK=${2:-runs/quality}
shift $(( $# < 2 ? $# : 2 ))
for row in "$@"; do  # checked before minutes of sampling, not after
  if [[ "$row" != *=* || "$row" == =* ]]; then
    echo "error: extra rows are NAME=MODEL_FOLDER, got '$row'" >&2
    exit 2
  fi
done
N=${N:-200}
STEPS=${STEPS:-50}
SEED=${SEED:-0}

python -m pbe_jax.data.benchmark make "$WORK/benchmark" --n "$N" --size 64
python -m pbe_jax.eval.baselines copy-paste "$WORK/benchmark" "$WORK/copy-paste"
python -m pbe_jax.eval.baselines unchanged "$WORK/benchmark" "$WORK/unchanged"
# The same two through the model's autoencoder: the best any edit decoded by it could score.
python -m pbe_jax.eval.baselines copy-paste "$WORK/benchmark" "$WORK/copy-paste-vae" --through-vae "$MODEL"
python -m pbe_jax.eval.baselines unchanged "$WORK/benchmark" "$WORK/unchanged-vae" --through-vae "$MODEL"
edit() {  # edit SCALE NAME [MODEL]: a model's results at one guidance scale
  python sample.py --pretrained "${3:-$MODEL}" --batch "$WORK/benchmark" --out "$WORK/$2" --scale "$1" \
    --steps "$STEPS" --seed "$SEED" --batch-size 25
}
edit 5 model
edit 1 model_no_guidance
edit 0 model_no_exemplar
extra=()
for row in "$@"; do
  name=${row%%=*}
  edit 5 "$name" "${row#*=}"
  extra+=("$WORK/$name")
done
python -m pbe_jax.eval "$WORK/model" "$WORK/model_no_guidance" "$WORK/model_no_exemplar" "${extra[@]}" \
  "$WORK/copy-paste" "$WORK/copy-paste-vae" "$WORK/unchanged" "$WORK/unchanged-vae" --benchmark "$WORK/benchmark" --model "$MODEL"

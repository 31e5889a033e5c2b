#!/usr/bin/env bash
# The paper's Table 1 on COCOEE, end to end: sample the benchmark's edits with the original release's settings
# (PLMS 50 steps, guidance 5, seed 42, eta 0, no paste-back), then score them as its evaluation does.
#
#   bash bench/cocoee.sh MODEL COCOEE COCO_TEST2017 CLIP_DIR GMM_NPZ [OUT]
#
#   MODEL          a Paint-by-Example model (diffusers folder, checkpoint, the release's model.ckpt, or Hub id)
#   COCOEE         the release's test_bench folder (GT_3500/, Mask_bbox_3500/, Ref_3500/, id_list.npy)
#   COCO_TEST2017  the real images for the FIDs (their statistics are cached in OUT/coco_stats.npz)
#   CLIP_DIR       openai/clip-vit-base-patch32 as a transformers folder
#   GMM_NPZ        the QS mixture (python -m pbe_jax.eval gmm-to-npz gmm.pkl GMM_NPZ)
#   OUT            work folder (default runs/cocoee): OUT/results/<id>.png, OUT/table1.md, OUT/table1.json
#
# Environment: INCEPTION=pt_inception-2015-12-05-6726825d.pth adds the standard FID; BATCH (default 8) edits per
# step; CLIP_DTYPE (default float32; the original's features are float16); SIZE (default: the model's).
# Sampling is resumable: run it again after an interruption and only the missing edits are made. Every path may
# be local or gs://.
set -euo pipefail
if [[ $# -lt 5 ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
MODEL=$1 COCOEE=$2 COCO=$3 CLIP=$4 GMM=$5 OUT=${6:-runs/cocoee}
BATCH=${BATCH:-8}
extra=()
[[ -n "${SIZE:-}" ]] && extra+=(--size "$SIZE")
python sample.py --pretrained "$MODEL" --batch "$COCOEE" --out "$OUT/results" --sampler plms --steps 50 \
  --scale 5 --seed 42 --batch-size "$BATCH" "${extra[@]}"
score=(python -m pbe_jax.eval "$OUT/results" --benchmark "$COCOEE" --protocol cocoee --model "$CLIP"
  --fid-reference "$COCO" --fid-stats "$OUT/coco_stats.npz" --gmm "$GMM" --clip-dtype "${CLIP_DTYPE:-float32}"
  --batch-size "$BATCH")
[[ -n "${INCEPTION:-}" ]] && score+=(--inception-weights "$INCEPTION")
"${score[@]}" --progress --report "$OUT/table1.json" | tee "$OUT/table1.md"

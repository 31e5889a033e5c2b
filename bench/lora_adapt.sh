#!/usr/bin/env bash
# LoRA does the job: adapt the shipped model to a colour it never saw, and measure what it learned and what it kept.
#
#   bash bench/lora_adapt.sh [WORK] [key=value ...]      (default WORK: runs/lora_adapt; docs/lora.md has the table)
#   N=50 STEPS=300 bash bench/lora_adapt.sh runs/quick    (a quicker, noisier look)
#
# The shipped model (checkpoints/synthetic) was trained on scenes with 8 colours. The new world adds pink
# (`data.extra_colours=[pink]`, pbe_jax/data/synthetic.py): one object in nine is pink, and the rest of the
# world is unchanged. The script
#   1. writes two held-out benchmarks of N items at 64² (seeds disjoint from every training stream):
#      WORK/new, the new world with every exemplar pink (what is new), and WORK/old, the base world (the
#      benchmark of the quality table in docs/evaluation.md);
#   2. samples both with the shipped model ("before");
#   3. trains a LoRA adapter on the new world with train.py (rank 8 on the attention projections, the base
#      frozen; STEPS steps; any key=value given is added to train.py's command line);
#   4. samples both with the merged export ("after") and with the adapter applied by `sample.py --lora`
#      to the shipped folder (the same model, so the same edits: checked by the eval's identical rows);
#   5. scores all with `python -m pbe_jax.eval` (the shipped tower's CLIP score; attribute classifiers trained on
#      each benchmark's own world, cached in WORK/{new,old}/attribute_classifier) and writes WORK/report.json.
# Resumable: a step whose output exists is skipped (delete the folder to redo it).
set -euo pipefail
WORK=${1:-runs/lora_adapt}
shift $(( $# < 1 ? $# : 1 ))
MODEL=${MODEL:-checkpoints/synthetic}
N=${N:-200}
STEPS=${STEPS:-1500}
SAMPLER=${SAMPLER:-dpmpp_2m}
SAMPLE_STEPS=${SAMPLE_STEPS:-20}
mkdir -p "$WORK"

python -m pbe_jax.data.benchmark make "$WORK/new" --n "$N" --size 64 --extra-colours pink --reference-colour pink
python -m pbe_jax.data.benchmark make "$WORK/old" --n "$N" --size 64

edit() {  # edit BENCH OUT [sample.py options]: guidance 5, seed 0, as the quality table
  local bench=$1 out=$2
  shift 2
  if [[ -f "$out/.done" ]]; then return; fi
  python sample.py --pretrained "$MODEL" --batch "$bench" --out "$out" --scale 5 --seed 0 --batch-size 25 \
    --sampler "$SAMPLER" --steps "$SAMPLE_STEPS" "$@"
  touch "$out/.done"
}
edit "$WORK/new" "$WORK/new_before"
edit "$WORK/old" "$WORK/old_before"

if [[ ! -d "$WORK/lora/export/lora" ]]; then
  # The learning rate is the one the model was trained with, doubled: only the small factors move. EMA over
  # about 100 steps, so that the export is the end of a short run, not a lagging average of it.
  python train.py --config synthetic --workdir "$WORK/lora" model.init=pbe "model.pbe_folder=$MODEL" \
    model.lora.rank=8 data.extra_colours=[pink] steps="$STEPS" optim.lr=1e-3 optim.warmup_steps=100 \
    ema_decay=0.99 sample_every=0 ckpt_every=500 log_every=100 "$@"
fi
MODEL="$WORK/lora/export" edit "$WORK/new" "$WORK/new_after"
MODEL="$WORK/lora/export" edit "$WORK/old" "$WORK/old_after"
edit "$WORK/new" "$WORK/new_after_unmerged" --lora "$WORK/lora/export/lora"

python -m pbe_jax.eval "$WORK/new_before" "$WORK/new_after" "$WORK/new_after_unmerged" --benchmark "$WORK/new" \
  --model "$MODEL" --report "$WORK/new.json"
python -m pbe_jax.eval "$WORK/old_before" "$WORK/old_after" --benchmark "$WORK/old" --model "$MODEL" \
  --report "$WORK/old.json"
python - "$WORK" "$STEPS" <<'EOF'
# WORK/report.json: per results folder its means, and per benchmark after − before paired over the items
# (mean ± standard error), which is what says whether a difference is more than the items' spread.
import json, math, sys
work, steps = sys.argv[1], int(sys.argv[2])
out = {"steps": steps, "rows": {}, "paired_after_minus_before": {}}
names = ("shape", "colour", "pattern")
for bench in ("new", "old"):
    reports = {folder.rstrip("/").split("/")[-1]: r for folder, r in json.load(open(f"{work}/{bench}.json")).items()}
    for name, r in reports.items():
        m = r["metrics"]
        out["rows"][name] = {"clip": 100 * m["clip"]["mean"], "psnr": m["psnr"]["mean"], "ssim": m["ssim"]["mean"],
                             **{f"attr_{k}": m["attributes"][k] for k in (*names, "all")}, "n": r["evaluated"]}
    items = {name: {row["id"]: row for row in r["per_item"]} for name, r in reports.items()}
    before, after = items[f"{bench}_before"], items[f"{bench}_after"]
    measures = {"clip": lambda r: 100 * r["clip"], "psnr": lambda r: r["psnr"],
                **{f"attr_{k}": (lambda r, i=i: float(r["predicted"][i] == r["label"][i])) for i, k in enumerate(names)},
                "attr_all": lambda r: float(r["predicted"] == r["label"])}
    diffs = {}
    for key, f in measures.items():
        d = [f(after[i]) - f(before[i]) for i in sorted(before)]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        diffs[key] = {"mean": mean, "se": se}
    out["paired_after_minus_before"][bench] = diffs
losses = [json.loads(line) for line in open(f"{work}/lora/metrics.jsonl") if '"loss"' in line]
out["train_loss_first_last"] = [losses[0]["loss"], losses[-1]["loss"]] if losses else None
json.dump(out, open(f"{work}/report.json", "w"), indent=1)
print(json.dumps(out, indent=1))
EOF

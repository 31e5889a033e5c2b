"""Full SD-1.4-size programs compiled for Cloud TPU slices on this host (`python -m pbe_jax.aot`, libtpu):
the training step at 512² and the sampler, per chip generation, one JSON per case under
bench/results/tpu-aot/. A full-size compile takes 10–20 minutes and up to 19 GB of host memory on a 2-core
machine, so the cases run one after another and the runner resumes: a case whose JSON exists is skipped.

    python bench/tpu_aot.py run [CASE ...]       # all cases (or the named ones) not yet measured
    python bench/tpu_aot.py list                 # the cases and which are done
    python bench/tpu_aot.py table                # docs/tpu.md's "Before you rent a pod" table, from the JSONs
    python bench/tpu_aot.py recount              # collectives, kernels, dtypes again from the kept HLO

Each compiled program's HLO text is kept beside the JSONs, gzipped, in hlo/ (not committed: tens of MB), so
that what is read from it can be read again without compiling.

The numbers are the TPU compiler's for that topology (buffer assignment per chip, FLOP count), not a run on a
TPU; the roofline is FLOPs ÷ peak bf16 rate, a lower bound on the time of a step.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_runner import gib as _gib, load as _load, main as run_main, sample_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "tpu-aot"

# The settings recommended per chip (docs/tpu.md): no remat where the batch fits without it (recomputing the
# blocks costs 13 % more FLOPs for 20 % fewer temporaries at v5e-8, batch 8 per chip), bf16 frozen towers (they are only run
# forward), data parallelism (fsdp 1: no parameter all-gathers, one gradient all-reduce) wherever the
# replicated float32 state and AdamW's moments (11.1 GiB per chip) leave room for a batch of 16 per chip
# (v4's and v6e's 32 GiB, v5p's 95 GB), fsdp over the slice's chips only where they do not (v5e's 16 GiB).
# A larger per-chip batch than 16 raises no roofline (FLOPs per sample are fixed); it only needs more HBM.
TRAIN = {
    "v5e-8": ["mesh_fsdp=8"],
    "v5p-8": ["mesh_fsdp=1"],
    "v6e-8": ["mesh_fsdp=1"],
    "v4-8": ["mesh_fsdp=1"],
}
CHIPS = {"v5e-8": 8, "v5p-8": 4, "v6e-8": 8, "v4-8": 4}


def cases() -> dict[str, list[str]]:
    out = {}
    for topo, settings in TRAIN.items():
        for per_chip in (1, 2, 4, 8, 16, 32, 64, 128):
            batch = per_chip * CHIPS[topo]
            out[f"train-{topo}-b{per_chip}"] = ["train", "--topology", topo, "--config", "sd14",
                                                f"data.batch_size={batch}", "model.remat=False",
                                                "model.frozen_dtype=bfloat16", *settings]
    # LoRA (docs/lora.md) against full fine-tuning at the same batch: on one v5e chip (16 GiB, no fsdp) and on
    # v5e-8 at its recommended fsdp 8 (full fine-tuning there: the train-v5e-8-… cases). Rank 16 on the
    # attention projections, the frozen base in bf16.
    lora, full = ("lora", ["model.lora.rank=16"]), ("full", [])
    for topo, fsdp, per_chips, kinds in (("v5e-1", 1, (1, 2, 4, 8, 16), (lora, full)),
                                         ("v5e-8", 8, (16, 32), (lora,))):
        for per_chip in per_chips:
            for kind, overrides in kinds:
                out[f"{kind}-{topo}-b{per_chip}"] = ["train", "--topology", topo, "--config", "sd14",
                                                     f"data.batch_size={per_chip * int(topo.split('-')[1])}",
                                                     "model.remat=False", "model.frozen_dtype=bfloat16",
                                                     f"mesh_fsdp={fsdp}", *overrides]
    for topo in TRAIN:
        for per_chip in (4, 16, 32, 64, 128, 256, 512):  # a batch that does not fit is refused in seconds
            for sampler, steps in (("plms", 50), ("dpmpp_2m", 20)):
                name, argv = sample_case(topo, per_chip, CHIPS[topo], sampler, steps)
                out[name] = argv
    return out


def load() -> dict[str, dict]:
    return _load(OUT)


def table() -> str:
    """Markdown: per chip, the largest measured training batch that fits and the sampler at its largest."""
    done = load()
    rows = ["| slice | setting | train: largest per-chip batch measured that fits (GiB of HBM) | roofline samples/s per chip "
            "| sample: per-chip batch (GiB) | roofline images/s per chip, PLMS-50 / DPM-Solver++-20 |",
            "|---|---|---|---|---|---|"]
    for topo, settings in TRAIN.items():
        train = [r for n, r in done.items() if n.startswith(f"train-{topo}-")]
        fit = max((r for r in train if r["fits"]), key=lambda r: r["per_chip_batch"], default=None)
        refused = min((r for r in train if not r["fits"]), key=lambda r: r["per_chip_batch"], default=None)
        t = "not measured" if fit is None else f"{fit['per_chip_batch']:g} ({_gib(fit)})"
        if refused is not None:
            t += f"; {refused['per_chip_batch']:g} does not fit ({_gib(refused)})"
        rate = "" if fit is None else f"{fit['samples_per_s_per_chip']:.1f}"
        sample = {}
        for n, r in done.items():
            if n.startswith(f"sample-{topo}-") and r["fits"]:
                key = r["per_chip_batch"]
                sample.setdefault(key, {})[r["sampler"]] = r
        if sample:
            b = max(sample)
            s = f"{b:g} ({max(_gib(r) for r in sample[b].values())})"
            rates = " / ".join(f"{sample[b][k]['images_per_s_per_chip']:.2f}" if k in sample[b] else "–"
                               for k in ("plms", "dpmpp_2m"))
        else:
            s = rates = "not measured"
        refused = sorted({r["per_chip_batch"] for n, r in done.items() if n.startswith(f"sample-{topo}-") and not r["fits"]})
        if refused:
            s += f"; {refused[0]:g} does not fit ({max(_gib(r) for n, r in done.items() if n.startswith(f'sample-{topo}-') and r['per_chip_batch'] == refused[0])})"
        rows.append(f"| {topo} | {', '.join(settings)}, no remat, bf16 frozen | {t} | {rate} | {s} | {rates} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    return run_main(argv, __doc__, cases, OUT, "tpu_aot.py", table)


if __name__ == "__main__":
    sys.exit(main())

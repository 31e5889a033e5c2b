"""Full SD-1.4-size programs compiled for NVIDIA GPU nodes on this host (`python -m pbe_jax.aot`, the CUDA plugin
of the [gpu] extra): the training step at 512² and the sampler, per GPU, one JSON per case under
bench/results/gpu-aot/. A full-size GPU compile takes 1.5–3 minutes and about 3 GB of host memory on a 2-core
machine; the runner resumes (a case whose JSON exists is skipped).

    python bench/gpu_aot.py run [CASE ...]       # all cases (or the named ones) not yet measured
    python bench/gpu_aot.py list                 # the cases and which are done
    python bench/gpu_aot.py table                # docs/benchmarks.md's "Before you rent a GPU" tables
    python bench/gpu_aot.py recount              # library calls, collectives, dtypes again from the kept HLO

The numbers are the GPU compiler's for that target (buffer assignment per GPU, FLOP count), without autotuning
(which picks kernels and cuDNN workspaces on a GPU), not a run; the roofline is FLOPs ÷ the GPU's dense bf16
peak (989 TFLOP/s H100/H200, 121 L4), a lower bound on the time of a step.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aot_runner import gib, load as _load, main as run_main, sample_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "gpu-aot"
# Data parallelism on a node (fsdp 1: the float32 state and AdamW's moments, 11.1 GiB, fit beside a batch on an
# 80 GB GPU; one gradient all-reduce per step), bf16 compute and frozen towers, `auto` attention (cuDNN flash).
NODE = ["--config", "sd14", "model.frozen_dtype=bfloat16", "mesh_fsdp=1"]
GPUS = {"h100-8": 8, "h200-8": 8, "l4-1": 1}


def cases() -> dict[str, list[str]]:
    out = {}
    # (train-h100-8-b16 and train-h200-8-b16 are also what bench/accelerator.py sets beside a lent GPU's own
    # compile and peak of its batch-16 step)
    for topo, per_gpus in (("h100-8", (16, 32, 64, 80, 96)), ("h200-8", (16, 128, 160, 192))):
        for per_gpu in per_gpus:
            out[f"train-{topo}-b{per_gpu}"] = ["train", "--topology", topo, *NODE,
                                               f"data.batch_size={per_gpu * GPUS[topo]}", "model.remat=False"]
    # two nodes of 8, data parallel across all 16: the gradient all-reduce per step
    out["train-h100:2x8-b16"] = ["train", "--topology", "h100:2x8", *NODE, "data.batch_size=256", "model.remat=False"]
    # one 24 GB card: full fine-tuning with per-block remat, and LoRA (rank 16 on the attention projections, the
    # whole UNet frozen in bf16; docs/lora.md)
    for per_gpu in (1, 2, 4, 16, 24):
        out[f"full-l4-1-b{per_gpu}"] = ["train", "--topology", "l4-1", *NODE, f"data.batch_size={per_gpu}",
                                        "model.remat=True"]
    for per_gpu in (1, 4, 8, 16, 32):
        out[f"lora-l4-1-b{per_gpu}"] = ["train", "--topology", "l4-1", *NODE, f"data.batch_size={per_gpu}",
                                        "model.remat=False", "model.lora.rank=16"]
    # sampling: PLMS-50 up the batches; DPM-Solver++-20 at the first (a program's FLOPs per image, and so its
    # roofline rate, do not depend on the batch; its memory hardly on the sampler)
    for topo, per_gpus in (("h100-8", (16, 128, 256)), ("h200-8", (16, 256, 512)), ("l4-1", (4, 16, 32, 64))):
        for per_gpu in per_gpus:
            for sampler, steps in (("plms", 50), ("dpmpp_2m", 20))[:2 if per_gpu == per_gpus[0] else 1]:
                name, argv = sample_case(topo, per_gpu, GPUS[topo], sampler, steps)
                out[name] = argv
    return out


def load() -> dict[str, dict]:
    return _load(OUT)


def _largest(runs: list[dict]) -> tuple[dict | None, dict | None]:
    fit = max((r for r in runs if r["fits"]), key=lambda r: r["per_chip_batch"], default=None)
    refused = min((r for r in runs if not r["fits"]), key=lambda r: r["per_chip_batch"], default=None)
    return fit, refused


def _batch(fit, refused) -> str:
    text = "not measured" if fit is None else f"{fit['per_chip_batch']:g} ({gib(fit)} GiB)"
    if refused is not None:
        text += f"; {refused['per_chip_batch']:g} does not fit ({gib(refused)} GiB)"
    return text


def table() -> str:
    """Markdown: training per GPU (largest measured batch that fits, roofline), then sampling."""
    done = load()
    rows = ["| GPUs | program | largest per-GPU batch measured that fits (GiB per GPU) | roofline per GPU "
            "(TFLOP per sample or image) |", "|---|---|---|---|"]
    for prefix, what in (("train-h100-8-", "train, data parallel, no remat"),
                         ("train-h200-8-", "train, data parallel, no remat"),
                         ("full-l4-1-", "full fine-tuning, remat"), ("lora-l4-1-", "LoRA rank 16, no remat")):
        fit, refused = _largest([r for n, r in done.items() if n.startswith(prefix)])
        rate = "" if fit is None else (f"{fit['samples_per_s_per_chip']:.1f} samples/s "
                                       f"({fit['flops_per_chip'] / fit['per_chip_batch'] / 1e12:.2f})")
        rows.append(f"| {prefix.split('-', 1)[1].rstrip('-')} | {what} | {_batch(fit, refused)} | {rate} |")
    for topo in ("h100-8", "h200-8", "l4-1"):
        runs = [r for n, r in done.items() if n.startswith(f"sample-{topo}-")]
        fit, refused = _largest(runs)
        rates = []
        for sampler, label in (("plms", "PLMS-50"), ("dpmpp_2m", "DPM-Solver++-20")):
            r = [x for x in runs if x["sampler"] == sampler and x["fits"]]
            if r:
                x = max(r, key=lambda x: x["per_chip_batch"])
                rates.append(f"{label} {x['images_per_s_per_chip']:.2f} "
                             f"({x['flops_per_chip'] / x['per_chip_batch'] / 1e12:.1f})")
        rows.append(f"| {topo} | sample, bf16, guidance | {_batch(fit, refused)} | "
                    f"{' / '.join(rates) or 'not measured'} images/s |")
    two = done.get("train-h100:2x8-b16")
    if two:
        ar = two["collectives"]["all-reduce"]
        rows.append(f"| h100:2x8 | train, data parallel over 16 GPUs, batch 16 per GPU | {gib(two)} GiB, fits: "
                    f"{'yes' if two['fits'] else 'no'} | all-reduce ×{ar['count']}, {ar['bytes'] / 2 ** 30:.2f} GiB "
                    f"per GPU per step |")
    return "\n".join(rows)


def main(argv=None) -> int:
    return run_main(argv, __doc__, cases, OUT, "gpu_aot.py", table)


if __name__ == "__main__":
    sys.exit(main())

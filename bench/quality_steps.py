"""Quality against step count, per sampler, on the synthetic held-out benchmark with the shipped model.

    python bench/quality_steps.py                                   # 100 items: about 50 min on 2 CPU cores
    python bench/quality_steps.py --n 50 --steps 10,20 --samplers plms,dpmpp_2m   # a quick look

For each sampler and step count, `sample.py --batch` edits the benchmark (resumable: folders already complete
are kept), and two things are measured:
- the evaluation's scores (`python -m pbe_jax.eval`: CLIP score of the region against the reference with the
  model's own tower, PSNR/SSIM outside the mask, the attribute classifier);
- how far each result is from a converged one for the same seed and inputs (the same initial noise and
  masked-image latents: both come from the job's seed): the mean absolute pixel difference (0–255) and the
  cosine between the CLIP features (the model's tower) of the two whole images. Against DDIM at 250 steps;
  and against the sampler's own limit, which is not the same point for every sampler: PLMS and DDIM stop at
  the noise level of t = 0 (ᾱ_0 = 0.99915, diffusers' set_alpha_to_one=False), DPM-Solver++ and UniPC go on
  to σ = 0 (their final_sigmas_type="zero") from t = 999 instead of 997, so their limit is DPM-Solver++ at
  250 steps.
Writes WORK/quality_steps.json and WORK/quality_steps.png (the plot), and prints a Markdown table, and for each
sampler the fewest steps whose mean pixel distance to either reference is at most PLMS-50's. The plot alone,
again, from a JSON already written (the README's picture):

    python bench/quality_steps.py --plot bench/results/quality_steps-cpu/quality_steps.json docs/quality_steps.png
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def edit(model: str, bench: Path, out: Path, sampler: str, steps: int, seed: int, batch_size: int) -> float:
    """sample.py over the benchmark; returns the wall seconds (0 when the folder was already complete)."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "--pretrained", model, "--batch", str(bench), "--out", str(out),
           "--sampler", sampler, "--steps", str(steps), "--seed", str(seed), "--batch-size", str(batch_size)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    done = r.stdout.strip().splitlines()[-1]
    print(f"{out.name}: {done}", file=sys.stderr, flush=True)
    return 0.0 if done.startswith("0 written") else time.perf_counter() - t0


def distances(folders: dict[str, Path], reference: Path, model: str) -> dict[str, dict]:
    """Mean |Δ| in pixels and mean CLIP cosine of every folder's images against the reference folder's."""
    from PIL import Image

    from pbe_jax.eval.metrics import clip_embedder, cosine, in_batches

    embed = clip_embedder(model)
    ids = sorted(p.stem for p in reference.glob("*.png"))
    load = lambda folder: [np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in ids]  # noqa: E731
    ref_images = load(reference)
    ref_features = in_batches(embed, ref_images)
    out = {}
    for name, folder in folders.items():
        images = load(folder)
        pixel = [np.abs(a.astype(np.float64) - b).mean() for a, b in zip(images, ref_images)]
        out[name] = {"mean_abs_px": float(np.mean(pixel)),
                     "clip_cosine": float(np.mean(cosine(in_batches(embed, images), ref_features))), "n": len(ids)}
    return out


PANELS = (("to_own_limit_mean_abs_px", "mean |Δ| to the sampler's own limit (pixels, 0–255)"),
          ("attr_all", "attribute score: shape, colour and pattern all right"),
          ("clip_score", "CLIP score (region against the exemplar)"))
LABELS = {"plms": "PLMS (the paper's)", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++ 2M (the default)", "unipc": "UniPC"}


def plot(result: dict, out: Path) -> None:
    """Quality against steps, one line per sampler, one panel per measure (matplotlib, from the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6), constrained_layout=True)
    samplers = list(dict.fromkeys(r["sampler"] for r in result["rows"]))
    for ax, (key, title) in zip(axes, PANELS):
        for sampler in samplers:
            rows = sorted((r for r in result["rows"] if r["sampler"] == sampler), key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rows], [r[key] for r in rows], marker="o", label=LABELS.get(sampler, sampler))
        if key != "to_own_limit_mean_abs_px":
            ref = result["reference"]
            ax.axhline(ref[key], color="grey", linestyle=":", label=f"DDIM-{ref['steps']}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("denoising steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"The shipped model on {result['n']} held-out synthetic edits (bench/quality_steps.py)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only draw the plot of a JSON already written")
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "synthetic"))
    p.add_argument("--work", default="runs/quality_steps")
    p.add_argument("--n", type=int, default=100, help="benchmark items (default 100)")
    p.add_argument("--samplers", default="plms,ddim,dpmpp_2m,unipc")
    p.add_argument("--steps", default="10,15,20,25,50")
    p.add_argument("--reference-steps", type=int, default=250,
                   help="steps of the converged references (DDIM, DPM-Solver++; default 250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=25)
    args = p.parse_args()
    if args.plot:
        source, png = map(Path, args.plot)
        try:
            plot(json.loads(source.read_text()), png)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--plot {source}: {e!r}")
        print(f"wrote {png}")
        return 0
    from pbe_jax.data import benchmark

    work = Path(args.work)
    bench = work / "benchmark"
    benchmark.make_benchmark(bench, n=args.n, image_size=64)
    runs = {(s, int(k)): work / f"{s}_{k}" for s in args.samplers.split(",") for k in args.steps.split(",")}
    reference = work / f"ddim_{args.reference_steps}"
    solver_reference = work / f"dpmpp_2m_{args.reference_steps}"
    seconds = {"reference": edit(args.model, bench, reference, "ddim", args.reference_steps, args.seed,
                                 args.batch_size),
               "solver_reference": edit(args.model, bench, solver_reference, "dpmpp_2m", args.reference_steps,
                                        args.seed, args.batch_size)}
    for (sampler, steps), folder in runs.items():
        seconds[folder.name] = edit(args.model, bench, folder, sampler, steps, args.seed, args.batch_size)

    folders = [str(f) for f in runs.values()] + [str(reference), str(solver_reference)]
    r = subprocess.run([sys.executable, "-m", "pbe_jax.eval", *folders, "--benchmark", str(bench), "--model",
                        args.model, "--json"], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"evaluation failed:\n{r.stderr[-3000:]}")
    reports = json.loads(r.stdout)
    dist = distances({f.name: f for f in runs.values()} | {solver_reference.name: solver_reference}, reference,
                     args.model)
    own = distances({f.name: f for (s, _), f in runs.items() if s in ("dpmpp_2m", "unipc")}, solver_reference,
                    args.model)

    rows = []
    for (sampler, steps), folder in runs.items():
        m = reports[str(folder)]["metrics"]
        rows.append({"sampler": sampler, "steps": steps, "clip_score": m["clip"]["mean"] * 100,
                     "psnr": m["psnr"]["mean"], "ssim": m["ssim"]["mean"],
                     **{f"attr_{k}": m["attributes"][k] for k in ("shape", "colour", "pattern", "all")},
                     **{f"to_reference_{k}": v for k, v in dist[folder.name].items() if k != "n"},
                     **{f"to_own_limit_{k}": v for k, v in own.get(folder.name, dist[folder.name]).items()
                        if k != "n"},
                     "seconds": round(seconds[folder.name], 1)})
    m = reports[str(reference)]["metrics"]
    ref_row = {"sampler": "ddim", "steps": args.reference_steps, "clip_score": m["clip"]["mean"] * 100,
               "psnr": m["psnr"]["mean"], "ssim": m["ssim"]["mean"],
               **{f"attr_{k}": m["attributes"][k] for k in ("shape", "colour", "pattern", "all")},
               "seconds": round(seconds["reference"], 1)}
    plms50 = next((r for r in rows if r["sampler"] == "plms" and r["steps"] == 50), None)
    enough = {}
    if plms50 is not None:
        for target in ("to_reference", "to_own_limit"):
            for sampler in args.samplers.split(","):
                ok = [r["steps"] for r in rows if r["sampler"] == sampler
                      and r[f"{target}_mean_abs_px"] <= plms50[f"{target}_mean_abs_px"]]
                enough.setdefault(target, {})[sampler] = min(ok) if ok else None
    m = reports[str(solver_reference)]["metrics"]
    solver_row = {"sampler": "dpmpp_2m", "steps": args.reference_steps, "clip_score": m["clip"]["mean"] * 100,
                  "psnr": m["psnr"]["mean"], "ssim": m["ssim"]["mean"],
                  **{f"attr_{k}": m["attributes"][k] for k in ("shape", "colour", "pattern", "all")},
                  **{f"to_reference_{k}": v for k, v in dist[solver_reference.name].items() if k != "n"},
                  "to_own_limit_mean_abs_px": 0.0, "to_own_limit_clip_cosine": 1.0,
                  "seconds": round(seconds["solver_reference"], 1)}
    result = {"model": args.model, "n": args.n, "seed": args.seed, "batch_size": args.batch_size, "rows": rows,
              "reference": ref_row, "solver_reference": solver_row, "fewest_steps_as_close_as_plms50": enough}
    (work / "quality_steps.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, work / "quality_steps.png")

    ref = f"DDIM-{args.reference_steps}"
    print(f"| sampler | steps | CLIP score | PSNR | SSIM | attr. all three | px to {ref} (mean abs.) | CLIP cos. to "
          f"{ref} | px to its own limit | CLIP cos. to its own limit | s ({args.n} items) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref_row = dict(ref_row, to_reference_mean_abs_px=0.0, to_reference_clip_cosine=1.0, to_own_limit_mean_abs_px=0.0,
                   to_own_limit_clip_cosine=1.0)
    for r in rows + [solver_row, ref_row]:
        print(f"| {r['sampler']} | {r['steps']} | {r['clip_score']:.2f} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
              f"{r['attr_all']:.3f} | {r['to_reference_mean_abs_px']:.2f} | {r['to_reference_clip_cosine']:.4f} | "
              f"{r['to_own_limit_mean_abs_px']:.2f} | {r['to_own_limit_clip_cosine']:.4f} | {r['seconds']} |")
    print(f"fewest steps at least as close as PLMS-50 (to {ref}; to the sampler's own limit): {json.dumps(enough)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

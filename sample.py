"""Edit images with an exemplar (Paint by Example, JAX).

With no arguments, the small model that ships in checkpoints/synthetic/ (trained by this project on its
synthetic world, configs/synthetic.py) edits the shipped example in examples/synthetic/ and writes
out/edit.png and out/edit_grid.png (source | mask | reference | edit):
    python sample.py
    python sample.py --samples 4 --seed 7          # four edits of the example, seeds 7..10, in one grid

One edit of your own:
    python sample.py --pretrained DIR --image src.png --mask mask.png --reference ref.png --out result.png
Many (resumable; outputs are OUT/<id>.png):
    python sample.py --pretrained DIR --batch manifest.jsonl --out results/
    python sample.py --pretrained DIR --batch COCOEE_DIR --out results/

Real, SD-sized weights: DIR is a diffusers Paint-by-Example folder (e.g. a local copy of
Fantasy-Studio/Paint-by-Example, 512² images), a checkpoint written by `python -m pbe_jax.convert`, or a Hub
repository id when the network allows. The working size defaults to the model's (512 for SD, 64 for the
shipped model); use bfloat16 (the default on GPU/TPU) for SD-sized models.
A manifest is JSONL with "source", "mask", "reference" (and optionally "id") per line; a COCOEE folder has
source/ (or GT_*), mask/ (or Mask_*) and reference/ (or Ref_*) subfolders whose files share an id.
Masks: white = the region to replace.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "checkpoints" / "synthetic"
DEFAULT_EXAMPLE = ROOT / "examples" / "synthetic"
DEFAULT_OUT = Path("out") / "edit.png"
GRID_HEIGHT = 256  # smaller edits are enlarged (whole pixels) in the grid, for looking at


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(DEFAULT_MODEL),
                   help="model folder, checkpoint, or Hub repository id (default: the shipped synthetic model, "
                        f"{DEFAULT_MODEL.relative_to(ROOT)})")
    p.add_argument("--image", help="source image (one edit)")
    p.add_argument("--mask", help="mask image, white = edit (one edit)")
    p.add_argument("--reference", help="exemplar image (one edit)")
    p.add_argument("--batch", help="a JSONL manifest or a COCOEE-layout folder (many edits)")
    p.add_argument("--out", help=f"output PNG (one edit; default {DEFAULT_OUT}) or folder (batch, required)")
    p.add_argument("--samples", type=int, default=1,
                   help="one edit: how many edits to draw, seeds seed .. seed+N-1 (out.png, out_1.png, ...)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--scale", type=float, default=5.0,
                   help="classifier-free guidance scale (default 5); 1 = the exemplar's condition alone, "
                        "0 = the learned unconditional vector alone (no exemplar)")
    p.add_argument("--seed", type=int, default=0, help="random seed; job i of a batch uses seed + i")
    p.add_argument("--sampler", choices=["plms", "ddim"], default="plms")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (default 0, deterministic)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step, split over all local devices")
    p.add_argument("--size", type=int, default=None, help="working resolution (default: the model's, 512 for SD)")
    p.add_argument("--keep-unmasked", action="store_true", help="paste the source back outside the mask")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    args = p.parse_args(argv)
    single = [args.image, args.mask, args.reference]
    if args.batch and any(single):
        p.error("give either --batch or --image/--mask/--reference, not both")
    if not args.batch and not any(single):  # the shipped example
        args.image, args.mask, args.reference = (str(DEFAULT_EXAMPLE / f"{r}.png")
                                                 for r in ("source", "mask", "reference"))
    elif not args.batch and not all(single):
        p.error("one edit needs --image, --mask and --reference (or none of them for the shipped example)")
    if args.batch and not args.out:
        p.error("--batch needs --out, the results folder")
    if args.samples < 1 or (args.batch and args.samples != 1):
        p.error("--samples must be ≥ 1, and is for one edit only")
    args.out = args.out or str(DEFAULT_OUT)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from pbe_jax import batch, images, parallel
    from pbe_jax.pipeline import PaintByExample

    try:
        pipe = PaintByExample.from_pretrained(args.pretrained, dtype=args.dtype, mesh=parallel.data_mesh())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = args.size or pipe.default_size
    options = dict(steps=args.steps, guidance_scale=args.scale, sampler=args.sampler, eta=args.eta,
                   height=size, width=size, keep_unmasked=args.keep_unmasked)

    if not args.batch:
        try:
            job = batch.Job("single", Path(args.image), Path(args.mask), Path(args.reference))
            source, mask, reference = batch.check_inputs(job)
        except images.ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        results = pipe(source, mask, reference, seed=args.seed, num_images_per_reference=args.samples, **options)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out] + [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, len(results))]
        for result, path in zip(results, paths):
            batch.save_png(result, path)
        grid_path = out.with_name(out.stem + "_grid.png")
        picture = batch.grid(images.resize_rgb(source, (size, size)), images.resize_mask(mask, (size, size)),
                             reference, *results)
        batch.save_png(batch.enlarge(picture, GRID_HEIGHT), grid_path)
        out = ", ".join(map(str, paths))
        print(f"wrote {out} and {grid_path}")
        return 0

    try:
        jobs = batch.load_jobs(Path(args.batch))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def edit(sources, masks, refs, seeds):
        return pipe(sources, masks, refs, seed=seeds, **options)

    stats = batch.run(jobs, Path(args.out), edit, batch_size=args.batch_size, seed=args.seed,
                      progress=lambda total: tqdm(total=total, unit="img", desc="editing"))
    failures = f" (see {Path(args.out) / 'failures.jsonl'})" if stats["failed"] else ""
    print(f"{stats['written']} written, {stats['skipped_done']} already done, {stats['failed']} failed{failures} "
          f"in {stats['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

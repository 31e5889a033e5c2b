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
On several hosts (each runs the same command; every job is done once, the pictures are those of a one-host
run, each host resumes its own share, and the failures of all hosts end up in OUT/failures.jsonl):
    python sample.py --pretrained gs://b/model --batch gs://b/COCOEE --out gs://b/results --distributed
    python sample.py ... --shard 3/8          # host 3 of 8, for hosts without JAX's collectives
Any path may be local or in a bucket (gs://...).

Real, SD-sized weights: DIR is a diffusers Paint-by-Example folder (e.g. a local copy of
Fantasy-Studio/Paint-by-Example, 512² images), a checkpoint written by `python -m pbe_jax.convert`, the
original release's single file (model.ckpt, or a .safetensors of it), or a Hub repository id when the network
allows. The working size defaults to the model's (512 for SD, 64 for the
shipped model); use bfloat16 (the default on GPU/TPU) for SD-sized models.
A manifest is JSONL with "source", "mask", "reference" (and optionally "id") per line; "reference" may list
several exemplars (one edit each, OUT/<id>_0.png, ...), and a line may set its own "padding_mask_crop",
"mask_blur" and "strength". A COCOEE folder has source/ (or GT_*), mask/ (or Mask_*) and reference/ (or Ref_*)
subfolders whose files share an id. Masks: white = the region to replace.

A photo (any size, EXIF-rotated or not) is edited at its own size: every result has its source's size and
orientation. With --padding-mask-crop PX the region around the mask (PX pixels of margin, grown to the working
aspect ratio) is edited at the model's full working size and pasted back through the mask, so the rest of the
photo is unchanged, bit for bit: the choice for a small object in a large photo. Without it the whole photo is
the model's picture, at the working size and the photo's aspect ratio, resized back to the photo's size.
    python sample.py --pretrained DIR --image photo.jpg --mask mask.png --reference ref.png --padding-mask-crop 32
    python sample.py ... --reference a.png b.png c.png       # three exemplars for one photo, in one batch
"""
import argparse
import json
import sys
from pathlib import Path

# Shared with the web page and the library; plain values, so --help imports no JAX.
from pbe_jax.defaults import (DEFAULT_SAMPLER, DEFAULT_SCALE, DEFAULT_STEPS, ROOT, SAMPLERS, SHIPPED_EXAMPLE,
                              SHIPPED_MODEL)

DEFAULT_OUT = Path("out") / "edit.png"


def at_least(low, kind=int):
    """An argparse type: a number ≥ `low`, else argparse's own one-line error (exit status 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    from pbe_jax import compile_cache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(SHIPPED_MODEL),
                   help="model folder, checkpoint, the original release's single file (model.ckpt, .safetensors), "
                        "or Hub repository id (default: the shipped synthetic model, "
                        f"{SHIPPED_MODEL.relative_to(ROOT)})")
    p.add_argument("--lora", metavar="FILE",
                   help="a UNet LoRA adapter in diffusers' layout (pytorch_lora_weights.safetensors, or its folder), "
                        "merged into the model's weights")
    p.add_argument("--lora-scale", type=at_least(0.0, float), default=1.0,
                   help="the adapter's strength, times its alpha / rank (default 1)")
    p.add_argument("--image", help="source image (one edit)")
    p.add_argument("--mask", help="mask image, white = edit (one edit)")
    p.add_argument("--reference", nargs="+", help="exemplar image (one edit); several: one edit of the source for "
                                                   "each, in one batch (out.png, out_1.png, ...)")
    p.add_argument("--batch", help="a JSONL manifest or a COCOEE-layout folder (many edits)")
    p.add_argument("--out", help=f"output PNG (one edit; default {DEFAULT_OUT}) or folder (batch, required)")
    p.add_argument("--samples", type=at_least(1), default=1,
                   help="one edit: how many edits to draw, seeds seed .. seed+N-1 (out.png, out_1.png, ...)")
    p.add_argument("--steps", type=at_least(1), default=DEFAULT_STEPS,
                   help=f"denoising steps (default {DEFAULT_STEPS}; the paper: --sampler plms --steps 50)")
    p.add_argument("--scale", type=at_least(0.0, float), default=DEFAULT_SCALE,
                   help=f"classifier-free guidance scale (default {DEFAULT_SCALE:g}); 1 = the exemplar's condition "
                        "alone, 0 = the learned unconditional vector alone (no exemplar)")
    p.add_argument("--seed", type=int, default=0, help="random seed; job i of a batch uses seed + i")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help="plms (the paper's, PNDM in diffusers), ddim, dpmpp_2m (DPM-Solver++ 2M) or unipc, each "
                        f"equal to the diffusers scheduler of that name (default {DEFAULT_SAMPLER}, with --steps "
                        f"{DEFAULT_STEPS}: 2.5x fewer network calls than PLMS-50 for nearly its scores; see the "
                        "docs/sampling.md)")
    p.add_argument("--eta", type=at_least(0.0, float), default=0.0, help="DDIM η (default 0, deterministic; with --sampler ddim)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="images per step, split over all local devices")
    p.add_argument("--size", type=at_least(8), default=None,
                   help="working resolution, size × size, a multiple of the autoencoder's factor (default: about the "
                        "model's own pixel count, 512² for SD, at the aspect ratio of the photo or of the crop; give "
                        "it for one compiled shape over a batch of photos of many shapes)")
    p.add_argument("--padding-mask-crop", type=at_least(0), default=None, metavar="PX",
                   help="edit only the region around the mask, PX pixels larger on each side and grown to the "
                        "working aspect ratio, at the full working size, and paste it back into the photo through "
                        "the mask (diffusers' padding_mask_crop): the rest of the photo is kept bit for bit. The "
                        "choice for photos larger than the working size (default: no crop, the whole photo)")
    p.add_argument("--mask-blur", type=at_least(0.0, float), default=0.0, metavar="R",
                   help="feather the mask by a Gaussian of radius R photo pixels (diffusers' mask_processor.blur); "
                        "the pasted edit then fades into the photo (default 0)")
    p.add_argument("--strength", type=at_least(0.0, float), default=1.0, metavar="S",
                   help="in (0, 1]: start from the source noised to S of the way (running the last S·steps steps), "
                        "so the edit keeps the old region's layout; 1 = from pure noise (default)")
    p.add_argument("--keep-unmasked", action="store_true", help="paste the source back outside the mask (without "
                                                                "--padding-mask-crop, which always does)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--distributed", action="store_true",
                   help="batch: this is one of several hosts; call jax.distributed.initialize() (found by itself on "
                        "TPU pod slices; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) "
                        "and edit this process's share of the jobs")
    compile_cache.add_argument(p)
    p.add_argument("--shard", metavar="I/N", help="batch: edit only share I of N (0 ≤ I < N), without collectives; "
                                                 "the last shard to finish writes the failures summary")
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None):
    p = parser or build_parser()
    args = p.parse_args(argv)
    if not 0 < args.strength <= 1:
        p.error(f"--strength must be in (0, 1], got {args.strength}")
    single = [args.image, args.mask, args.reference]
    if args.batch and any(single):
        p.error("give either --batch or --image/--mask/--reference, not both")
    if not args.batch and not any(single):  # the shipped example
        args.image, args.mask = (str(SHIPPED_EXAMPLE / f"{r}.png") for r in ("source", "mask"))
        args.reference = [str(SHIPPED_EXAMPLE / "reference.png")]
    elif not args.batch and not all(single):
        p.error("one edit needs --image, --mask and --reference (or none of them for the shipped example)")
    if args.batch and not args.out:
        p.error("--batch needs --out, the results folder")
    if args.batch and args.samples != 1:
        p.error("--samples is for one edit only")
    if not args.batch and len(args.reference) > 1 and args.samples != 1:
        p.error("give several --reference images or --samples, not both")
    if args.lora_scale != 1.0 and not args.lora:
        p.error("--lora-scale needs --lora")
    if args.eta and args.sampler != "ddim":
        p.error(f"--eta is DDIM's; give --sampler ddim (the {args.sampler} sampler has no η)")
    if (args.distributed or args.shard) and not args.batch:
        p.error("--distributed and --shard split a --batch run")
    if args.distributed and args.shard:
        p.error("give --distributed or --shard, not both")
    if args.shard:
        from pbe_jax.batch import parse_shard

        try:
            args.shard = parse_shard(args.shard)
        except ValueError as e:
            p.error(f"--{e}")
    args.out = args.out or str(DEFAULT_OUT)
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    from pbe_jax import compile_cache, parallel
    from pbe_jax.pipeline import PaintByExample

    compile_cache.enable(args.compile_cache)  # before anything compiles

    if args.distributed:
        parallel.initialize_distributed()  # before anything touches a device
    args.jobs = None
    if args.batch:  # a batch with nothing to do is an error before minutes of loading a model
        from pbe_jax import batch

        try:
            args.jobs = batch.load_jobs(args.batch)
        except batch.NoJobsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (OSError, ValueError):
            pass  # listed again and reported by run_batch, after the model's own errors
    try:
        pipe = PaintByExample.from_pretrained(args.pretrained, dtype=args.dtype, mesh=parallel.data_mesh(),
                                              lora=args.lora, lora_scale=args.lora_scale)
    except (OSError, ValueError) as e:  # missing folder or file, unreachable bucket, weights, config or LoRA errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.size and args.size % pipe.vae_factor:
        parser.error(f"--size {args.size}: must be a multiple of {pipe.vae_factor}, this model's autoencoder factor")
    options = dict(steps=args.steps, guidance_scale=args.scale, sampler=args.sampler, eta=args.eta,
                   height=args.size, width=args.size, keep_unmasked=args.keep_unmasked,
                   padding_mask_crop=args.padding_mask_crop, mask_blur=args.mask_blur, strength=args.strength)
    from pbe_jax import memory

    try:
        return (run_batch if args.batch else edit_one)(args, pipe, options)
    except memory.TooLargeError as e:  # refused before compiling, rather than killed for memory
        print(f"error: {e}", file=sys.stderr)
        return 1


def edit_one(args, pipe, options) -> int:
    from pbe_jax import batch, images, storage

    try:  # the source and mask once, however many references
        source, mask, first = batch.check_inputs(batch.Job("single", storage.path(args.image),
                                                           storage.path(args.mask), storage.path(args.reference[0])))
        references = [first] + [images.to_rgb(storage.path(r), r) for r in args.reference[1:]]
    except images.ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = pipe(source, mask, references, seed=args.seed, num_images_per_reference=args.samples, **options)
    out = storage.path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] + [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, len(results))]
    for result, path in zip(results, paths):
        images.save_png(result, path)
    grid_path = out.with_name(out.stem + "_grid.png")
    images.save_png(images.edit_grid(source, mask, references[0], results), grid_path)
    print(f"wrote {', '.join(map(str, paths))} and {grid_path}")
    return 0


def run_batch(args, pipe, options) -> int:
    import jax
    from tqdm import tqdm

    from pbe_jax import batch, parallel, storage

    shard = (jax.process_index(), jax.process_count()) if args.distributed else args.shard or (0, 1)
    out = storage.path(args.out)
    try:
        storage.check_reachable(out)
        jobs = args.jobs if getattr(args, "jobs", None) else batch.load_jobs(args.batch)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    def edit(sources, masks, refs, seeds, row_options):
        return pipe(sources, masks, refs, seed=seeds, **{**options, **row_options})

    index, count = shard
    desc = "editing" if count == 1 else f"editing (shard {index}/{count})"
    stats = batch.run(jobs, out, edit, batch_size=args.batch_size, seed=args.seed, shard=shard,
                      progress=lambda total: tqdm(total=total, unit="img", desc=desc))
    line = f"{stats['written']} written, {stats['skipped_done']} already done, {stats['failed']} failed"
    if count == 1:
        failures = f" (see {out / 'failures.jsonl'})" if stats["failed"] else ""
        print(f"{line}{failures} in {stats['seconds']} s")
        return 0
    print(f"shard {index}/{count}: {line} in {stats['seconds']} s")
    if args.distributed:  # every host's counts and failures, gathered; host 0 writes the summary
        everyone = parallel.gather_json({k: stats[k] for k in ("written", "skipped_done", "failed", "failures")})
        if index == 0:
            summarise(out, jobs, everyone)
        return 0
    batch.shard_done(out, shard)
    records = batch.collect_shard_failures(out, count)
    if records is None:
        print(f"the failures of all {count} shards go to {out / 'failures.jsonl'} when the last one finishes")
    else:
        summarise(out, jobs, [{"failures": records}])
    return 0


def summarise(out, jobs, shards: list[dict]) -> None:
    from pbe_jax import batch

    records = [r for s in shards for r in s["failures"]]
    path = batch.write_summary(out, jobs, records)
    totals = {k: sum(s[k] for s in shards) for k in ("written", "skipped_done", "failed") if k in shards[0]}
    counts = ", ".join(f"{v} {k.replace('skipped_done', 'already done')}" for k, v in totals.items())
    print(f"all shards: {counts + '; ' if counts else ''}{len(records)} failed in all, listed in {path}"
          + (": " + json.dumps([r["id"] for r in records[:10]]) if records else ""))


if __name__ == "__main__":
    sys.exit(main())

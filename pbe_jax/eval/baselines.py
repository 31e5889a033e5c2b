"""The baselines that need no model, as results folders to score beside a model's: copy-paste (the paper's:
the reference resized into the mask's box) and unchanged (the source as it is, the floor); each optionally
passed through a model's autoencoder (encode, decode), which shows what that autoencoder alone costs, since
every edit of a latent-diffusion model comes out of its decoder.

    python -m pbe_jax.eval.baselines {copy-paste,unchanged} BENCH OUT [--through-vae MODEL]

BENCH is a COCOEE-layout folder (source/, mask/, reference/: this project's benchmark, as
`python -m pbe_jax.data.benchmark make` writes it, or the release's); OUT/<id>.png is the full result at the
source's size, as `sample.py --batch` writes it. Runs through `pbe_jax.batch.run`: resumable (results already
in OUT are kept) and unusable inputs skipped and listed in OUT/failures.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pbe_jax import batch, images, storage
from pbe_jax.convert import load_component
from pbe_jax.eval.features import Extractor

BATCH_SIZE = 8  # images per autoencoder call (and per batch.run chunk); one compiled shape per image size

Through = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def paste_reference(source: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The paper's copy-paste edit: the reference resized (bicubic) to the bounding box of the mask's white
    (≥ 0.5) pixels and pasted over it; the source everywhere else."""
    box = images.mask_box(mask)
    if box is None:
        raise ValueError("copy-paste needs a mask with white pixels; this one is empty")
    x0, y0, x1, y1 = box
    out = source.copy()
    out[y0:y1, x0:x1] = images.resize_rgb(reference, (y1 - y0, x1 - x0))
    return out


def autoencoder_roundtrip(model, batch_size: int = BATCH_SIZE) -> Through:
    """A function from uint8 (H, W, 3) images (a list; sizes may differ) to the same images encoded (posterior
    mean) and decoded by the autoencoder of `model` (a Paint-by-Example folder or checkpoint, or its vae/
    folder). Images of one size go through together, `batch_size` per call, the last call padded to
    `batch_size` rows: one compilation per image size, and each image's pixels those of a call with it alone."""
    folder = storage.path(model)
    folder = folder / "vae" if (folder / "vae").is_dir() else folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{model}: no such model folder")
    vae = load_component(folder, "vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def one(vae, image):  # (H, W, 3) uint8, as a batch of one
        out = vae.decode(vae.encode(image[None].astype(jnp.float32) / 127.5 - 1.0).mean).astype(jnp.float32)
        return jnp.round(jnp.clip(out[0] / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)

    # One call per batch, but the images one after another inside it: XLA's arithmetic can differ in the last
    # bit between batch shapes (on CPU it moves ~1 pixel in 20 000 by one level), and a baseline's pixels should
    # not depend on how many images went through with it. On CPU a batched autoencoder is only ~15 % faster.
    roundtrip = Extractor(vae, batch_size=batch_size, apply=lambda vae, x: jax.lax.map(lambda im: one(vae, im), x))

    def apply(batch_images: Sequence[np.ndarray]) -> list[np.ndarray]:
        for image in batch_images:
            h, w = image.shape[:2]
            if h % factor or w % factor:
                raise ValueError(f"{folder}: the autoencoder needs sides divisible by {factor}, got {w}×{h}")
        return roundtrip.rows(batch_images)

    return apply


def _run(benchmark_dir, out_dir, edit, through: Through | None = None) -> dict:
    """`out_dir/<id>.png` = edit(source, mask, reference), then `through` it when given (e.g.
    `autoencoder_roundtrip`), for every item of a COCOEE-layout folder, through `batch.run`: resumable
    (results already there are kept), unusable inputs skipped and listed in out_dir/failures.jsonl. Returns
    batch.run's counts."""
    def edit_batch(sources, masks, references, seeds, options):  # noqa: ARG001 (no per-line options here)
        results = [edit(*item) for item in zip(sources, masks, references)]
        return through(results) if through is not None else results

    return batch.run(batch.read_layout(benchmark_dir), out_dir, edit_batch, batch_size=BATCH_SIZE, seed=0)


def copy_paste(benchmark_dir, out_dir, through: Through | None = None) -> dict:
    """The copy-paste baseline's results folder (see `paste_reference`)."""
    return _run(benchmark_dir, out_dir, paste_reference, through)


def unchanged(benchmark_dir, out_dir, through: Through | None = None) -> dict:
    """The floor: every result is its source as it is."""
    return _run(benchmark_dir, out_dir, lambda source, mask, reference: source, through)


BASELINES = {"copy-paste": copy_paste, "unchanged": unchanged}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pbe_jax.eval.baselines", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(BASELINES),
                   help="which baseline: copy-paste (the reference resized into the mask's box) or unchanged "
                        "(the source)")
    p.add_argument("benchmark", help="a COCOEE-layout folder (source/, mask/, reference/)")
    p.add_argument("out", help="results folder to write")
    p.add_argument("--through-vae", metavar="MODEL",
                   help="pass every result through MODEL's autoencoder (encode, decode): what a latent-diffusion "
                        "model with that autoencoder could at best give back (MODEL: a Paint-by-Example folder "
                        "or checkpoint, or its vae/)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        through = autoencoder_roundtrip(args.through_vae) if args.through_vae else None
        stats = BASELINES[args.name](args.benchmark, args.out, through)
    except (FileNotFoundError, ValueError) as e:  # images.ImageError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {args.name}, {stats['written']} results written, {stats['skipped_done']} already "
          f"there, {stats['failed']} inputs unusable" + (" (see failures.jsonl)" if stats["failed"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

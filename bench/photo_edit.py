"""A photo-sized scene edited in a small region by the shipped model, with and without the crop around the mask
(docs/sampling.md, "Photos").

    python bench/photo_edit.py                                   # 1536×1024, about a minute on 2 CPU cores
    python bench/photo_edit.py --figure docs/photo_edit.png --out bench/results/cpu/photo_edit.json

The scene is drawn by the synthetic generator at the photo's size, with objects a few percent of its side (the
shipped model was trained on 64² scenes whose objects are 8–22 % of the side). One object is masked by its box
and replaced by another kind's exemplar, three ways: the whole photo as the model's picture (no crop), the same
with the photo pasted back outside the mask (--keep-unmasked), and the region around the mask edited at the
model's working size and pasted back through the mask (--padding-mask-crop). Prints JSON: per way, the working
size, the seconds (after a warm-up), whether the photo is unchanged outside the mask, the PSNR outside it against
the photo, and how far the masked region moved.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scene(width: int, height: int, seed: int):
    """A width × height synthetic photo, one of its objects' box as the mask (with a margin), and an exemplar of
    other attributes from the benchmark's generator."""
    from pbe_jax.data import benchmark, synthetic

    rng = np.random.default_rng(seed)
    side = max(width, height)
    for _ in range(50):
        s = synthetic.render_scene(rng, side, min_objects=14, max_objects=22, radius=(0.02, 0.04))
        fits = [o for o in s.objects if o["visible"] > 0.95 and o["extent"][2] < width - 40 and
                o["extent"][3] < height - 40 and o["extent"][0] > 40 and o["extent"][1] > 40]
        if fits:
            break
    target = fits[len(fits) // 2]
    x0, y0, x1, y1 = (int(v) for v in target["extent"])
    margin = max(4, (x1 - x0) // 12)
    mask = np.zeros((height, width), np.uint8)
    mask[y0 - margin:y1 + margin, x0 - margin:x1 + margin] = 255
    reference = benchmark.make_item(seed, image_size=64).reference
    return np.ascontiguousarray(s.image[:height, :width]), mask, reference


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def figure(photo, mask, reference, results: dict, box, path: Path, height: int = 300) -> None:
    """Top: the photo (mask outlined), the exemplar, and each result, whole. Bottom: the region around the mask,
    enlarged, in the photo and in each result."""
    def fit(a, h):
        im = Image.fromarray(a)
        return im.resize((max(1, round(im.width * h / im.height)), h), Image.BICUBIC)

    outlined = Image.fromarray(photo.copy())
    ys, xs = np.nonzero(mask)
    pad = max(photo.shape[:2]) // 100
    ImageDraw.Draw(outlined).rectangle((xs.min() - pad, ys.min() - pad, xs.max() + pad, ys.max() + pad),
                                       outline=(255, 45, 85), width=max(photo.shape[:2]) // 120)
    top = [("photo (mask outlined)", fit(np.asarray(outlined), height)), ("exemplar", fit(reference, height))]
    top += [(name, fit(r, height)) for name, r in results.items()]
    x0, y0, x1, y1 = box
    zoom = [("region of the photo", photo)] + list(results.items())
    bottom = [(name, fit(np.ascontiguousarray(a[y0:y1, x0:x1]), height)) for name, a in zoom]
    label, gap = 28, 8
    font = ImageFont.load_default(size=18)
    width = max(sum(im.width for _, im in row) + gap * (len(row) - 1) for row in (top, bottom))
    canvas = Image.new("RGB", (width, 2 * (height + label) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate((top, bottom)):
        x, y = 0, r * (height + label + gap)
        for name, im in row:
            draw.text((x + 2, y + 3), name, fill="black", font=font)
            canvas.paste(im, (x, y + label))
            x += im.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(ROOT / "checkpoints" / "synthetic"))
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--padding-mask-crop", type=int, default=32)
    p.add_argument("--figure", help="write the picture here (PNG)")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)

    import jax

    from bench.input_pipeline import report
    from pbe_jax.pipeline import PaintByExample

    pipe = PaintByExample.from_pretrained(args.pretrained)
    photo, mask, reference = scene(args.width, args.height, args.seed)
    ways = {"no crop": {}, "no crop, --keep-unmasked": {"keep_unmasked": True},
            f"--padding-mask-crop {args.padding_mask_crop}": {"padding_mask_crop": args.padding_mask_crop}}
    results, rows = {}, {}
    outside = mask == 0
    for name, kw in ways.items():
        call = lambda: pipe(photo, mask, reference, steps=args.steps, sampler="dpmpp_2m", seed=0, **kw)[0]  # noqa
        call()  # compile
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        (edit,) = pipe.prepare(photo, mask, reference, padding_mask_crop=kw.get("padding_mask_crop"))
        results[name] = out
        rows[name] = {"working_size": list(edit.placement.size), "box": list(edit.placement.box),
                      "seconds": round(seconds, 2), "outside_mask_unchanged": bool((out[outside] == photo[outside]).all()),
                      "psnr_outside_mask_db": round(psnr(out[outside], photo[outside]), 2),
                      "mean_abs_change_inside_mask": round(float(np.abs(out[~outside].astype(int)
                                                                        - photo[~outside]).mean()), 1)}
    crop_box = pipe.prepare(photo, mask, reference, padding_mask_crop=args.padding_mask_crop)[0].placement.box
    if args.figure:
        figure(photo, mask, reference, results, crop_box, Path(args.figure))
    ys, xs = np.nonzero(mask)
    report({"photo": [args.width, args.height], "mask_box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                             int(ys.max()) + 1],
            "mask_fraction": round(float((mask > 0).mean()), 4), "model": Path(args.pretrained).name,
            "steps": args.steps, "sampler": "dpmpp_2m", "machine": f"{jax.default_backend()}, {jax.device_count()} "
            f"device(s)", "ways": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

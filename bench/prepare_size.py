"""What storing images with their shorter side at most S loses in the training pairs: the default S of prepare.

    python bench/prepare_size.py --out bench/results/cpu/prepare_size.json
    python bench/prepare_size.py --quick      # one image per size, one pair per box: checks that it runs

Photo-like images (bench/input_pipeline.py's `photo`: a 1/f amplitude spectrum, i.e. white noise shaped in
Fourier space, with sharp-edged shapes and mild noise; saved at JPEG q90 as a camera would) at 12 MP (4032×3024)
and 1920×1080, each with boxes from 2 % to 80 % of the image. Each box is drawn into pairs with make_pair's
geometry (`pairs` internals, the same rng) on the original; the square and the padded box, in normalised
coordinates, are then cut from each version of the image and resized (bicubic, PIL's resize with a box, the
same on every version) to 512² and 224²:
  original       the camera JPEG, decoded: the reference every other version is compared with;
  reencoded      the original re-encoded at q90 at full size, with no resize: the floor of what is measurable
                 (recompressing on the same 8×8 grid at the same quality loses little; after a resize, a
                 re-encode is a fresh compression, which `q90_only` below measures);
  resized_S      `photos.decode(..., max_short_side=S)` (draft-mode JPEG decoding, then Lanczos) as prepare
                 reads: what the resize alone loses;
  stored_S       resized_S re-encoded at q90: what prepare stores at S.
Per version: PSNR of the crops and of the references against the original's (pooled over pairs, and the 5th
percentile over pairs), their largest absolute difference, and the fraction of pairs whose square (reference
box) is smaller than 512 (224) px at that size, i.e. upsampled. Per stored_S also `q90_only`, its crops against
resized_S's (what the re-encode at S costs by itself), and `resize_share_of_error`, the resize's share of
stored_S's squared error (resized_S's over stored_S's): near 0, storing at S loses nothing measurable beyond
the re-encode.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from input_pipeline import QUALITY, jpeg, photo, report  # noqa: E402

SIZES = {"12MP": (4032, 3024), "1920x1080": (1920, 1080)}
SHORT_SIDES = (512, 768, 1024, 1280)
IMAGE, REFERENCE = 512, 224


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def geometry(image_size: tuple[int, int], box: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(square, padded box) as x0, y0, x1, y1 normalised by the image's width and height: make_pair's draw on
    the original (box taken to whole pixels, extended, fitted, squared; padded by `pad` px for the reference)."""
    from pbe_jax.data import pairs

    config = pairs.PairConfig()
    w, h = image_size
    pixel_box = pairs._pixel_box(box)
    ext = pairs._fit_extension(pairs._extend(pixel_box, h, w, config.extend_max, rng), pixel_box, min(h, w))
    x, y, side = pairs._square(ext, h, w, config.shrink_max, rng)
    x0, y0, x1, y1 = pixel_box
    pad = config.pad
    padded = [max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w), min(y1 + pad, h)]
    scale = np.asarray([w, h, w, h], np.float64)
    return np.asarray([x, y, x + side, y + side]) / scale, np.asarray(padded) / scale


def cut(picture: Image.Image, region: np.ndarray, size: int) -> np.ndarray:
    """`region` (normalised) of `picture` resized to size², bicubic with PIL's antialiasing; zeros where the region
    leaves the image (a square around a box longer than the short side), as make_pair pads."""
    w, h = picture.size
    x0, y0, x1, y1 = region * [w, h, w, h]
    border = int(np.ceil(max(0.0, -x0, -y0, x1 - w, y1 - h)))
    if border:
        framed = Image.new("RGB", (w + 2 * border, h + 2 * border))
        framed.paste(picture, (border, border))
        picture, (x0, y0, x1, y1) = framed, (x0 + border, y0 + border, x1 + border, y1 + border)
    return np.asarray(picture.resize((size, size), Image.BICUBIC, box=(x0, y0, x1, y1)))


class Errors:
    """One version's crops against the original's: per-pair mean squared error, the largest absolute difference."""

    def __init__(self):
        self.mse, self.max_abs = [], 0

    def add(self, crop: np.ndarray, truth: np.ndarray) -> None:
        d = crop.astype(np.int16) - truth
        self.mse.append(float(np.mean(d.astype(np.float64) ** 2)))
        self.max_abs = max(self.max_abs, int(np.abs(d).max()))

    def summary(self) -> dict:
        def psnr(mse):  # None: identical
            return round(float(10 * np.log10(255 ** 2 / mse)), 2) if mse > 0 else None

        return {"psnr_db": psnr(np.mean(self.mse)), "psnr_db_p5": psnr(np.percentile(self.mse, 95)),
                "max_abs": self.max_abs}


def measure(size: tuple[int, int], images: int, pairs_per_box: int, rng: np.random.Generator) -> dict:
    """The table for one image size: every version against the original over the same pairs."""
    from pbe_jax.data import photos

    w, h = size
    names = ["original", "reencoded", *(f"{kind}_{s}" for s in SHORT_SIDES for kind in ("resized", "stored"))]
    errors = {n: (Errors(), Errors()) for n in names[1:]}  # (crops, references) against the original's
    q90_only = {s: (Errors(), Errors()) for s in SHORT_SIDES}  # stored_S against resized_S: the re-encode's part
    small_sides = {n: [0, 0] for n in names}  # pairs whose square, reference box is under 512, 224 px there
    stored_size, box_fractions, count = {}, [], 0
    for _ in range(images):
        rgb, boxes = photo(rng, w, h)
        camera = jpeg(rgb)
        original = decoded(camera)
        pictures = {"original": original, "reencoded": decoded(jpeg(original))}
        for s in SHORT_SIDES:
            small = photos.decode(camera, max_short_side=s).rgb
            pictures[f"resized_{s}"], pictures[f"stored_{s}"] = small, decoded(jpeg(small))
        pictures = {k: Image.fromarray(v) for k, v in pictures.items()}
        stored_size = {k: list(v.size) for k, v in pictures.items()}
        for box in boxes:
            box_fractions.append(float((box[2] - box[0]) * (box[3] - box[1]) / (w * h)))
            for _ in range(pairs_per_box):
                square, padded = geometry((w, h), box, rng)
                cuts = {k: (cut(v, square, IMAGE), cut(v, padded, REFERENCE)) for k, v in pictures.items()}
                for name, picture in pictures.items():
                    pw, ph = picture.size
                    small_sides[name][0] += (square[2] - square[0]) * pw < IMAGE
                    small_sides[name][1] += min((padded[2] - padded[0]) * pw, (padded[3] - padded[1]) * ph) < REFERENCE
                    if name != "original":
                        for e, made, truth in zip(errors[name], cuts[name], cuts["original"]):
                            e.add(made, truth)
                for s in SHORT_SIDES:
                    for e, made, truth in zip(q90_only[s], cuts[f"stored_{s}"], cuts[f"resized_{s}"]):
                        e.add(made, truth)
                count += 1
    rows = {}
    for name in names:
        rows[name] = {"size": stored_size[name], "crop_upsampled": round(small_sides[name][0] / count, 3),
                      "reference_upsampled": round(small_sides[name][1] / count, 3)}
        if name in errors:
            rows[name]["crop"], rows[name]["reference"] = (e.summary() for e in errors[name])
    for s in SHORT_SIDES:
        stored, resized = errors[f"stored_{s}"], errors[f"resized_{s}"]
        rows[f"stored_{s}"]["q90_only"] = {k: e.summary() for k, e in zip(("crop", "reference"), q90_only[s])}
        # The resize's part of what storing at s loses (errors add as variances).
        rows[f"stored_{s}"]["resize_share_of_error"] = {k: round(float(np.mean(r.mse) / np.mean(t.mse)), 3)
                                                        for k, r, t in zip(("crop", "reference"), resized, stored)}
    return {"pairs": count, "box_fraction": [round(min(box_fractions), 3), round(max(box_fractions), 3)],
            "versions": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true", help="one image per size, one pair per box")
    args = p.parse_args(argv)
    images, pairs_per_box = (1, 1) if args.quick else (4, 3)
    rng = np.random.default_rng(0)
    result = {"settings": {"image_size": IMAGE, "reference_size": REFERENCE, "jpeg_quality": QUALITY,
                           "short_sides": list(SHORT_SIDES), "images_per_size": images, "pairs_per_box": pairs_per_box,
                           "content": "1/f amplitude spectrum (noise filtered in Fourier space) with sharp-edged "
                                      "shapes and mild noise"},
              "sizes": {}}
    for name, size in SIZES.items():
        result["sizes"][name] = measure(size, images, pairs_per_box, rng)
        print(json.dumps({name: result["sizes"][name]}), file=sys.stderr, flush=True)
    report(result, args.out)


if __name__ == "__main__":
    main()

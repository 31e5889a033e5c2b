"""The paper's self-supervised training pair from one image with boxes, on the host (numpy + PIL): choose a
box, cut the reference out of it, extend it for the mask, crop a square around it. The mask's shape and the
reference's augmentation are made on the device from `box` and `box_ext` (`pbe_jax.data.augment`)."""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class PairConfig:
    """Sizes in pixels. Boxes covering less than `min_box_fraction` of the image are skipped: 1 % is a
    51-px object at 512², whose reference would already be upsampled more than 4× to 224. `pad`,
    `extend_max` and `shrink_max` are the released code's 10 px, 0.4 and 0.6."""

    image_size: int = 512
    reference_size: int = 224
    min_box_fraction: float = 0.01
    pad: int = 10
    extend_max: float = 0.4
    shrink_max: float = 0.6


class NoValidBox(ValueError):
    """An item none of whose boxes can make a pair; the message names the item."""


def valid_boxes(boxes: np.ndarray, height: int, width: int, min_area: float) -> tuple[np.ndarray, int]:
    """The boxes that can make a pair, clipped to the image, and how many were skipped: degenerate (NaN,
    infinite, x1 <= x0 or y1 <= y0), outside the image, or with less than `min_area` px² inside it."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    c = np.clip(np.nan_to_num(b), 0, np.asarray([width, height, width, height], np.float32))
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    ok = finite & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & (w > 0) & (h > 0) & (w * h >= min_area)
    return c[ok], int((~ok).sum())


def _pixel_box(box: np.ndarray) -> np.ndarray:
    """The smallest integer box that contains `box`."""
    return np.concatenate([np.floor(box[:2]), np.ceil(box[2:])]).astype(np.int64)


def _resized(crop: Image.Image, size: int) -> np.ndarray:
    """Bicubic to size², as `images.resize_rgb` (PIL returns a copy when the size already matches)."""
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _reference(picture: Image.Image, box: np.ndarray, pad: int, size: int) -> np.ndarray:
    """The box padded by `pad` px where the image allows (the released code's min(10, free space)), resized
    to size² without keeping the aspect, as the released code does."""
    w, h = picture.size
    x0, y0, x1, y1 = box
    return _resized(picture.crop((max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w), min(y1 + pad, h))), size)


def _extend(box: np.ndarray, height: int, width: int, extend_max: float, rng: np.random.Generator) -> np.ndarray:
    """Each side moved out by a random integer in [0, int(extend_max × the free space on that side)]."""
    free = np.asarray([box[0], box[1], width - box[2], height - box[3]])
    grow = rng.integers(0, np.floor(extend_max * free).astype(np.int64) + 1)
    return box + grow * np.asarray([-1, -1, 1, 1])


def _fit_extension(ext: np.ndarray, box: np.ndarray, side: int) -> np.ndarray:
    """Where the extended box is longer than `side`, shrink its extension on that axis, both ends in
    proportion, until it fits (or is the box itself); the box is never cut."""
    ext = ext.copy()
    for lo, hi in ((0, 2), (1, 3)):
        before, after = box[lo] - ext[lo], ext[hi] - box[hi]
        room = max(side - (box[hi] - box[lo]), 0)
        if before + after > room:
            f = room / (before + after)
            ext[lo], ext[hi] = box[lo] - int(before * f), box[hi] + int(after * f)
    return ext


def _position(e0: int, e1: int, length: int, side: int, rng: np.random.Generator) -> int:
    """Start of a window of `side` on an axis of `length` that contains [e0, e1]: inside the axis when
    side <= length, otherwise covering all of it."""
    lo, hi = max(e1 - side, min(0, length - side)), min(e0, max(0, length - side))
    return int(rng.integers(lo, hi + 1))


def _square(ext: np.ndarray, height: int, width: int, shrink_max: float,
            rng: np.random.Generator) -> tuple[int, int, int]:
    """(x, y, side): as the released code, a square of side min(H, W) at a random position containing the
    extended box, then shrunk on every side by a random margin up to `shrink_max` × the smallest free space
    around the extended box. A box longer than min(H, W) makes the square that long, and PIL's crop fills
    the part outside the image with zeros."""
    side = max(min(height, width), ext[2] - ext[0], ext[3] - ext[1])
    x, y = _position(ext[0], ext[2], width, side, rng), _position(ext[1], ext[3], height, side, rng)
    free = min(ext[0] - x, ext[1] - y, x + side - ext[2], y + side - ext[3])
    margin = int(rng.integers(0, int(shrink_max * free) + 1))
    return x + margin, y + margin, side - 2 * margin


def make_pair(item: dict, rng: np.random.Generator, config: PairConfig = PairConfig()) -> dict:
    """A training pair from {"image": uint8 (H, W, 3), "boxes": (N, 4) pixel x0, y0, x1, y1, "id": str}:

    - one usable box (see `valid_boxes`), chosen uniformly, and taken outward to whole pixels;
    - `reference`: that box padded by up to `pad` px, resized to reference_size²;
    - the extended box: each side moved out by up to `extend_max` of the free space to the image border;
    - `image`: a square crop containing the extended box, resized to image_size². Where the extended box is
      longer than min(H, W) its extension is first reduced to fit; only a box that is itself longer than
      min(H, W) makes the square longer than the short side, and the square is then padded with zeros
      across the short side (the released code instead stretched the whole image, distorting it);
    - `box`, `box_ext`: float32 x0, y0, x1, y1 in the resized crop, within [0, image_size], box ⊆ box_ext;
    - `skipped_boxes`: int32, the item's boxes that were not usable.

    Raises NoValidBox when no box is usable. The same `rng` state gives the same pair."""
    image = item["image"]
    h, w = image.shape[:2]
    boxes, skipped = valid_boxes(item["boxes"], h, w, config.min_box_fraction * h * w)
    if not len(boxes):
        raise NoValidBox(f"{item['id']}: none of its {skipped} boxes is usable (degenerate, outside the {w}×{h} "
                         f"image, or under {config.min_box_fraction:.2%} of its area)")
    box = boxes[rng.integers(len(boxes))]
    pixel_box = _pixel_box(box)
    # Resampling is most of a pair's cost and must stay PIL's; the image goes to PIL once, and both crops are
    # cut and resized there rather than copied through numpy arrays on the way.
    picture = Image.fromarray(image)
    reference = _reference(picture, pixel_box, config.pad, config.reference_size)
    ext = _extend(pixel_box, h, w, config.extend_max, rng)
    ext = _fit_extension(ext, pixel_box, min(h, w))
    x, y, side = _square(ext, h, w, config.shrink_max, rng)
    size = config.image_size
    origin = np.asarray([x, y, x, y], np.float64)

    def to_crop(b):
        return np.clip((b - origin) * (size / side), 0, size).astype(np.float32)

    return {"image": _resized(picture.crop((x, y, x + side, y + side)), size), "reference": reference,
            "box": to_crop(box.astype(np.float64)), "box_ext": to_crop(ext.astype(np.float64)),
            "skipped_boxes": np.int32(skipped)}

"""Where in a photo an edit is made, and how it goes back: the region around the mask, its working size, the
resizes in and out, the feathered mask and the paste into the photo.

The crop, the resizes and the paste follow diffusers' `VaeImageProcessor` as its inpainting pipelines use it
with `padding_mask_crop` (`get_crop_region`, `resize_mode="fill"` on the way in, `apply_overlay` on the way
out), off-by-ones included; `mask_blur` is its `blur`. Tests compare each with diffusers' own function.

The masks here are uint8 (H, W) luminance, white (> 0) = edit, as diffusers' PIL masks are.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageFilter, ImageOps

RESAMPLE = Image.LANCZOS  # VaeImageProcessor's default resample, for images and masks alike


def blur(mask: np.ndarray, radius: float) -> np.ndarray:
    """The mask feathered by a Gaussian of `radius` pixels (`VaeImageProcessor.blur`); unchanged at 0."""
    if radius < 0:
        raise ValueError(f"mask_blur must be ≥ 0, not {radius}")
    if radius == 0:
        return mask
    return np.asarray(Image.fromarray(mask, "L").filter(ImageFilter.GaussianBlur(radius)))


def _grow(lo: int, hi: int, length: float, limit: int) -> tuple[int, int]:
    """[lo, hi) widened about its centre to `length` (truncated), moved back inside [0, limit)."""
    extra = int(length - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def padded_box(mask: np.ndarray, pad: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the box of the mask's non-zero pixels, `pad` pixels larger on each side (within the
    image)."""
    h, w = mask.shape
    on = mask != 0
    cols, rows = np.flatnonzero(on.any(axis=0)), np.flatnonzero(on.any(axis=1))
    if not len(cols):
        raise ValueError("the mask is empty (no white pixels): there is no region to crop to")
    return (max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w),
            min(int(rows[-1]) + 1 + pad, h))


def crop_region(mask: np.ndarray, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): `padded_box`, grown about its centre to the aspect ratio width : height, shifted back
    inside the image, and cut at its border when the image is too small for it
    (`VaeImageProcessor.get_crop_region`)."""
    h, w = mask.shape
    x0, y0, x1, y1 = padded_box(mask, pad)
    aspect = width / height
    if (x1 - x0) / (y1 - y0) > aspect:
        y0, y1 = _grow(y0, y1, (x1 - x0) / aspect, h)
    else:
        x0, x1 = _grow(x0, x1, (y1 - y0) * aspect, w)
    return x0, y0, x1, y1


def _fit(size: tuple[int, int], width: int, height: int, cover: bool) -> tuple[int, int]:
    """The size (w, h) an image of `size` is resized to before it is centred in width × height: the whole
    image inside it (`cover` False, diffusers' "fill") or covering it ("crop")."""
    w, h = size
    wider = width / height < w / h
    if wider != cover:
        return width, h * width // w
    return w * height // h, height


def resize_fill(im: Image.Image, width: int, height: int) -> Image.Image:
    """The whole image, aspect ratio kept, centred in width × height; the bands left over are its first and
    last rows (or columns) stretched (`VaeImageProcessor.resize(resize_mode="fill")`)."""
    w, h = _fit(im.size, width, height, cover=False)
    inner = im.resize((w, h), resample=RESAMPLE)
    out = Image.new(im.mode, (width, height))
    out.paste(inner, (width // 2 - w // 2, height // 2 - h // 2))
    if width / height < im.width / im.height:
        band = height // 2 - h // 2
        if band > 0:
            out.paste(inner.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(inner.resize((width, band), box=(0, inner.height, width, inner.height)), (0, band + h))
    elif width / height > im.width / im.height:
        band = width // 2 - w // 2
        if band > 0:
            out.paste(inner.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(inner.resize((band, height), box=(inner.width, 0, inner.width, height)), (band + w, 0))
    return out


def resize_cover(im: Image.Image, width: int, height: int) -> Image.Image:
    """The image, aspect ratio kept, covering width × height and centred, the excess cut
    (`VaeImageProcessor.resize(resize_mode="crop")`)."""
    w, h = _fit(im.size, width, height, cover=True)
    out = Image.new("RGB", (width, height))
    out.paste(im.resize((w, h), resample=RESAMPLE), (width // 2 - w // 2, height // 2 - h // 2))
    return out


def overlay(mask: np.ndarray, source: np.ndarray, result: np.ndarray,
            box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The photo `source` with `result` seen through `mask` (255 = all result, 0 = all source, in between a
    blend), `result` first resized into `box` (cover) when given (`VaeImageProcessor.apply_overlay`: the
    source is made an alpha layer through PIL's premultiplied RGBa and composited over the result, so the
    arithmetic is PIL's, to the last bit). Pixels where the mask is 0 are the source's exactly."""
    height, width = source.shape[:2]
    keep = ImageOps.invert(Image.fromarray(mask, "L"))
    layer = Image.new("RGBa", (width, height))
    layer.paste(Image.fromarray(source).convert("RGBA").convert("RGBa"), mask=keep)
    edited = Image.fromarray(result)
    if box is not None:
        x0, y0, x1, y1 = box
        canvas = Image.new("RGBA", (width, height))
        canvas.paste(resize_cover(edited, x1 - x0, y1 - y0), (x0, y0))
        edited = canvas.convert("RGB")
    edited = edited.convert("RGBA")
    edited.alpha_composite(layer.convert("RGBA"))
    return np.asarray(edited.convert("RGB"))


def working_size(aspect: float, native: int, multiple: int) -> tuple[int, int]:
    """(height, width): multiples of `multiple`, at most native² pixels, each side from native/2 to 2·native,
    with the aspect ratio (width / height) nearest to `aspect` (on a log scale; the larger area on a tie)."""
    best = None
    for h in range(multiple, 2 * native + 1, multiple):
        w = native * native // h // multiple * multiple
        if not (native / 2 <= h and native / 2 <= w <= 2 * native and w >= multiple):
            continue
        key = (abs(math.log(w / h / aspect)), -w * h)
        if best is None or key < best[0]:
            best = (key, (h, w))
    if best is None:
        raise ValueError(f"no working size is a multiple of {multiple} near {native}² pixels")
    return best[1]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a source's edit is made. `box` (x0, y0, x1, y1): the part of the photo the model sees, resized
    into the working `size` (height, width) with its aspect ratio kept (`resize_fill`). `crop`: the box is
    the region around the mask, and the result is pasted back into the photo through the mask (`overlay`);
    otherwise the box is the whole photo, and the result is the model's picture at the photo's size."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    crop: bool

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The working-size view of `image` (the photo, RGB, or its uint8 mask)."""
        im = Image.fromarray(image, "L" if image.ndim == 2 else "RGB").crop(self.box)
        return np.asarray(resize_fill(im, self.size[1], self.size[0]))

    def inner(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the box's image inside the working frame (the rest is `resize_fill`'s bands)."""
        height, width = self.size
        x0, y0, x1, y1 = self.box
        w, h = _fit((x1 - x0, y1 - y0), width, height, cover=False)
        left, top = width // 2 - w // 2, height // 2 - h // 2
        return left, top, left + w, top + h

    def place(self, result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """A working-size result back at the photo's size: pasted through `mask` into `source` (crop), or the
        frame's inner part resized to the photo."""
        if self.crop:
            return overlay(mask, source, result, self.box)
        x0, y0, x1, y1 = self.inner()
        height, width = source.shape[:2]
        if (x0, y0, x1, y1) == (0, 0, width, height) and result.shape[:2] == (height, width):
            return result
        return np.asarray(Image.fromarray(result).crop((x0, y0, x1, y1)).resize((width, height), RESAMPLE))


def plan(mask: np.ndarray, *, height: int | None, width: int | None, padding_mask_crop: int | None,
         native: int, multiple: int) -> Placement:
    """The placement of an edit of a photo with this (uint8, photo-sized) mask. Without height and width the
    working size follows the box's aspect ratio (`working_size`, about native² pixels); with them, they are
    used as given (and a crop box is grown to their aspect ratio, as diffusers does)."""
    h, w = mask.shape
    crop = padding_mask_crop is not None
    if crop and padding_mask_crop < 0:
        raise ValueError(f"padding_mask_crop must be ≥ 0 pixels, not {padding_mask_crop}")
    if height is None or width is None:
        x0, y0, x1, y1 = padded_box(mask, padding_mask_crop) if crop else (0, 0, w, h)
        height, width = working_size((x1 - x0) / (y1 - y0), native, multiple)
    box = crop_region(mask, width, height, padding_mask_crop) if crop else (0, 0, w, h)
    return Placement(box, (int(height), int(width)), crop)

"""Image input and output on the host: reading files of any common mode, arrays to RGB/mask, writing PNGs, the CLIP
reference preprocessing of the reference pipeline, pasting the source back outside the mask, and the source | mask |
reference | edits grid that sample.py and the web page show."""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Any, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from pbe_jax import storage
from pbe_jax.defaults import GRID_HEIGHT, GRID_MAX_HEIGHT

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}  # what a folder listing takes for images


# EXIF orientation tag (0x0112) -> the PIL transposes that make the stored pixels upright, as
# `PIL.ImageOps.exif_transpose` applies them.
ORIENTATION_TAG = 0x0112
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def orientation_of(im: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when it has none or a malformed one."""
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 -- a malformed EXIF block is ignored, as viewers ignore it
        return 1
    return value if value in TRANSPOSE else 1


def upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: turned by its EXIF orientation (unchanged when it has none). The result
    carries no EXIF block, so that turning it upright again changes nothing."""
    orientation = orientation_of(im)
    if orientation not in TRANSPOSE:
        return im
    out = im.transpose(TRANSPOSE[orientation])
    for key in ("exif", "Raw profile type exif"):  # PIL copies `info` to the new image
        out.info.pop(key, None)
    return out


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file or the argument."""


def load_image(path: storage.PathLike) -> Image.Image:
    """Open an image file (local or in a bucket), upright as a viewer shows it (its EXIF orientation applied);
    16-bit and float modes are scaled to 8 bits, so any common file gives an image that `to_rgb`/`to_mask`
    accept."""
    try:
        with Image.open(storage.local_or_buffer(path)) as im:
            im.load()
            im = upright(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from e
    return to_8bit(im)


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float modes scaled to 8 bits ("L"); other modes unchanged."""
    if im.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return im
    a = np.asarray(im).astype(np.float64)
    peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
    return Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _as_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if a.min() < 0 or a.max() > 1:
            raise ImageError(f"{what}: a float image must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
        return (a * 255.0).round().astype(np.uint8)
    raise ImageError(f"{what}: unsupported array dtype {a.dtype}")


def to_pil(x: Any, what: str) -> Image.Image:
    """A PIL image from a PIL image, a path, or an (H, W), (H, W, 1|3|4) array (uint8, uint16, bool, or float
    in [0, 1]); images and files upright (EXIF orientation applied)."""
    if isinstance(x, Image.Image):
        return upright(x)
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    a = np.asarray(x)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"{what}: expected an (H, W) or (H, W, 3|4) image, got shape {a.shape}")
    return Image.fromarray(_as_uint8(a, what))


def to_rgb(x: Any, what: str = "image") -> np.ndarray:
    """uint8 (H, W, 3). Grayscale is repeated, alpha dropped, as `Image.convert("RGB")` does; a uint8 RGB
    array is returned as it is, uncopied."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3:
        return x
    return np.asarray(to_pil(x, what).convert("RGB"))


def to_mask(x: Any, what: str = "mask") -> np.ndarray:
    """float32 (H, W) in [0, 1] from the image's luminance, white = edit (not yet binarised)."""
    return np.asarray(to_pil(x, what).convert("L"), np.float32) / 255.0


def mask_box(mask) -> tuple[int, int, int, int] | None:
    """The bounding box (x0, y0, x1, y1) of the edited (white) pixels; None for an empty mask."""
    ys, xs = np.nonzero(to_mask(mask) >= 0.5)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of uint8 RGB to (height, width); the identity when the size already matches."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))


def mask_for_source(mask: np.ndarray, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """`mask` (H', W') at its source's size (height, width). A mask of the source's aspect ratio (to within a
    pixel of rounding) is resized, with a warning that says so; one of another aspect ratio is refused, since
    stretching it would move the edit."""
    if mask.shape == tuple(size):
        return mask
    (mh, mw), (h, w) = mask.shape, size
    if abs(mw * h - mh * w) > max(h, w):
        raise ImageError(f"{what}: {mw}×{mh} has another aspect ratio than its source image ({w}×{h}); give a "
                         f"mask of the source's size")
    warnings.warn(f"{what}: {mw}×{mh}, resized to its source image's {w}×{h}", stacklevel=3)
    return resize_mask(mask, size)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


@dataclasses.dataclass(frozen=True)
class ReferenceProcessor:
    """transformers' `CLIPImageProcessor` as the reference pipeline applies it to the exemplar: resize the
    shortest edge (bicubic), centre crop, scale to [0, 1], normalise. `plain_resize` instead resizes straight
    to the crop size, as the original Paint-by-Example code does."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    resample: int = Image.BICUBIC
    mean: tuple = OPENAI_CLIP_MEAN
    std: tuple = OPENAI_CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    plain_resize: bool = False

    @classmethod
    def from_config(cls, d: Mapping[str, Any] | None, image_size: int = 224) -> "ReferenceProcessor":
        """From `feature_extractor/preprocessor_config.json`; without one, CLIP's settings at `image_size`."""
        if not d:
            return cls(shortest_edge=image_size, crop=(image_size, image_size))
        size, crop = d.get("size", image_size), d.get("crop_size", image_size)
        edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(shortest_edge=edge, crop=crop, resample=d.get("resample", Image.BICUBIC),
                   mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
                   do_resize=d.get("do_resize", True), do_center_crop=d.get("do_center_crop", True),
                   do_normalize=d.get("do_normalize", True), rescale_factor=d.get("rescale_factor", 1 / 255))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) → float32 (crop_h, crop_w, 3), normalised."""
        im = Image.fromarray(rgb)
        if self.plain_resize:
            im = im.resize(self.crop[::-1], self.resample)
        elif self.do_resize:
            w, h = im.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            im = im.resize((new_short, new_long) if w <= h else (new_long, new_short), self.resample)
        a = np.asarray(im)
        if self.do_center_crop and not self.plain_resize:
            ch, cw = self.crop
            top, left = (a.shape[0] - ch) // 2, (a.shape[1] - cw) // 2
            if top < 0 or left < 0:
                raise ImageError(f"reference of size {a.shape[1]}×{a.shape[0]} is smaller than the crop {cw}×{ch}")
            a = a[top:top + ch, left:left + cw]
        a = (a.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return a


def paste_back(source: np.ndarray, result: np.ndarray, edit: np.ndarray, feather: float | None = None) -> np.ndarray:
    """Source pixels exactly where `edit` (H, W, binary) is 0; inside, the result, blended with the source
    over a Gaussian ramp of `feather` px at the mask's edge so the seam does not show (default: 3 px at
    512², in proportion at other sizes)."""
    from PIL import ImageFilter

    feather = max(0.5, min(edit.shape) / 170) if feather is None else feather
    blurred = np.asarray(Image.fromarray((edit * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(feather)),
                         np.float32) / 255.0
    w = (edit * np.clip(2 * blurred - 1, 0, 1))[..., None]  # 0 outside and at the edge, 1 deep inside
    out = source.astype(np.float32) * (1 - w) + result.astype(np.float32) * w
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: storage.PathLike) -> None:
    """All or nothing (`storage.write_bytes`): never a half-written file that a resumed run would take as
    finished."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    storage.write_bytes(path, buffer.getvalue())


def grid(source: np.ndarray, mask: np.ndarray, reference: np.ndarray, *results: np.ndarray) -> np.ndarray:
    """source | mask | reference | result(s), side by side at the (first) result's height, or at
    `GRID_MAX_HEIGHT` when that is taller (photos)."""
    h = min(results[0].shape[0], GRID_MAX_HEIGHT)

    def fit(a):
        a = a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1)
        w = max(1, round(a.shape[1] * h / a.shape[0]))
        return np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC))

    m = (np.asarray(mask) * 255).astype(np.uint8)
    gap = np.full((h, 4, 3), 255, np.uint8)
    parts = [fit(source), gap, fit(m), gap, fit(reference)]
    for result in results:
        parts += [gap, fit(result)]
    return np.concatenate(parts, axis=1)


def enlarge(image: np.ndarray, min_height: int) -> np.ndarray:
    """`image` scaled up by the smallest whole factor that makes it at least `min_height` tall, each pixel a
    block (no smoothing), so that small edits can be looked at; unchanged when already that tall."""
    factor = -(-min_height // image.shape[0])
    return np.repeat(np.repeat(image, factor, 0), factor, 1) if factor > 1 else image


def edit_grid(source: np.ndarray, mask: np.ndarray, reference: np.ndarray, results) -> np.ndarray:
    """The picture of an edit that sample.py writes (OUT_grid.png) and the web page shows: `grid` of source | mask |
    reference | results, photos shrunk to `GRID_MAX_HEIGHT`, small edits enlarged by whole pixels to at least
    `GRID_HEIGHT`."""
    return enlarge(grid(source, mask, reference, *results), GRID_HEIGHT)

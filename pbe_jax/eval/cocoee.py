"""The pixels the original release's evaluation feeds to CLIP (issue 14's protocol, `cocoee_protocol.py`):

- for the CLIP score, the generated region: the box from the first to the last white (255) mask pixel in
  raster order, cropped end-exclusive from the whole result (not pasted back: the last row and column of the
  box are left out, as the original's slicing does), scaled to [0, 1], resized to 224 × 224 bilinearly
  without antialiasing (PyTorch's `interpolate(mode="bilinear", align_corners=False)`; the aspect ratio is
  not kept), then normalised with CLIP's mean and std;
- for the CLIP score, the reference: resized to 224 × 224 with PIL's default filter for `Image.resize`
  (bicubic), no centre crop, scaled to [0, 1] and normalised the same way;
- for FID and QS, a whole image through openai CLIP's preprocess (`clip_pixels`: torchvision's `Resize(224,
  bicubic)` and `CenterCrop(224)` on a PIL image), and a real image of the reference set prepared as COCO
  test2017 is (`coco_reference`: short side 512, centre crop 512²).
Arrays are (H, W, 3) float32, channels last. 224 is ViT-B/32's size; the functions take the tower's.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pbe_jax import images
from pbe_jax.models.inception import bilinear_source_index

CLIP_SIZE = 224


def region_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the first and the last pixel equal to 255 in raster order (row by row). An RGB mask is
    read as PIL's "L" conversion of it. (Not `images.mask_box`, the true bounding box: the original's crop
    differs from it for any shape but a rectangle, and loses the box's last row and column.)"""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).convert("L"))
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (H, W, 3), not {mask.shape}")
    white = np.flatnonzero(mask.reshape(-1) == 255)
    if white.size == 0:
        raise ValueError("the mask has no white (255) pixel: no region to score")
    (y0, x0), (y1, x1) = divmod(int(white[0]), mask.shape[1]), divmod(int(white[-1]), mask.shape[1])
    return y0, x0, y1, x1


def crop_region(result: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """result[y0:y1, x0:x1] for the mask's region_box (end-exclusive; empty when the box is one row or column)."""
    if np.shape(result)[:2] != np.shape(mask)[:2]:
        raise ValueError(f"result {np.shape(result)[:2]} and mask {np.shape(mask)[:2]} differ in size")
    y0, x0, y1, x1 = region_box(mask)
    return np.asarray(result)[y0:y1, x0:x1]


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) float → (size[0], size[1], C) float32, bilinear without antialiasing, as PyTorch's float32
    `interpolate` computes it (its sample positions and weights in float32: `inception.bilinear_source_index`;
    the width interpolated first, then the height), on the host: regions come in every size, and a jitted
    resize would compile for each."""
    image = np.asarray(image, np.float32)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"cannot resize an empty region {image.shape[:2]}")
    y0, y1, wy = bilinear_source_index(size[0], image.shape[0])
    x0, x1, wx = bilinear_source_index(size[1], image.shape[1])
    wx, wy = wx[None, :, None], wy[:, None, None]
    cols = image[:, x0] * (1 - wx) + image[:, x1] * wx
    return (cols[y0] * (1 - wy) + cols[y1] * wy).astype(np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    mean, std = np.asarray(images.OPENAI_CLIP_MEAN, np.float32), np.asarray(images.OPENAI_CLIP_STD, np.float32)
    return ((x - mean) / std).astype(np.float32)


def region_pixels(result: np.ndarray, mask: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """CLIP's input for the generated region of a uint8 result: (size, size, 3) float32."""
    crop = crop_region(result, mask)
    return _normalise(resize_bilinear(crop.astype(np.float32) / 255.0, (size, size)))


def reference_pixels(reference, size: int = CLIP_SIZE) -> np.ndarray:
    """CLIP's input for a reference (a PIL image, uint8 array or path): straight to size × size with PIL's
    default `Image.resize` filter (bicubic), no crop; (size, size, 3) float32."""
    processor = images.ReferenceProcessor(crop=(size, size), resample=Image.BICUBIC, plain_resize=True)
    return processor(images.to_rgb(reference, "reference"))


def resize_short_side(rgb: np.ndarray, size: int, resample: int) -> np.ndarray:
    """torchvision's `Resize(size)` of a PIL image: the short side to `size`, the long one to
    int(size × long / short) (truncated), with PIL's `resample` filter."""
    h, w = rgb.shape[:2]
    short, long = min(h, w), max(h, w)
    new = (size, int(size * long / short))
    return np.asarray(Image.fromarray(rgb).resize(new if w <= h else new[::-1], resample))


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """torchvision's `CenterCrop(size)`: offsets int(round((H - size) / 2)) (Python rounds halves to even)."""
    h, w = a.shape[:2]
    if h < size or w < size:
        raise ValueError(f"an image of {w}×{h} is smaller than the crop {size}×{size}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return a[top:top + size, left:left + size]


def clip_pixels(rgb: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """openai CLIP's `preprocess` of a uint8 image (the features behind the FID and QS): bicubic resize of the
    short side to `size`, centre crop, [0, 1], CLIP mean/std; (size, size, 3) float32."""
    a = center_crop(resize_short_side(np.asarray(rgb), size, Image.BICUBIC), size)
    return _normalise(a.astype(np.float32) / 255.0)


COCO_SIZE = 512


def coco_reference(rgb: np.ndarray, size: int = COCO_SIZE) -> np.ndarray:
    """A real image of the FID reference set as the protocol prepares COCO test2017: the short side resized to
    `size` (torchvision's `Resize` default, bilinear) and centre-cropped to size × size; uint8."""
    return center_crop(resize_short_side(np.asarray(rgb), size, Image.BILINEAR), size)

"""Photos as training data arrive: decoded once, small enough, upright, with their boxes turned the same way,
and every reason an image cannot be used named. Shared by `prepare` (collections -> shards) and the folder
source (raw images read during training)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from pbe_jax import images, storage

# Why an item is not used, as counted by `prepare` and the training loader.
MISSING, UNREADABLE, BOMB, TOO_SMALL, NO_BOX = "missing", "unreadable", "decompression_bomb", "too_small", "no_box"
REASONS = (MISSING, UNREADABLE, BOMB, TOO_SMALL, NO_BOX)

class CorruptItem(ValueError):
    """An item that cannot be used (an undecodable image, a malformed box file or record); `reason` is one of
    `REASONS`, the message names the file or record. Readers skip such items and count them by reason."""

    def __init__(self, message: str, reason: str = UNREADABLE):
        super().__init__(message)
        self.reason = reason


def upright_boxes(boxes: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """Pixel boxes (x0, y0, x1, y1) of the stored image (`width` × `height`) moved to where they are once
    the image is turned upright by its EXIF `orientation` (1-8; anything else is 1)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    x0, y0, x1, y1 = b.T
    w, h = np.float32(width), np.float32(height)
    out = {2: (w - x1, y0, w - x0, y1), 3: (w - x1, h - y1, w - x0, h - y0), 4: (x0, h - y1, x1, h - y0),
           5: (y0, x0, y1, x1), 6: (h - y1, x0, h - y0, x1), 7: (h - y1, w - x1, h - y0, w - x0),
           8: (y0, w - x1, y1, w - x0)}.get(orientation)
    return b if out is None else np.stack(out, axis=1).astype(np.float32)


@dataclasses.dataclass
class Photo:
    """A decoded photo: `rgb` upright (EXIF applied) and at most `max_short_side` on its shorter side;
    `orientation` the EXIF tag that was applied, `stored_size` the file's (width, height) before anything."""

    rgb: np.ndarray
    orientation: int
    stored_size: tuple[int, int]

    def boxes(self, boxes: np.ndarray, frame: str = "stored") -> np.ndarray:
        """Pixel boxes given on the stored file (`frame` "stored") or on the upright image as a viewer shows
        it at full size ("displayed"), in pixels of `rgb`."""
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        w, h = self.stored_size
        if frame == "stored":
            b = upright_boxes(b, self.orientation, w, h)
        elif frame != "displayed":
            raise ValueError(f"box frame must be 'stored' or 'displayed', not {frame!r}")
        if self.orientation in (5, 6, 7, 8):
            w, h = h, w
        hh, ww = self.rgb.shape[:2]
        return b * np.asarray([ww / w, hh / h, ww / w, hh / h], np.float32)


def _open(source, what: str) -> Image.Image:
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(source))
        return Image.open(storage.local_or_buffer(source))
    except FileNotFoundError as e:
        raise CorruptItem(f"{what}: no such file", MISSING) from e
    except Image.DecompressionBombError as e:
        raise CorruptItem(f"{what}: refused as a decompression bomb ({e})", BOMB) from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise CorruptItem(f"{what}: cannot read image ({type(e).__name__}: {e})", UNREADABLE) from e


def decode(source, what: str | None = None, *, max_short_side: int | None = None, min_short_side: int = 0) -> Photo:
    """Decode a photo (a path, local or in a bucket, or the file's bytes) once, upright.

    JPEGs are decoded with draft mode (the DCT scaled by 1/2, 1/4 or 1/8) when that still leaves the shorter
    side at least `max_short_side`; the rest of the way is a Lanczos resize. Any mode becomes 8-bit RGB
    (16-bit scaled, CMYK converted, grayscale repeated, alpha dropped). Raises `CorruptItem` with a reason:
    missing, unreadable (not an image, truncated), decompression bomb (PIL's limit), too small (a shorter side
    under `min_short_side`, checked on the stored size before decoding)."""
    what = what or (str(source) if not isinstance(source, (bytes, bytearray, memoryview)) else "image bytes")
    im = _open(source, what)
    try:
        stored = im.size
        if min(stored) < max(min_short_side, 1):
            raise CorruptItem(f"{what}: {stored[0]}×{stored[1]} is under the minimum side {min_short_side}", TOO_SMALL)
        orientation = images.orientation_of(im)
        if max_short_side and im.format == "JPEG" and min(stored) > max_short_side:
            f = max_short_side / min(stored)
            im.draft("RGB", (int(np.ceil(stored[0] * f)), int(np.ceil(stored[1] * f))))
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise CorruptItem(f"{what}: refused as a decompression bomb ({e})", BOMB) from e
        except (OSError, ValueError, SyntaxError) as e:  # truncated data, a broken stream
            raise CorruptItem(f"{what}: cannot decode image ({type(e).__name__}: {e})", UNREADABLE) from e
        im = images.to_8bit(im).convert("RGB")
        if max_short_side and min(im.size) > max_short_side:
            w, h = im.size
            size = (max_short_side, round(h * max_short_side / w)) if w <= h else (round(w * max_short_side / h),
                                                                                  max_short_side)
            im = im.resize(size, Image.LANCZOS)
        if orientation in images.TRANSPOSE:
            im = im.transpose(images.TRANSPOSE[orientation])
        rgb = np.asarray(im)
    finally:
        im.close()
    return Photo(rgb, orientation, stored)

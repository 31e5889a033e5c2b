"""Image files that real collections contain and that must never end a run, made for the tests."""
import io
import struct
import zlib

import numpy as np
from PIL import Image


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width × height pixels (PIL refuses it at open: DecompressionBombError)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7)) + chunk(b"IEND", b"")


def truncated_jpeg(rgb: np.ndarray) -> bytes:
    """The first half of a JPEG's bytes: PIL opens it and fails when decoding."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def with_orientation(rgb: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    """`rgb` stored as it is, with the EXIF orientation tag set to `orientation`."""
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()

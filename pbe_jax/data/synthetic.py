"""Procedurally generated scenes with boxes: a random-access source that needs no download.

Each index gives the same scene for the same seed: a gradient or textured background and several objects
of varied shape, colour, pattern, size and rotation, drawn in order (later ones occlude earlier ones).
Items follow the source interface: {"image": uint8 (S, S, 3), "boxes": float32 (N, 4) x0 y0 x1 y1,
"id": str}, plus "objects": each object's attributes (shape, colour, pattern indices).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle", "star", "hexagon", "cross")
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30), (160, 60, 200), (250, 130, 20),
           (30, 200, 200), (240, 240, 240))
PATTERNS = ("solid", "stripes", "dots", "checks")


def _outline(shape: str, n: int = 48) -> np.ndarray:
    """Unit outline (radius 1 around the origin) of a shape, as polygon vertices."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8
    if shape == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(a), -np.sin(a)], 1)
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = np.arange(10) * np.pi / 5 - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        t = 0.35
        return np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t],
                         [-1, -t], [-t, -t]], float)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(kind: str, colour, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB fill of `size`² for one object: its colour, patterned with a darker or lighter second tone."""
    base = np.array(colour, np.float32)
    other = np.clip(base * 0.45 if base.mean() > 110 else base + 110, 0, 255)
    yy, xx = np.mgrid[:size, :size]
    period = max(4, size // int(rng.integers(3, 6)))
    if kind == "stripes":
        on = ((xx + yy) // (period // 2 + 1)) % 2 == 0
    elif kind == "dots":
        on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.5) ** 2
    elif kind == "checks":
        on = ((xx // period) + (yy // period)) % 2 == 0
    else:
        on = np.ones((size, size), bool)
    return np.where(on[..., None], base, other).astype(np.uint8)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.integers(30, 226, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:size, :size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    if rng.random() < 0.5:  # texture: low-frequency noise
        noise = rng.normal(0, 18, (size // 8 + 1, size // 8 + 1, 1))
        img = img + np.kron(noise, np.ones((8, 8, 1)))[:size, :size]
    return np.clip(img, 0, 255).astype(np.uint8)


def render_object(canvas: Image.Image, shape: int, colour: int, pattern: int, centre, radius: float,
                  rotation: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw one object onto `canvas`; returns its box (x0, y0, x1, y1) clipped to the canvas."""
    pts = _outline(SHAPES[shape])
    c, s = np.cos(rotation), np.sin(rotation)
    pts = pts @ np.array([[c, s], [-s, c]]) * radius + np.asarray(centre)
    side = int(2 * radius) + 2
    fill = Image.fromarray(_pattern(PATTERNS[pattern], COLOURS[colour], side, rng))
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in pts], fill=255)
    x0, y0 = int(centre[0] - radius) - 1, int(centre[1] - radius) - 1
    layer = Image.new("RGB", canvas.size)
    layer.paste(fill, (x0, y0))
    canvas.paste(layer, (0, 0), mask)
    w, h = canvas.size
    return (max(0.0, pts[:, 0].min()), max(0.0, pts[:, 1].min()), min(float(w), pts[:, 0].max()),
            min(float(h), pts[:, 1].max()))


class SyntheticSource:
    """`size` scenes of `image_size`², deterministic in (seed, index)."""

    def __init__(self, size: int = 10000, *, seed: int = 0, image_size: int = 256, min_objects: int = 2,
                 max_objects: int = 5):
        self.size, self.seed, self.image_size = size, seed, image_size
        self.min_objects, self.max_objects = min_objects, max_objects

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(f"scene {index} out of range (size {self.size})")
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        canvas = Image.fromarray(_background(s, rng))
        boxes, objects = [], []
        for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
            attrs = {"shape": int(rng.integers(len(SHAPES))), "colour": int(rng.integers(len(COLOURS))),
                     "pattern": int(rng.integers(len(PATTERNS)))}
            radius = rng.uniform(0.08, 0.22) * s
            centre = rng.uniform(radius * 0.6, s - radius * 0.6, 2)
            boxes.append(render_object(canvas, **attrs, centre=centre, radius=radius,
                                       rotation=rng.uniform(0, 2 * np.pi), rng=rng))
            objects.append(attrs)
        return {"image": np.asarray(canvas), "boxes": np.asarray(boxes, np.float32), "id": f"scene{index:06d}",
                "objects": objects}

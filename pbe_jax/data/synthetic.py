"""Procedurally generated scenes with boxes: a random-access training source that needs no download, and the
scene renderer that the held-out benchmark (`pbe_jax.data.benchmark`) draws from.

A scene is a gradient or textured background and several objects of varied shape, colour, pattern, size and
rotation, drawn in order (later ones occlude earlier ones). Every object stays mostly visible: a placement
that would leave any object, the new one or an earlier one, with less than `min_visible` of its area in
view (hidden behind another object or outside the image) is drawn again, up to `attempts` times, and an
object that finds no placement is left out. Each object's box is the box of its visible pixels.

`SyntheticSource` items follow the source interface: {"image": uint8 (S, S, 3), "boxes": float32 (N, 4)
x0 y0 x1 y1, "id": str}, plus "objects", one dict per box: "shape", "colour", "pattern" (indices into
SHAPES, COLOURS, PATTERNS), "centre" [x, y], "radius" (px, the outline's scale), "rotation" (radians),
"box" (its row of "boxes"), "extent" (the box of all its pixels inside the image, occluded or not) and
"visible" (the fraction of its polygon's pixels in view). Boxes are in pixel edges: x1, y1 exclusive.

A world is the base one (the colours the shipped model was trained on) or the base one with colours from
EXTRA_COLOURS appended (`extra_colours=("pink",)`): something a model can be adapted to (docs/lora.md). A
base colour has the same index in every world, and the base world's scenes do not change.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle", "star", "hexagon", "cross")
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 200, 30), (160, 60, 200), (250, 130, 20),
           (30, 200, 200), (240, 240, 240))
COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
EXTRA_COLOURS = {"pink": (245, 110, 185)}  # in no scene the shipped model saw
PATTERNS = ("solid", "stripes", "dots", "checks")


def colour_names(extra_colours: Sequence[str] = ()) -> tuple[str, ...]:
    """The names of a world's colours, in index order: the base ones, then `extra_colours`."""
    unknown = [c for c in extra_colours if c not in EXTRA_COLOURS]
    if unknown or len(set(extra_colours)) != len(extra_colours):
        raise ValueError(f"extra colours {list(extra_colours)}: each must be one of {sorted(EXTRA_COLOURS)}, "
                         f"named once")
    return COLOUR_NAMES + tuple(extra_colours)


def palette(extra_colours: Sequence[str] = ()) -> tuple[tuple[int, int, int], ...]:
    """The RGB of a world's colours, in index order (see `colour_names`)."""
    colour_names(extra_colours)
    return COLOURS + tuple(EXTRA_COLOURS[c] for c in extra_colours)


def extra_colours_of(names: Sequence[str], where: str) -> tuple[str, ...]:
    """The extra colours of the world whose colour names are `names` (a benchmark's vocabulary); a list that
    is not the base colours followed by known extra ones is an error naming `where`."""
    names = tuple(names)
    extra = names[len(COLOUR_NAMES):]
    if names[:len(COLOUR_NAMES)] != COLOUR_NAMES or any(c not in EXTRA_COLOURS for c in extra):
        raise ValueError(f"{where} lists colours {list(names)}: pbe_jax.data.synthetic has {list(COLOUR_NAMES)} "
                         f"followed by any of {sorted(EXTRA_COLOURS)}")
    return extra


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


def polygon(shape: int, centre, radius: float, rotation: float) -> np.ndarray:
    """Vertices (V, 2) in pixels of SHAPES[shape] around `centre`, scaled by `radius`, turned by `rotation`."""
    c, s = np.cos(rotation), np.sin(rotation)
    return _outline(SHAPES[shape]) @ np.array([[c, s], [-s, c]]) * radius + np.asarray(centre, float)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """The pixels a polygon covers: `mask` (h, w) placed with its top-left at image column x, row y. It may
    reach outside the image; `area` counts all of it, so what the image shows is a fraction of it."""

    mask: np.ndarray
    x: int
    y: int

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def clip(self, height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """The (rows, cols) window of a height × width image this footprint overlaps, and its mask there."""
        h, w = self.mask.shape
        x0, y0, x1, y1 = max(self.x, 0), max(self.y, 0), min(self.x + w, width), min(self.y + h, height)
        x1, y1 = max(x1, x0), max(y1, y0)
        inside = self.mask[y0 - self.y:y1 - self.y, x0 - self.x:x1 - self.x]
        return (slice(y0, y1), slice(x0, x1)), inside

    def box(self, height: int, width: int) -> list[float]:
        """x0, y0, x1, y1 (exclusive) of its pixels inside a height × width image, in image pixels."""
        (rows, cols), inside = self.clip(height, width)
        x0, y0, x1, y1 = _box_of(inside)
        return [x0 + cols.start, y0 + rows.start, x1 + cols.start, y1 + rows.start]


def footprint(vertices: np.ndarray) -> Footprint:
    """Rasterise a polygon on a canvas just large enough for it, so parts outside the image still count."""
    x0, y0 = np.floor(vertices.min(0)).astype(int)
    x1, y1 = np.ceil(vertices.max(0)).astype(int)
    canvas = Image.new("L", (int(x1 - x0) + 1, int(y1 - y0) + 1), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in vertices - (x0, y0)], fill=1)
    return Footprint(np.asarray(canvas, bool), int(x0), int(y0))


def object_mask(obj: dict, size: int) -> np.ndarray:
    """bool (size, size): the pixels of a recorded object's whole polygon inside the image, occluded or not."""
    fp = footprint(polygon(obj["shape"], obj["centre"], obj["radius"], obj["rotation"]))
    window, inside = fp.clip(size, size)
    out = np.zeros((size, size), bool)
    out[window] = inside
    return out


def _pattern(kind: str, colour, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """An RGB fill of `shape` for one object: its colour, patterned with a darker or lighter second tone."""
    base = np.array(colour, np.float32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    period = max(4, max(shape) // int(rng.integers(3, 6)))
    if kind == "stripes":
        on = ((xx + yy) // (period // 2 + 1)) % 2 == 0
    elif kind == "dots":
        # Dots in the second tone on the object's colour, so its colour is the one most of it shows.
        on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) >= (period / 3.5) ** 2
    elif kind == "checks":
        on = ((xx // period) + (yy // period)) % 2 == 0
    else:
        on = np.ones(shape, bool)
    return np.where(on[..., None], base, second_tone(colour)).astype(np.uint8)


def second_tone(colour) -> np.ndarray:
    """The pattern's other colour: darker for light colours, lighter for dark ones."""
    base = np.array(colour, np.float32)
    return np.clip(base * 0.45 if base.mean() > 110 else base + 110, 0, 255).astype(np.uint8)


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3): a linear gradient between two random colours, half the time with coarse noise."""
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


def draw(image: np.ndarray, fp: Footprint, attrs: dict, rng: np.random.Generator,
         colours: Sequence = COLOURS) -> None:
    """Paint an object's patterned fill into `image` (in place) where its footprint covers it; its colour is
    an index into `colours` (a world's `palette`)."""
    window, inside = fp.clip(*image.shape[:2])
    fill = _pattern(PATTERNS[attrs["pattern"]], colours[attrs["colour"]], fp.mask.shape, rng)
    rows, cols = window
    fill = fill[rows.start - fp.y:rows.stop - fp.y, cols.start - fp.x:cols.stop - fp.x]
    image[window][inside] = fill[inside]


def render_object(canvas: Image.Image, shape: int, colour: int, pattern: int, centre, radius: float,
                  rotation: float, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw one object onto a PIL `canvas` (in place), over whatever is there; returns the box of its pixels
    inside the canvas, x0, y0, x1, y1 (x1, y1 exclusive). The object must overlap the canvas."""
    image = np.array(canvas.convert("RGB"))
    fp = footprint(polygon(shape, centre, radius, rotation))
    draw(image, fp, {"shape": shape, "colour": colour, "pattern": pattern}, rng)
    canvas.paste(Image.fromarray(image))
    return tuple(fp.box(*image.shape[:2]))


def random_attributes(rng: np.random.Generator, n_colours: int = len(COLOURS)) -> dict:
    return {"shape": int(rng.integers(len(SHAPES))), "colour": int(rng.integers(n_colours)),
            "pattern": int(rng.integers(len(PATTERNS)))}


@dataclasses.dataclass(frozen=True)
class Scene:
    """A rendered scene: `labels` (S, S) int16 holds the index of the object on top at each pixel (-1 for
    background); `objects` are described in the module docstring."""

    image: np.ndarray
    labels: np.ndarray
    objects: list[dict]

    @property
    def boxes(self) -> np.ndarray:
        return np.asarray([o["box"] for o in self.objects], np.float32).reshape(-1, 4)


def _box_of(mask: np.ndarray) -> list[float]:
    """x0, y0, x1, y1 of the True pixels, in pixel edges (x1, y1 exclusive)."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def render_scene(rng: np.random.Generator, size: int, *, min_objects: int = 2, max_objects: int = 5,
                 radius: tuple[float, float] = (0.08, 0.22), min_visible: float = 0.6,
                 attempts: int = 10, colours: Sequence = COLOURS) -> Scene:
    """A size² scene drawn from `rng`: between min_objects and max_objects objects (fewer when one finds no
    placement that keeps every object at least `min_visible` in view), radii a uniform fraction of `size`,
    colours drawn from `colours` (a world's `palette`)."""
    if not 0 < min_visible <= 1:  # an object with nothing in view would have no box
        raise ValueError(f"min_visible must be in (0, 1], got {min_visible}")
    image = background(size, rng)
    labels = np.full((size, size), -1, np.int16)
    placed, areas, shown = [], [], []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        attrs = random_attributes(rng, len(colours))
        for _ in range(attempts):
            r = float(rng.uniform(*radius) * size)
            centre = rng.uniform(r * 0.6, size - r * 0.6, 2)
            rotation = float(rng.uniform(0, 2 * np.pi))
            fp = footprint(polygon(attrs["shape"], centre, r, rotation))
            window, inside = fp.clip(size, size)
            under = labels[window][inside]
            hidden = np.bincount(under[under >= 0], minlength=len(placed))
            keeps = np.asarray(shown, float) - hidden >= min_visible * np.asarray(areas, float)
            if inside.sum() >= min_visible * fp.area and keeps.all():
                break
        else:
            continue
        draw(image, fp, attrs, rng, colours)
        labels[window][inside] = len(placed)
        shown = list(np.asarray(shown, int) - hidden) + [int(inside.sum())]
        areas.append(fp.area)
        placed.append({**attrs, "centre": [float(centre[0]), float(centre[1])], "radius": r, "rotation": rotation,
                       "extent": fp.box(size, size)})
    objects = [{**o, "box": _box_of(labels == k), "visible": float(shown[k] / areas[k])}
               for k, o in enumerate(placed)]
    return Scene(image, labels, objects)


class SyntheticSource:
    """`size` scenes of `image_size`², deterministic in (seed, index): scene i is drawn from
    `np.random.default_rng([seed, i])`, in the world with `extra_colours`."""

    def __init__(self, size: int = 10000, *, seed: int = 0, image_size: int = 256, min_objects: int = 2,
                 max_objects: int = 5, min_visible: float = 0.6, extra_colours: Sequence[str] = ()):
        self.size, self.seed, self.image_size = size, seed, image_size
        self.min_objects, self.max_objects, self.min_visible = min_objects, max_objects, min_visible
        self.colours = palette(extra_colours)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.size:
            raise IndexError(f"scene {index} out of range (size {self.size})")
        return render_scene(np.random.default_rng([self.seed, index]), self.image_size,
                            min_objects=self.min_objects, max_objects=self.max_objects, min_visible=self.min_visible,
                            colours=self.colours)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"image": scene.image, "boxes": scene.boxes, "id": f"scene{index:06d}", "objects": scene.objects}

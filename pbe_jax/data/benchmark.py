"""The held-out benchmark: synthetic scenes in the COCOEE layout, for the case the paper targets, where the
reference is another instance of another kind, in another pose, cut out of another picture. (The baselines
that need no model, copy-paste and unchanged, are `pbe_jax.eval.baselines`.)

A benchmark folder (what `make_benchmark` writes, what `python sample.py --batch` reads):
    source/<id>.png      RGB scene, image_size²
    mask/<id>.png        L, 255 over the masked box, 0 elsewhere
    reference/<id>.png   RGB crop of the exemplar object from its own scene, its box padded by REFERENCE_PAD px
    labels.jsonl         per id: {"id", "box": [x0, y0, x1, y1] (the mask's white box, x1/y1 exclusive),
                         "reference": {shape, colour, pattern, rotation, radius},
                         "original": {shape, colour, pattern, centre, rotation, radius, visible, box}}
    benchmark.json       the settings and the attribute vocabularies (shape, colour and pattern are indices
                         into its "shapes", "colours", "patterns")
Ids are zero-padded indices ("000123"). A results folder holds <id>.png, the full edited image at the source's
size, as `sample.py --batch` and `python -m pbe_jax.eval.baselines` write it.

Seeds: training scene i of `SyntheticSource(seed=s)` is drawn from `default_rng([s, i])`; benchmark item i
from `default_rng([seed, i, ITEM_TAG])`. numpy pads a seed's words with zeros to four, so [s, i] is
[s, i, 0, 0]; a non-zero third word keeps every benchmark item out of every training stream, whatever the
seeds. The default seed differs from training's small seeds as well.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from pbe_jax import images, storage
from pbe_jax.data import synthetic
from pbe_jax.storage import Path

BENCHMARK_SEED = 1_000_003
EXAMPLES_SEED = 2_000_003
ITEM_TAG = 1
MOSTLY_VISIBLE = 0.85  # the masked object: at least this much of it in view, so the label describes what is seen
MIN_TARGET_FRACTION = 0.04  # ... and its box at least this share of the image, so there is something to replace
MASK_MARGIN = 0.03  # the mask box: the object's box grown by this share of the image side per side
REFERENCE_RADIUS = (0.25, 0.4)  # of the reference scene's side; source objects are 0.08-0.22 of theirs
MIN_TURN = np.pi / 8  # the exemplar's rotation differs from the masked object's by at least this
REFERENCE_PAD = 4  # px around the exemplar's box in its crop
SCENE_DRAWS = 100  # source scenes tried per item before giving up (one is almost always enough)
ROLES = ("source", "mask", "reference")


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    source: np.ndarray  # uint8 (S, S, 3)
    mask: np.ndarray  # uint8 (S, S), 255 = edit
    reference: np.ndarray  # uint8 (h, w, 3)
    label: dict


def _area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _pick_target(rng: np.random.Generator, size: int, colours=synthetic.COLOURS) -> tuple[synthetic.Scene, dict]:
    """A source scene and one of its mostly visible, not too small objects, chosen uniformly."""
    for _ in range(SCENE_DRAWS):
        scene = synthetic.render_scene(rng, size, colours=colours)
        candidates = [o for o in scene.objects
                      if o["visible"] >= MOSTLY_VISIBLE and _area(o["box"]) >= MIN_TARGET_FRACTION * size ** 2]
        if candidates:
            return scene, candidates[rng.integers(len(candidates))]
    raise ValueError(f"no scene of {size}² px out of {SCENE_DRAWS} had an object at least {MOSTLY_VISIBLE:.0%} "
                     f"visible covering {MIN_TARGET_FRACTION:.0%} of the image; use a larger image size")


def _mask_box(extent: list[float], size: int) -> list[int]:
    """All of the object's pixels in the image, grown by MASK_MARGIN of the side and clipped to the image."""
    m = max(1, round(MASK_MARGIN * size))
    x0, y0, x1, y1 = (int(v) for v in extent)
    return [max(x0 - m, 0), max(y0 - m, 0), min(x1 + m, size), min(y1 + m, size)]


def _other_attributes(original: dict, rng: np.random.Generator, n_colours: int = len(synthetic.COLOURS),
                      colour: int | None = None) -> dict:
    """Uniformly random attributes (the colour fixed when `colour` is given), redrawn while all three equal
    the original's."""
    keys = ("shape", "colour", "pattern")
    while True:
        attrs = synthetic.random_attributes(rng, n_colours)
        if colour is not None:
            attrs["colour"] = colour
        if any(attrs[k] != original[k] for k in keys):
            return attrs


def _turn(original: float, rng: np.random.Generator) -> float:
    """A rotation at least MIN_TURN away from `original` on the circle."""
    return float((original + rng.uniform(MIN_TURN, 2 * np.pi - MIN_TURN)) % (2 * np.pi))


def _exemplar(attrs: dict, rotation: float, rng: np.random.Generator, size: int,
              colours=synthetic.COLOURS) -> tuple[np.ndarray, float]:
    """The exemplar drawn whole on a fresh background of size², cropped to its box padded by REFERENCE_PAD;
    and its radius."""
    canvas = synthetic.background(size, rng)
    radius = float(rng.uniform(*REFERENCE_RADIUS) * size)
    reach = np.abs(synthetic.polygon(attrs["shape"], (0, 0), radius, rotation)).max(0)  # half-extent per axis
    slack = np.maximum(size / 2 - reach - REFERENCE_PAD - 1, 0)  # how far the centre may move, all in view
    centre = size / 2 + rng.uniform(-slack, slack)
    fp = synthetic.footprint(synthetic.polygon(attrs["shape"], centre, radius, rotation))
    synthetic.draw(canvas, fp, attrs, rng, colours)
    x0, y0, x1, y1 = (int(v) for v in fp.box(size, size))
    pad = REFERENCE_PAD
    return canvas[max(y0 - pad, 0):min(y1 + pad, size), max(x0 - pad, 0):min(x1 + pad, size)], radius


def _colour_index(name: str | None, names: tuple[str, ...]) -> int | None:
    """The index of colour `name` in a world's colour `names` (None for None)."""
    if name is not None and name not in names:
        raise ValueError(f"reference colour {name!r} is not one of this world's colours {list(names)}")
    return None if name is None else names.index(name)


def make_item(index: int, *, seed: int = BENCHMARK_SEED, image_size: int = 128,
              reference_size: int | None = None, extra_colours: tuple[str, ...] = (),
              reference_colour: str | None = None) -> Item:
    """Benchmark item `index`: a scene, one of its objects masked out by its box, and an exemplar of other
    attributes, rotation and size from a scene of its own (reference_size², default image_size²). The
    world's colours are the base ones plus `extra_colours` (`synthetic.palette`); `reference_colour` (a name
    in that world) fixes the exemplar's colour."""
    colours = synthetic.palette(extra_colours)
    fixed = _colour_index(reference_colour, synthetic.colour_names(extra_colours))
    rng = np.random.default_rng([seed, index, ITEM_TAG])
    scene, original = _pick_target(rng, image_size, colours)
    box = _mask_box(original["extent"], image_size)
    mask = np.zeros((image_size, image_size), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    attrs = _other_attributes(original, rng, len(colours), fixed)
    rotation = _turn(original["rotation"], rng)
    reference, radius = _exemplar(attrs, rotation, rng, reference_size or image_size, colours)
    id_ = f"{index:06d}"
    label = {"id": id_, "box": box, "reference": {**attrs, "rotation": rotation, "radius": radius},
             "original": {k: original[k] for k in ("shape", "colour", "pattern", "centre", "rotation", "radius",
                                                   "visible", "box")}}
    return Item(id_, scene.image, mask, reference, label)


def _settings(n: int, seed: int, image_size: int, reference_size: int | None, extra_colours: tuple[str, ...] = (),
              reference_colour: str | None = None) -> dict:
    """The settings benchmark.json records; wrong colours are errors here, before anything is written."""
    names = synthetic.colour_names(extra_colours)
    _colour_index(reference_colour, names)
    return {"n": n, "seed": seed, "image_size": image_size, "reference_size": reference_size or image_size,
            "shapes": list(synthetic.SHAPES), "colours": list(names), "patterns": list(synthetic.PATTERNS),
            "reference_colour": reference_colour}


def make_benchmark(out_dir, n: int = 200, seed: int = BENCHMARK_SEED, image_size: int = 128,
                   reference_size: int | None = None, extra_colours: tuple[str, ...] = (),
                   reference_colour: str | None = None) -> dict:
    """Write items 0..n-1 into `out_dir` (layout in the module docstring; `extra_colours` and
    `reference_colour` as in `make_item`). Resumable: images already there are kept (the same settings make
    the same images), labels.jsonl is rewritten whole. A folder made with other settings is refused. Returns
    {"written": images written, "kept": images already there}."""
    out = storage.path(out_dir)
    settings = _settings(n, seed, image_size, reference_size, tuple(extra_colours), reference_colour)
    meta = out / "benchmark.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            raise ValueError(f"{meta}: this folder was made with other settings "
                             f"({', '.join(f'{k}={a!r}, now {b!r}' for k, (a, b) in changed.items())}); "
                             f"use another folder or the same settings")
    for role in ROLES:
        (out / role).mkdir(parents=True, exist_ok=True)
    storage.write_text(meta, json.dumps(settings, indent=1) + "\n")
    stats = {"written": 0, "kept": 0}
    labels = []
    for i in range(n):
        item = make_item(i, seed=seed, image_size=image_size, reference_size=reference_size,
                         extra_colours=tuple(extra_colours), reference_colour=reference_colour)
        for role in ROLES:
            path = out / role / f"{item.id}.png"
            if path.exists():
                stats["kept"] += 1
            else:
                images.save_png(getattr(item, role), path)
                stats["written"] += 1
        labels.append(json.dumps(item.label))
    storage.write_text(out / "labels.jsonl", "\n".join(labels) + "\n")
    return stats


def read_labels(benchmark_dir) -> dict[str, dict]:
    """labels.jsonl as {id: label}."""
    path = storage.path(benchmark_dir) / "labels.jsonl"
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows[row["id"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with an \"id\" ({e})")
    return rows


def write_examples(out_dir, n: int = 1, *, seed: int = EXAMPLES_SEED, image_size: int = 128,
                   start: int = 0) -> list[Path]:
    """Example inputs for `sample.py`: source.png, mask.png, reference.png and label.json, drawn like
    benchmark items (indices start .. start+n-1) from a seed of their own. One example goes straight into
    `out_dir`; several go into `out_dir/<id>/`. Returns the folders written."""
    folders = []
    for i in range(start, start + n):
        item = make_item(i, seed=seed, image_size=image_size)
        folder = storage.path(out_dir) if n == 1 else storage.path(out_dir) / item.id
        folder.mkdir(parents=True, exist_ok=True)
        for role in ROLES:
            images.save_png(getattr(item, role), folder / f"{role}.png")
        storage.write_text(folder / "label.json", json.dumps(item.label, indent=1) + "\n")
        folders.append(folder)
    return folders


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pbe_jax.data.benchmark", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{make,examples}")
    make = sub.add_parser("make", help="write the benchmark folder (resumable)",
                          description="Write a benchmark folder: source/, mask/, reference/, labels.jsonl.")
    make.add_argument("out", help="benchmark folder to write")
    make.add_argument("--n", type=int, default=200, help="number of items (default 200)")
    make.add_argument("--seed", type=int, default=BENCHMARK_SEED, help=f"benchmark seed (default {BENCHMARK_SEED})")
    make.add_argument("--size", type=int, default=128, help="source side in px (default 128)")
    make.add_argument("--reference-size", type=int, default=None,
                      help="side of the scene the exemplar is cut from (default: --size)")
    make.add_argument("--extra-colours", nargs="+", default=[], metavar="COLOUR",
                      help=f"a world with these colours added to the base ones ({', '.join(synthetic.EXTRA_COLOURS)}); "
                           f"a base colour keeps its index")
    make.add_argument("--reference-colour", default=None, metavar="COLOUR",
                      help="every exemplar in this colour (e.g. an extra one: a benchmark of what is new)")
    ex = sub.add_parser("examples", help="write example inputs for sample.py",
                        description="Write source.png, mask.png, reference.png (one example) or one folder per "
                                    "example.")
    ex.add_argument("out", help="folder to write")
    ex.add_argument("--n", type=int, default=1, help="number of examples (default 1)")
    ex.add_argument("--seed", type=int, default=EXAMPLES_SEED, help=f"seed (default {EXAMPLES_SEED})")
    ex.add_argument("--size", type=int, default=128, help="source side in px (default 128)")
    ex.add_argument("--start", type=int, default=0, help="index of the first example (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "make":
            stats = make_benchmark(args.out, args.n, args.seed, args.size, args.reference_size,
                                   tuple(args.extra_colours), args.reference_colour)
            print(f"{args.out}: {args.n} items ({stats['written']} images written, {stats['kept']} already there)")
        else:
            folders = write_examples(args.out, args.n, seed=args.seed, image_size=args.size, start=args.start)
            print(f"{args.out}: {len(folders)} example(s)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

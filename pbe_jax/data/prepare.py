"""python -m pbe_jax.data.prepare: image collections with boxes (OpenImages, COCO, folders) -> the prepared
ArrayRecord shards of `pbe_jax.data.shards`, each machine writing its share (`--shard I/N`); `info` adds them up.

Every machine lists the same items (the annotations, sorted) and so the same shards: shard j holds items
[j * images_per_shard, (j + 1) * images_per_shard), and machine I of N writes the shards j with j % N == I. An
image is decoded once, turned upright (EXIF), scaled to at most --max-short-side on its shorter side and stored
as a JPEG with its boxes in pixels of that stored image. Boxes are clipped to the image (none left inside:
counted as boxes_outside), then kept if their area over the image's is within [--min-box-area, --max-box-area]
(the original release's filter; the rest: boxes_filtered); an image with no box left is skipped (no_box), and
so is every image that cannot be used, counted by reason. A rerun skips the shards that are complete.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
import posixpath
import queue
import sys
from array import array
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from pbe_jax import storage
from pbe_jax.data import photos, shards, sources
from pbe_jax.images import IMAGE_SUFFIXES

# Twice the 512² training crop: a crop of a part of an image keeps its detail, while most photos shrink
# (faster decoding in training, smaller shards).
DEFAULT_MAX_SHORT_SIDE = 1024
DEFAULT_QUALITY = 90
DEFAULT_MIN_SIDE = 256
DEFAULT_IMAGES_PER_SHARD = 1000
DEFAULT_MIN_BOX_AREA, DEFAULT_MAX_BOX_AREA = 0.02, 0.8
STORED, DISPLAYED, AUTO = "stored", "displayed", "auto"
# Where each format's boxes were drawn (see the subcommands' help): COCO's frame is decided per image.
DEFAULT_FRAME = {"openimages": STORED, "coco": AUTO, "folder": DISPLAYED}
OPENIMAGES_COLUMNS = ("ImageID", "XMin", "XMax", "YMin", "YMax")
COUNTS = ("items", "images", "boxes", "boxes_outside", "boxes_filtered")


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One annotated image. `boxes`: (x0, y0, x1, y1) rows in pixels of the frame, or in [0, 1] of it when
    `normalized`, or the name of a box file read when the item is prepared; `path` None when no file matches
    the annotation; `size` the (width, height) the annotation gives (COCO), for the "auto" frame."""

    id: str
    path: str | None
    boxes: np.ndarray | array | list | str
    normalized: bool = False
    size: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Options:
    frame: str
    min_box_area: float
    max_box_area: float
    min_side: int
    max_short_side: int
    quality: int


# ---------------------------------------------------------------------------------------------- collections

def _folder(folder: str, option: str = "--images") -> str:
    if not storage.path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: no such folder ({option})")
    return os.fspath(folder).rstrip("/") if storage.is_remote(folder) else os.fspath(folder)


def index_images(root: str) -> dict[str, str]:
    """{path relative to `root`, "/"-separated: full path} of every image file under `root`, in one walk."""
    tree = sources.Tree(root)
    found = {}
    for folder, _, files in tree.walk():
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                full = tree.join(folder, name)
                found["/".join(tree.relative_parts(full))] = full
    return found


def _relative(root: str, path: str) -> str:
    """`path` relative to `root` ("/"-separated), or as it is when it lies elsewhere."""
    rel = posixpath.relpath(path, root) if storage.is_remote(root) else os.path.relpath(path, root)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def read_openimages_csv(path: str) -> dict[str, array]:
    """{ImageID: flat float32 array of normalised x0, y0, x1, y1} from the OpenImages box CSV, streamed."""
    with storage.path(path).open("r") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in OPENIMAGES_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: an OpenImages box CSV needs the columns {', '.join(OPENIMAGES_COLUMNS)}; "
                             f"its header has {', '.join(header) or 'nothing'} (no {', '.join(missing)})")
        i, x0, x1, y0, y1 = (header.index(c) for c in OPENIMAGES_COLUMNS)
        boxes: dict[str, array] = {}
        for n, row in enumerate(reader, 2):
            try:
                box = (float(row[x0]), float(row[y0]), float(row[x1]), float(row[y1]))
                key = row[i]
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{n}: expected ImageID and numbers in XMin, XMax, YMin, YMax, got "
                                 f"{row!r} ({e})") from e
            boxes.setdefault(key, array("f")).extend(box)
    return boxes


def collect_openimages_csv(csv_path: str, images: str) -> list[Item]:
    images = _folder(images)
    boxes = read_openimages_csv(csv_path)
    by_stem: dict[str, str] = {}
    index = index_images(images)
    for rel in sorted(index):  # the first in sorted order where two folders hold the same name
        by_stem.setdefault(posixpath.splitext(posixpath.basename(rel))[0], rel)
    items = []
    for key in sorted(boxes):
        rel = by_stem.get(key)
        items.append(Item(rel or f"{key}.jpg", index[rel] if rel else None, boxes[key], normalized=True))
    return items


def collect_bbox_dir(bbox: str, images: str) -> list[Item]:
    """The release's bbox/<split>/<id>.txt beside images/<split>/<id>.jpg (matched by path without suffix)."""
    images = _folder(images)
    bbox_root = _folder(bbox, "--bbox-dir")
    index = index_images(images)
    by_stem: dict[str, str] = {}
    for rel in sorted(index):  # the first in sorted order where one id has files of two suffixes
        by_stem.setdefault(posixpath.splitext(rel)[0], rel)
    tree = sources.Tree(bbox_root)
    box_files = {}
    for folder, _, files in tree.walk():
        for name in files:
            if name.endswith(".txt"):
                full = tree.join(folder, name)
                box_files[posixpath.splitext("/".join(tree.relative_parts(full)))[0]] = full
    items = []
    for key in sorted(box_files):
        rel = by_stem.get(key)
        items.append(Item(rel or f"{key}.jpg", index[rel] if rel else None, box_files[key]))
    return items


def read_coco(path: str) -> tuple[list[dict], list[dict]]:
    try:
        data = json.loads(storage.path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from e
    missing = [k for k in ("images", "annotations") if not isinstance(data, dict) or k not in data]
    if missing:
        found = ", ".join(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: a COCO instances file needs 'images' and 'annotations'; it has no "
                         f"{' or '.join(map(repr, missing))} (it has: {found or 'nothing'})")
    return data["images"], data["annotations"]


def collect_coco(annotations: list[str], images: str) -> list[Item]:
    """Images by `file_name` under --images, or anywhere under it when that name is unique there (train2017/
    and val2017/ under one folder); crowd boxes (iscrowd 1: a region of many objects) dropped."""
    images = _folder(images)
    index = index_images(images)
    by_name: dict[str, list[str]] = {}
    for rel in index:
        by_name.setdefault(posixpath.basename(rel), []).append(rel)
    entries: dict[str, dict] = {}  # file_name -> {"size", "boxes"}, merged over the files
    for path in annotations:
        listed, anns = read_coco(path)
        try:
            names = {im["id"]: im["file_name"] for im in listed}
            for im in listed:
                entries.setdefault(im["file_name"], {"size": (int(im["width"]), int(im["height"])), "boxes": []})
            for a in anns:
                if a.get("iscrowd", 0) != 1 and a["image_id"] in names:
                    x, y, w, h = (float(v) for v in a["bbox"])
                    entries[names[a["image_id"]]]["boxes"].append((x, y, x + w, y + h))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: expected COCO images (id, file_name, width, height) and annotations "
                             f"(image_id, bbox [x, y, w, h]) ({type(e).__name__}: {e})") from e
    items = []
    for name in sorted(entries):
        same_name = by_name.get(posixpath.basename(name), [])
        rel = name if name in index else same_name[0] if len(same_name) == 1 else None
        boxes = list(dict.fromkeys(entries[name]["boxes"]))  # one box once, when two files list the same image
        items.append(Item(rel or name, index[rel] if rel else None, boxes, size=entries[name]["size"]))
    return items


def collect_folder(images: str, annotations: str | None) -> list[Item]:
    """The layouts `sources.FolderSource` reads: a JSONL file, or a .txt box file per image."""
    images = _folder(images)
    if annotations is not None:
        pairs = sources.read_jsonl(storage.path(annotations), storage.path(images))
    else:
        pairs = sources.scan_box_files(images)
    return sorted((Item(_relative(images, path), path, boxes) for path, boxes in pairs), key=lambda it: it.id)


# ----------------------------------------------------------------------------------------------- one image

def _frame_of(item: Item, photo: photos.Photo, frame: str) -> str:
    if frame != AUTO:
        return frame
    # COCO was annotated in browsers that did not apply EXIF: its width/height are the stored file's, unless
    # the file was rotated after annotation; then they are the upright size, and so are the boxes.
    w, h = photo.stored_size
    return DISPLAYED if photo.orientation in (5, 6, 7, 8) and item.size == (h, w) and w != h else STORED


def image_boxes(item: Item, photo: photos.Photo, frame: str) -> np.ndarray:
    """The item's boxes in pixels of `photo.rgb`, unclipped."""
    boxes = item.boxes
    if isinstance(boxes, str):
        boxes = sources.read_box_file(boxes)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    frame = _frame_of(item, photo, frame)
    if item.normalized:
        w, h = photo.stored_size
        if frame == DISPLAYED and photo.orientation in (5, 6, 7, 8):
            w, h = h, w
        boxes = boxes * np.asarray([w, h, w, h], np.float32)
    return photo.boxes(boxes, frame)


def filter_boxes(boxes: np.ndarray, width: int, height: int, min_area: float, max_area: float):
    """(kept boxes, number with no area inside the image, number outside [min_area, max_area]): boxes clipped
    to the image, areas as fractions of the image's."""
    b = np.clip(boxes, 0, np.asarray([width, height, width, height], np.float32))
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    inside = (w > 0) & (h > 0)
    area = w * h / (width * height)
    kept = inside & (area >= min_area) & (area <= max_area)
    return b[kept], int((~inside).sum()), int((inside & ~kept).sum())


def load_item(item: Item, options: Options) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(image, kept boxes, boxes outside it, boxes filtered by area) for one item; raises `photos.CorruptItem`.
    The kept boxes may be none (then the item is skipped as no_box, its dropped boxes counted)."""
    if item.path is None:
        raise photos.CorruptItem(f"{item.id}: no image file for this annotation", photos.MISSING)
    if not isinstance(item.boxes, str) and len(item.boxes) == 0:
        raise photos.CorruptItem(f"{item.id}: no boxes", photos.NO_BOX)
    photo = photos.decode(item.path, item.id, max_short_side=options.max_short_side,
                          min_short_side=options.min_side)
    height, width = photo.rgb.shape[:2]
    boxes, outside, filtered = filter_boxes(image_boxes(item, photo, options.frame), width, height,
                                            options.min_box_area, options.max_box_area)
    return photo.rgb, boxes, outside, filtered


def encode_record(item_id: str, rgb: np.ndarray, boxes: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return shards.encode(item_id, boxes, buffer.getvalue())


# ---------------------------------------------------------------------------------------------- one shard

def empty_counts() -> dict:
    return {**{k: 0 for k in COUNTS}, "skipped": {r: 0 for r in photos.REASONS}}


def add_counts(total: dict, counts: dict) -> None:
    for k in COUNTS:
        total[k] += counts[k]
    for r in photos.REASONS:
        total["skipped"][r] += counts["skipped"].get(r, 0)


def write_one_shard(out: str, index: int, num_shards: int, items: list[Item], options: Options,
                    tick: Callable[[], None]) -> dict:
    counts = empty_counts()
    counts["items"] = len(items)

    def record(item: Item) -> bytes | None:
        try:
            rgb, boxes, outside, filtered = load_item(item, options)
        except photos.CorruptItem as e:
            counts["skipped"][e.reason] += 1
            return None
        counts["boxes_outside"] += outside
        counts["boxes_filtered"] += filtered
        if not len(boxes):
            counts["skipped"][photos.NO_BOX] += 1
            return None
        counts["images"] += 1
        counts["boxes"] += len(boxes)
        return encode_record(item.id, rgb, boxes, options.quality)

    def records():
        for item in items:
            r = record(item)
            tick()
            if r is not None:
                yield r

    # write_shard reads every record before it writes the counts, so they are complete by then.
    shards.write_shard(out, index, num_shards, records(), counts)
    return counts


_ticks = None  # a worker process's queue to the progress bar


def _init_worker(ticks) -> None:
    global _ticks
    _ticks = ticks


def _worker(task) -> dict:
    out, index, num_shards, items, options = task
    return write_one_shard(out, index, num_shards, items, options, lambda: _ticks.put(1))


def write_shards(out: str, tasks: list[tuple], workers: int, bar: tqdm) -> list[dict]:
    """Write each task's shard: in this process, or in `workers` processes that each write whole shards."""
    if workers <= 1 or len(tasks) <= 1:
        return [write_one_shard(*task, tick=lambda: bar.update(1)) for task in tasks]
    # spawn, not fork: a forked child would inherit the object store client's threads and connections.
    ctx = multiprocessing.get_context("spawn")
    ticks = ctx.Queue()
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(ticks,)) as pool:
        result = pool.map_async(_worker, tasks, chunksize=1)
        while not result.ready():
            try:
                bar.update(ticks.get(timeout=0.2))
            except queue.Empty:
                pass
        counts = result.get()
    bar.update(bar.total - bar.n)  # the ticks still on their way when the last shard finished
    return counts


# -------------------------------------------------------------------------------------------------- runs

def write_settings(out: str, settings: dict) -> None:
    """prepare.json, written once (any machine may); refused when it exists with other settings."""
    path = storage.path(out) / shards.SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            was = ", ".join(f"{k}={old.get(k)}" for k in differ)
            now = ", ".join(f"{k}={settings.get(k)}" for k in differ)
            raise ValueError(f"{out}: this folder was prepared with {was}; this command asks for {now}: use "
                             f"another --out or the same settings")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def collect(args) -> list[Item]:
    if args.format == "openimages" and args.boxes is not None:
        items, source = collect_openimages_csv(args.boxes, args.images), args.boxes
    elif args.format == "openimages":
        items, source = collect_bbox_dir(args.bbox_dir, args.images), args.bbox_dir
    elif args.format == "coco":
        items, source = collect_coco(args.annotations, args.images), ", ".join(args.annotations)
    else:
        items, source = collect_folder(args.images, args.annotations), args.annotations or args.images
    if not items:
        raise ValueError(f"{source}: no annotated images, nothing to prepare")
    return items


def run(args) -> dict:
    """Prepare this machine's shards; the counts summed over them (written now or complete before)."""
    items = collect(args)
    num_shards = math.ceil(len(items) / args.images_per_shard)
    frame = args.box_frame or DEFAULT_FRAME[args.format]
    options = Options(frame, args.min_box_area, args.max_box_area, args.min_side, args.max_short_side, args.quality)
    settings = {"format": args.format, "box_frame": frame, "min_box_area": args.min_box_area,
                "max_box_area": args.max_box_area, "min_side": args.min_side, "max_short_side": args.max_short_side,
                "quality": args.quality, "images_per_shard": args.images_per_shard, "num_shards": num_shards,
                "items": len(items)}
    write_settings(args.out, settings)
    machine, machines = args.shard
    mine = [j for j in range(num_shards) if j % machines == machine]
    storage.refresh(args.out)
    complete = shards.complete_shards(args.out, num_shards)
    todo = [j for j in mine if j not in complete]
    if len(todo) < len(mine):
        print(f"{args.out}: skipping {len(mine) - len(todo)} of this machine's {len(mine)} shards, complete "
              f"already", file=sys.stderr)
    size = args.images_per_shard
    tasks = [(args.out, j, num_shards, items[j * size:(j + 1) * size], options) for j in todo]
    with tqdm(total=sum(len(t[3]) for t in tasks), unit="image", desc="prepare") as bar:
        written = write_shards(args.out, tasks, args.workers, bar)
    total = empty_counts()
    for counts in written + shards.read_counts(args.out, [complete[j] for j in mine if j in complete]):
        add_counts(total, counts)
    return {**total, "shards": len(mine), "shards_written": len(todo), "shards_total": num_shards}


def info(out: str) -> dict:
    """Totals over the complete shards of a prepared folder, and which shards are missing."""
    num_shards = shards.read_settings(out)["num_shards"]
    storage.refresh(out)
    complete = shards.complete_shards(out, num_shards)
    total = empty_counts()
    for counts in shards.read_counts(out, [complete[j] for j in sorted(complete)]):
        add_counts(total, counts)
    return {**total, "shards_complete": len(complete), "shards_total": num_shards,
            "shards_missing": [j for j in range(num_shards) if j not in complete]}


def _skipped_line(skipped: dict) -> str:
    return ", ".join(f"{r} {skipped[r]}" for r in photos.REASONS)


def _info_table(out: str, r: dict) -> str:
    lines = [f"{out}: {r['shards_complete']} of {r['shards_total']} shards complete"]
    if r["shards_missing"]:
        first = ", ".join(shards.shard_name(j, r["shards_total"]) for j in r["shards_missing"][:5])
        more = f" and {len(r['shards_missing']) - 5} more" if len(r["shards_missing"]) > 5 else ""
        lines.append(f"missing   {first}{more}")
    lines += [f"items     {r['items']}", f"images    {r['images']}",
              f"boxes     {r['boxes']} (dropped: {r['boxes_outside']} outside the image, {r['boxes_filtered']} "
              f"by the area filter)",
              f"skipped   {sum(r['skipped'].values())}: {_skipped_line(r['skipped'])}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI

def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard takes I/N with 0 <= I < N, got {text}")
    return i, n


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= (high or int(text)):
            within = f"from {low} to {high}" if high else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {within}, got {text}")
        return int(text)

    return parse


def _common(p: argparse.ArgumentParser, fmt: str) -> None:
    frame = {STORED: "stored", DISPLAYED: "displayed",
             AUTO: "stored, or displayed for an image whose JSON width/height are its EXIF-rotated size and not "
                   "its stored size"}[DEFAULT_FRAME[fmt]]
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the prepared folder to write (local or gs://); a rerun with the same settings finishes what "
                        "is missing")
    p.add_argument("--box-frame", choices=[STORED, DISPLAYED], default=None,
                   help="where the pixel boxes were drawn: 'stored' on the file's pixels as stored (the image is "
                        "turned upright by its EXIF orientation, and the boxes with it), 'displayed' on the "
                        f"upright image as a viewer shows it (default for {fmt}: {frame})")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="this is machine I of N: it writes the output shards j with j %% N == I (default 0/1: "
                        "all of them); every machine lists the same shards from the annotations")
    p.add_argument("--workers", type=_whole(1), default=1, metavar="K",
                   help="processes on this machine, each writing whole shards (default 1: in this process)")
    p.add_argument("--images-per-shard", type=_whole(1), default=DEFAULT_IMAGES_PER_SHARD, metavar="N",
                   help="annotated images per output shard; the number of shards is ceil(items / this) "
                        f"(default {DEFAULT_IMAGES_PER_SHARD})")
    p.add_argument("--min-box-area", type=float, default=DEFAULT_MIN_BOX_AREA, metavar="A",
                   help="drop boxes smaller than this fraction of the image's area, measured after clipping "
                        f"(default {DEFAULT_MIN_BOX_AREA}, the original release's filter)")
    p.add_argument("--max-box-area", type=float, default=DEFAULT_MAX_BOX_AREA, metavar="A",
                   help=f"drop boxes larger than this fraction of the image's area (default {DEFAULT_MAX_BOX_AREA}, "
                        "the original release's filter)")
    p.add_argument("--min-side", type=_whole(0), default=DEFAULT_MIN_SIDE, metavar="PX",
                   help="skip images whose shorter side is under this many pixels, as too_small: training crops "
                        "a square around a box and resizes it to 512², and from a smaller image that crop is "
                        f"mostly interpolation (default {DEFAULT_MIN_SIDE})")
    p.add_argument("--max-short-side", type=_whole(1), default=DEFAULT_MAX_SHORT_SIDE, metavar="PX",
                   help="scale images down so that their shorter side is at most this (aspect kept; default "
                        f"{DEFAULT_MAX_SHORT_SIDE}: twice the 512² training crop)")
    p.add_argument("--quality", type=_whole(1, 100), default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG quality of the stored images, 1-100 (default {DEFAULT_QUALITY})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="format", required=True, metavar="{openimages,coco,folder,info}")
    oi = sub.add_parser("openimages", help="OpenImages boxes (the CSV, or the original release's bbox/ folder)",
                        description="OpenImages: --boxes, the box CSV as downloaded (oidv6-train-annotations-bbox"
                                    ".csv: ImageID, XMin, XMax, YMin, YMax in [0, 1]; other columns ignored), with "
                                    "images found as <ImageID>.jpg anywhere under --images; or --bbox-dir, the "
                                    "Paint-by-Example release's bbox/<split>/<id>.txt (pixel x0 y0 x1 y1 a line), "
                                    "with images at <--images>/<split>/<id>.jpg. The boxes are on the stored "
                                    "pixels (Open Images publishes a Rotation column rather than rotating).")
    boxes = oi.add_mutually_exclusive_group(required=True)
    boxes.add_argument("--boxes", metavar="CSV", help="the OpenImages box CSV (local or gs://)")
    boxes.add_argument("--bbox-dir", metavar="DIR", help="the release's bbox/ folder of <split>/<id>.txt box files")
    oi.add_argument("--images", required=True, metavar="DIR", help="the folder of the images (searched recursively)")
    _common(oi, "openimages")
    coco = sub.add_parser("coco", help="COCO instances JSON files",
                          description="COCO: pixel [x, y, w, h] boxes from each file's 'annotations' (crowd "
                                      "boxes, iscrowd 1, dropped), images[].file_name under --images (or anywhere "
                                      "under it where that name is unique). COCO was annotated in browsers that "
                                      "did not apply EXIF, so the boxes are on the stored pixels, except for "
                                      "images whose width/height in the JSON are their upright size.")
    coco.add_argument("--annotations", nargs="+", required=True, metavar="JSON",
                      help="instances_*.json files (several are merged by file_name)")
    coco.add_argument("--images", required=True, metavar="DIR", help="the folder of the images")
    _common(coco, "coco")
    folder = sub.add_parser("folder", help="your own photos: a JSONL file or a .txt box file per image",
                            description="A folder of images with pixel boxes, as the training folder source "
                                        "reads it: --annotations, a JSONL file ({\"path\": ..., \"boxes\": [[x0, "
                                        "y0, x1, y1], ...]} a line, paths relative to --images), or without it a "
                                        ".txt box file beside each image (or under bbox/ for images under "
                                        "images/). Boxes are on the upright image, as annotation tools show it.")
    folder.add_argument("--images", required=True, metavar="DIR", help="the folder of the images")
    folder.add_argument("--annotations", default=None, metavar="FILE.jsonl",
                        help="the JSONL file (default: .txt box files beside the images)")
    _common(folder, "folder")
    inf = sub.add_parser("info", help="totals of a prepared folder",
                         description="Images, boxes and skipped items summed over the complete shards of a "
                                     "prepared folder, and the shards still missing. Exit status 0 when every "
                                     "shard is complete, 1 when some are missing (or on an error).")
    inf.add_argument("out", help="the prepared folder (local or gs://)")
    inf.add_argument("--json", action="store_true", help="print the totals as one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "info":
            report = info(args.out)
            print(json.dumps(report, sort_keys=True) if args.json else _info_table(args.out, report))
            return 1 if report["shards_missing"] else 0
        r = run(args)
    except (OSError, ValueError) as e:  # OSError: missing files, storage errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: this machine's {r['shards']} of {r['shards_total']} shards ({r['shards_written']} written "
          f"now): {r['images']} images of {r['items']}, {r['boxes']} boxes; skipped {sum(r['skipped'].values())}: "
          f"{_skipped_line(r['skipped'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

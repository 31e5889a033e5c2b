"""Random-access image sources with object boxes: TFDS datasets and folders of images (local or in a bucket).
Each has `__len__` and `__getitem__(i)`, which returns {"image": uint8 (H, W, 3), "boxes": float32 (N, 4) as
pixel x0, y0, x1, y1, "id": str}; decoding happens there, so an unusable item raises `CorruptItem` when it is
read."""
from __future__ import annotations

import json
import os
import posixpath

import numpy as np

from pbe_jax import images, storage
from pbe_jax.data import photos
from pbe_jax.data.photos import CorruptItem
from pbe_jax.images import IMAGE_SUFFIXES
from pbe_jax.storage import Path, PathLike

# Where each supported TFDS dataset keeps its boxes: a BBoxFeature, normalised (ymin, xmin, ymax, xmax).
TFDS_BOXES = {"coco": ("objects", "bbox"), "open_images_v4": ("bobjects", "bbox")}


def yxyx_to_pixels(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """TFDS boxes, normalised (ymin, xmin, ymax, xmax), to float32 pixel (x0, y0, x1, y1). Degenerate boxes
    stay degenerate: the pair builder skips and counts them."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return b[:, [1, 0, 3, 2]] * np.asarray([width, height, width, height], np.float32)


def _tfds_boxes_field(name: str) -> tuple[str, str]:
    dataset = name.split(":")[0].split("/")[0]
    if dataset not in TFDS_BOXES:
        raise ValueError(f"TFDS dataset {name!r} has no known box field; supported: "
                         f"{', '.join(sorted(TFDS_BOXES))} (with an optional /config and :version)")
    return TFDS_BOXES[dataset]


class TfdsSource:
    """A TFDS dataset with boxes, read by random access with `tfds.data_source` (ArrayRecord files):
    `coco/2017` (boxes in objects/bbox) or `open_images_v4` (bobjects/bbox). The dataset must already be
    prepared in ArrayRecord format (`tfds build coco/2017 --file_format=array_record`); nothing is
    downloaded. `data_dir` may be gs:// (array_record >= 0.8.6 reads it; older ones need a Cloud Storage FUSE
    mount). Only the image and the boxes are read: the other per-object fields (labels, areas) are not needed
    and are never zipped with the boxes."""

    def __init__(self, name: str, split: str, data_dir: str | Path | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self._field = _tfds_boxes_field(name)
        self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        what = f"{self.name}/{self.split}/{i}"
        try:
            example = self._ds[i]
        except Exception as e:  # noqa: BLE001 -- a bad record fails in TF, PIL or array_record, each its own type
            raise CorruptItem(f"{what}: cannot read or decode the record ({type(e).__name__}: {e})") from e
        group, key = self._field
        try:
            raw_boxes, image = example[group][key], example["image"]
        except KeyError as e:
            raise KeyError(f"{self.name}: examples have no {group}/{key} or image field (fields: "
                           f"{sorted(example)}); is this the dataset the name says?") from e
        image = images.to_rgb(np.asarray(image), what)
        return {"image": image, "boxes": yxyx_to_pixels(raw_boxes, *image.shape[:2]), "id": what}


def _box_array(rows: list, where: str) -> np.ndarray:
    try:
        boxes = np.asarray(rows, np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: boxes must be a list of [x0, y0, x1, y1] numbers ({e})") from e
    if boxes.size == 0:
        return np.zeros((0, 4), np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be a list of [x0, y0, x1, y1], got an array of shape {boxes.shape}")
    return boxes


def read_jsonl(path: Path, root: Path) -> list[tuple[str, np.ndarray]]:
    """(image path, boxes) per line of {"path": ..., "boxes": [[x0, y0, x1, y1], ...]}; relative paths are
    relative to `root`. A malformed line raises ValueError naming the file and the line."""
    items = []
    for n, line in enumerate(storage.path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
            image, rows = str(root / row["path"]), row["boxes"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{where}: expected a JSON object {{"path": ..., "boxes": [[x0, y0, x1, y1], ...]}} '
                             f"({type(e).__name__}: {e})") from e
        items.append((image, _box_array(rows, where)))
    return items


def read_box_file(path: Path) -> np.ndarray:
    """The release's per-image box file: one box a line, `x0 y0 x1 y1` in pixels, further columns ignored."""
    try:
        lines = storage.path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptItem(f"{path}: cannot read the box file ({e})") from e
    rows = []
    for n, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) < 4:
                raise ValueError(f"{len(fields)} columns")
            rows.append([float(v) for v in fields[:4]])
        except ValueError as e:
            raise CorruptItem(f"{path}:{n}: expected 'x0 y0 x1 y1' (numbers; more columns are ignored), "
                              f"got {line!r} ({e})") from e
    return np.asarray(rows, np.float32).reshape(-1, 4)


class Tree:
    """Walking and listing a folder tree with string paths: `os` for a local one (fast over millions of
    files), epath for a bucket (gs://…, "/"-separated)."""

    def __init__(self, root: PathLike):
        self.remote = storage.is_remote(root)
        self.root = os.fspath(root).rstrip("/") if self.remote else os.fspath(root)
        self.sep = "/" if self.remote else os.sep
        self.join = posixpath.join if self.remote else os.path.join

    def walk(self):
        if not self.remote:
            yield from os.walk(self.root)
            return
        scheme = self.root.split("://")[0] + "://"
        for folder, dirs, files in storage.path(self.root).walk():
            folder = os.fspath(folder)  # epath's fsspec backend drops the scheme here, tf.io.gfile keeps it
            yield folder if folder.startswith(scheme) else scheme + folder, dirs, files

    def listdir(self, folder: str) -> set[str]:
        if not self.remote:
            return set(os.listdir(folder)) if os.path.isdir(folder) else set()
        p = storage.path(folder)
        return {c.name for c in p.iterdir()} if p.is_dir() else set()

    def relative_parts(self, path: str) -> list[str]:
        if self.remote:
            return path[len(self.root) + 1:].split("/")
        return os.path.relpath(path, self.root).split(os.sep)


def _parallel_box_file(tree: Tree, image: str) -> str | None:
    """root/images/<dirs>/<stem>.<ext> -> root/bbox/<dirs>/<stem>.txt; None for an image outside images/."""
    parts = tree.relative_parts(image)
    if len(parts) < 2 or parts[0] != "images":
        return None
    return os.path.splitext(tree.join(tree.root, "bbox", *parts[1:]))[0] + ".txt"


def scan_box_files(root: PathLike) -> list[tuple[str, str]]:
    """(image, box file) for every image under `root` that has a box file, folders and names in sorted order.
    Paths are kept as strings and folders listed once: the release's OpenImages tree has two million files."""
    tree = Tree(root)
    listed: dict[str, set[str]] = {}  # the bbox/ folders, listed when first needed

    def exists(path: str) -> bool:
        folder, name = path.rsplit(tree.sep, 1)
        if folder not in listed:
            listed[folder] = tree.listdir(folder)
        return name in listed[folder]

    found = []
    for folder, dirs, files in tree.walk():
        dirs.sort()
        here = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_SUFFIXES:
                continue
            image = tree.join(folder, name)
            if stem + ".txt" in here:
                found.append((image, tree.join(folder, stem + ".txt")))
            elif (parallel := _parallel_box_file(tree, image)) and exists(parallel):
                found.append((image, parallel))
    return found


class FolderSource:
    """Images under `root` with boxes in pixels, in one of two layouts:

    - `annotations` given: a JSONL file, one image a line, {"path": "a/b.jpg", "boxes": [[x0, y0, x1, y1],
      ...]}; relative paths are relative to `root`, absolute ones are used as they are. The file is read
      here, so a malformed line fails at once (ValueError naming the file and the line).
    - `annotations` None: the Paint-by-Example release's layout, one `.txt` box file per image with one box
      a line, `x0 y0 x1 y1` separated by white space (further columns are ignored). For an image
      `root/<dirs>/<stem>.<ext>` the box file is `root/<dirs>/<stem>.txt` beside it; failing that, for an
      image under `root/images/`, the same relative path under `root/bbox/` (the release's
      `images/<split>/<id>.jpg` and `bbox/<split>/<id>.txt`). Images without a box file are not items. Box
      files are read with their image, so a malformed line raises CorruptItem (naming the file and the
      line) when that item is read.

    Images are decoded in `__getitem__` (`photos.decode`): turned upright by their EXIF orientation, with the
    boxes given on the image as a viewer shows it (`box_frame` "displayed", the default: how one's own photos
    are annotated) or on the stored pixels ("stored"); JPEGs larger than `max_short_side` on their shorter side
    are decoded at a reduced scale (draft mode) and resized to it, the boxes scaled with them. An unusable
    image raises CorruptItem with its reason (missing, unreadable, decompression bomb, too small: under
    `min_short_side`)."""

    def __init__(self, root: PathLike, annotations: PathLike | None = None, *, box_frame: str = "displayed",
                 max_short_side: int | None = 1024, min_short_side: int = 0):
        self.root = storage.path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: not a folder")
        if box_frame not in ("stored", "displayed"):
            raise ValueError(f"box_frame must be 'stored' or 'displayed', not {box_frame!r}")
        self.box_frame, self.max_short_side, self.min_short_side = box_frame, max_short_side, min_short_side
        if annotations is not None:
            self._items = read_jsonl(storage.path(annotations), self.root)
        else:
            self._items = scan_box_files(self.root)
        if not self._items:
            where = annotations or f"{self.root} (no image has a .txt box file beside it or under bbox/)"
            raise ValueError(f"{where}: no images")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        path, boxes = self._items[i]
        if isinstance(boxes, str):
            boxes = read_box_file(boxes)
        photo = photos.decode(path, str(path), max_short_side=self.max_short_side,
                              min_short_side=self.min_short_side)
        return {"image": photo.rgb, "boxes": photo.boxes(boxes, self.box_frame), "id": str(path)}

"""Prepared shards: the format `python -m pbe_jax.data.prepare` writes and `ShardSource` reads for training.

A prepared folder holds `prepare.json` (the settings it was made with) and, per shard `i` of `n`,
`shard-iiiii-of-nnnnn.array_record` (ArrayRecord, grain's random-access format: one record an image) and
`shard-iiiii-of-nnnnn.json` (its counts), written after the records: a shard whose `.json` exists is complete.
A record is a little-endian uint32 header length, a JSON header {"id": str, "boxes": [[x0, y0, x1, y1], ...]}
(pixels of the stored image) and the image's encoded bytes (JPEG)."""
from __future__ import annotations

import io
import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
from PIL import Image

from pbe_jax import storage
from pbe_jax.data.photos import CorruptItem
from pbe_jax.storage import PathLike

SETTINGS = "prepare.json"
_NAME = re.compile(r"^shard-(\d{5})-of-(\d{5})\.json$")
# One record a chunk: reading a record reads only its own bytes; JPEG bytes do not compress.
WRITER_OPTIONS = "group_size:1,uncompressed"
# array_record opens gs:// itself from 0.8.6 on (riegeli's GcsReader, through Application Default Credentials;
# CLOUD_STORAGE_EMULATOR_ENDPOINT points it at an emulator); older releases fail with "open() failed".
GCS_LINE = ("this array_record cannot open gs:// paths (google/array_record#120): upgrade it (pip install "
            "'array_record>=0.8.6'), or mount the bucket with Cloud Storage FUSE (gcsfuse --implicit-dirs BUCKET "
            "/mnt/BUCKET) and give the mounted path")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def encode(item_id: str, boxes: np.ndarray, image_bytes: bytes) -> bytes:
    header = json.dumps({"id": item_id, "boxes": np.round(np.asarray(boxes, np.float64), 2).tolist()},
                        separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + image_bytes


def decode_header(record: bytes) -> tuple[dict, memoryview]:
    (n,) = struct.unpack_from("<I", record)
    return json.loads(bytes(record[4:4 + n])), memoryview(record)[4 + n:]


def decode(record: bytes, what: str) -> dict:
    """{"image": uint8 (H, W, 3), "boxes": float32 (N, 4), "id": str} from one record."""
    try:
        header, data = decode_header(record)
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # convert would copy an RGB image
        boxes = np.asarray(header["boxes"], np.float32).reshape(-1, 4)
        return {"image": rgb, "boxes": boxes, "id": header["id"]}
    except (OSError, ValueError, KeyError, struct.error, SyntaxError) as e:
        raise CorruptItem(f"{what}: cannot decode the record ({type(e).__name__}: {e})") from e


def write_shard(out: PathLike, index: int, count: int, records: Iterable[bytes], counts: dict) -> None:
    """Write shard `index` of `count`: the records (local: under a temporary name, renamed; a bucket: one
    upload), then its counts, which mark it complete."""
    out = storage.path(out)
    name = shard_name(index, count)

    def write(local: str) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(local, WRITER_OPTIONS)
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()

    storage.write_with(out / f"{name}.array_record", write)
    storage.write_text(out / f"{name}.json", json.dumps(counts, sort_keys=True) + "\n")


def complete_shards(out: PathLike, count: int) -> dict[int, str]:
    """{index: name} of the shards "of `count`" in `out` that are complete (their `.json` exists)."""
    found = {}
    for name in storage.names(out):
        if (m := _NAME.match(name)) and int(m.group(2)) == count:
            found[int(m.group(1))] = name[:-len(".json")]
    return found


def read_counts(out: PathLike, names: list[str], threads: int = 16) -> list[dict]:
    out = storage.path(out)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda n: json.loads((out / f"{n}.json").read_text()), names))


def read_settings(out: PathLike) -> dict:
    path = storage.path(out) / SETTINGS
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no {SETTINGS}; not a folder written by python -m pbe_jax.data.prepare")
    return json.loads(path.read_text())


class ShardSource:
    """The images of a prepared folder (`python -m pbe_jax.data.prepare`): `len()` and `[i]` returning
    {"image": uint8 (H, W, 3), "boxes": float32 (N, 4) pixels, "id": str}, like every source.

    Opening reads only the settings and each shard's counts; a shard's file is opened the first time one of
    its records is read, in the process that reads it (worker processes get the list of shards, not open
    readers), so a host opens only the shards it reads. Every shard must be complete. The path is local, gs://
    (read by array_record's own GCS reader) or a bucket mounted with Cloud Storage FUSE."""

    def __init__(self, path: PathLike):
        if storage.is_remote(path) and not os.fspath(path).startswith("gs://"):
            raise ValueError(f"{path}: prepared shards are read from local paths or gs:// only")
        self.path = os.fspath(path).rstrip("/")
        self.settings = read_settings(self.path)
        total = self.settings["num_shards"]
        shards = complete_shards(self.path, total)
        missing = sorted(set(range(total)) - set(shards))
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} of its {total} shards are not complete (the first: "
                             f"{shard_name(missing[0], total)}); run the same prepare command again to finish them")
        self.names = [shards[i] for i in range(total)]
        sizes = [c["images"] for c in read_counts(self.path, self.names)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            file = f"{self.path}/{self.names[shard]}.array_record"
            try:
                reader = ArrayRecordReader(file, "readahead_buffer_size:0")
            except RuntimeError as e:
                if file.startswith("gs://") and "open() failed" in str(e):
                    raise ValueError(f"{file}: {GCS_LINE}") from e
                raise CorruptItem(f"{file}: cannot open the shard ({e})") from e
            self._readers[shard] = reader
        return reader

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of a source of {len(self)}")
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        local = i - int(self.offsets[shard])
        what = f"{self.path}/{self.names[shard]}.array_record[{local}]"
        try:
            (record,) = self._reader(shard).read([local])
        except Exception as e:  # noqa: BLE001 -- array_record raises RuntimeError/OSError on damaged files
            raise CorruptItem(f"{what}: cannot read the record ({type(e).__name__}: {e})") from e
        return decode(record, what)


"""Editing many images: jobs from a JSONL manifest or a COCOEE-layout folder (local or in a bucket), batches
over all local devices, resumable (finished outputs are skipped), split into shards for several hosts, and no
input able to stop the run or lose its results."""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from pbe_jax import images, storage
from pbe_jax.storage import Path, PathLike

# COCOEE folder names: this project's and the Paint-by-Example release's (test_bench/GT_3500 etc.), and the
# file-name suffixes the release adds to the shared id (000000001234_GT.png, _mask.png, _ref.png).
LAYOUT = {"source": ("source", "GT"), "mask": ("mask", "Mask"), "reference": ("reference", "Ref")}
SUFFIXES = ("_GT", "_mask", "_ref", "_source", "_reference")


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    source: Path
    mask: Path
    reference: Path
    options: tuple = ()  # (key, value) pairs of `OPTIONS` given for this job, over the run's own


# Per-edit settings a manifest line may give (`PaintByExample.__call__`'s keyword arguments): checks and the
# sentence a bad value gets.
OPTIONS = {
    "padding_mask_crop": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                          "a whole number of pixels ≥ 0, or null for no crop"),
    "mask_blur": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number ≥ 0"),
    "strength": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                 "a number in (0, 1]"),
}


def _options(row: dict, where: str) -> tuple:
    out = []
    for key in sorted(OPTIONS.keys() & row.keys()):
        ok, expected = OPTIONS[key]
        if not ok(row[key]):
            raise ValueError(f"{where}: {key} must be {expected}, not {json.dumps(row[key])}")
        out.append((key, row[key]))
    return tuple(out)


def read_manifest(path: Path) -> list[Job]:
    """JSONL, one edit per line: {"source": ..., "mask": ..., "reference": ..., "id": optional}, and optionally
    `OPTIONS` ("padding_mask_crop", "mask_blur", "strength") for that line. "reference" may be a list: one edit
    of the source per exemplar, with ids "<id>_0", "<id>_1", … (consecutive, so one batch holds them). Relative
    paths are relative to the manifest (a path with a scheme, gs://…, is taken as it is)."""
    path = storage.path(path)
    jobs, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            source, mask = (path.parent / row[k] for k in ("source", "mask"))
            refs = row["reference"]
            listed = isinstance(refs, list)
            refs = [path.parent / r for r in (refs if listed else [refs])]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with source, mask and reference paths ({e})")
        if not refs:
            raise ValueError(f"{path}:{n}: \"reference\" is an empty list; give at least one exemplar")
        options = _options(row, f"{path}:{n}")
        job_id = str(row.get("id", storage.path(row["source"]).stem))
        ids = [f"{job_id}_{k}" for k in range(len(refs))] if listed else [job_id]
        for i, ref in zip(ids, refs):
            if i in seen:
                raise ValueError(f"{path}:{n}: id {i!r} appears twice; give each line a unique \"id\"")
            seen.add(i)
            jobs.append(Job(i, source, mask, ref, options))
    return jobs


def _strip_id(stem: str) -> str:
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


class NoJobsError(ValueError):
    """A manifest or COCOEE-layout folder that lists no edit at all."""


def layout_dirs(folder: Path) -> dict[str, Path]:
    """The source, mask and reference subfolders of a COCOEE-layout folder, by role."""
    folder = storage.path(folder)
    subdirs = {}
    for role, prefixes in LAYOUT.items():
        found = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.startswith(prefixes)]
        if not found:
            raise FileNotFoundError(f"{folder}: no {role} folder (expected one named {' or '.join(prefixes)}…)")
        subdirs[role] = found[0]
    return subdirs


def layout_files(folder: Path) -> dict[str, dict[str, Path]]:
    """The images of a COCOEE-layout folder by role ("source", "mask", "reference") and id."""
    return {role: {_strip_id(p.stem): p for p in d.iterdir() if p.suffix.lower() in images.IMAGE_SUFFIXES}
            for role, d in layout_dirs(folder).items()}


def read_layout(folder: Path) -> list[Job]:
    """A COCOEE-layout folder: source, mask and reference subfolders whose files share an id."""
    folder = storage.path(folder)
    files = layout_files(folder)
    ids = sorted(files["source"])
    missing = [i for i in ids if i not in files["mask"] or i not in files["reference"]]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} source images have no matching mask or reference, "
                                f"e.g. {missing[:3]}")
    return [Job(i, files["source"][i], files["mask"][i], files["reference"][i]) for i in ids]


def _no_jobs(folder: Path) -> str:
    """Why a COCOEE-layout folder lists no jobs: its subfolders without images (or, if none is empty, that no
    source image has a mask and a reference)."""
    dirs = layout_dirs(folder)
    empty = [f"{d.name}/" for role, d in dirs.items()
             if not any(p.suffix.lower() in images.IMAGE_SUFFIXES for p in d.iterdir())]
    if not empty:
        return f"{folder}: no jobs: no source image has a matching mask and reference"
    names = empty[0] if len(empty) == 1 else f"{', '.join(empty[:-1])} and {empty[-1]}"
    return f"{folder}: no jobs: {names} {'holds' if len(empty) == 1 else 'hold'} no images"


def load_jobs(spec: PathLike) -> list[Job]:
    """The jobs of a COCOEE-layout folder or a JSONL manifest; NoJobsError when it lists none."""
    spec = storage.path(spec)
    if spec.is_dir():
        jobs = read_layout(spec)
        if not jobs:
            raise NoJobsError(_no_jobs(spec))
        return jobs
    if spec.is_file():
        jobs = read_manifest(spec)
        if not jobs:
            raise NoJobsError(f"{spec}: no jobs: the manifest lists no edits (expected one JSON object per line, with "
                              f"source, mask and reference paths)")
        return jobs
    raise FileNotFoundError(f"{spec}: neither a manifest file nor a folder")


def output_path(out_dir: PathLike, job: Job) -> Path:
    return storage.path(out_dir) / f"{job.id}.png"


def check_inputs(job: Job, read: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a job's images; raise ImageError with the file and the reason when one is unusable. `read`, when
    given, keeps the sources and masks already read (several exemplars of one photo decode it once)."""
    key = (str(job.source), str(job.mask))
    if read is not None and key in read:
        source, mask = read[key]
    else:
        source = images.to_rgb(job.source, str(job.source))
        mask = images.to_mask(job.mask, str(job.mask))
        if not (mask >= 0.5).any():
            raise images.ImageError(f"{job.mask}: the mask is empty (no white pixels), nothing to edit")
        if read is not None:
            read[key] = source, mask
    return source, mask, images.to_rgb(job.reference, str(job.reference))


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i:i + size]


def parse_shard(spec: str) -> tuple[int, int]:
    """"I/N" → (I, N), 0 ≤ I < N."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"shard {spec!r}: expected I/N, e.g. 0/8") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {spec!r}: I must be in 0..N-1")
    return index, count


def shard_of(jobs: list[Job], index: int, count: int) -> list[Job]:
    """Shard `index` of `count`: every count-th job from the index-th, by position in the full list (the
    manifest's order, or a folder's sorted ids). The shards are disjoint, cover the list, and differ in size
    by at most one; each host can work out its own without talking to the others."""
    return jobs[index::count]


def failures_file(shard: tuple[int, int]) -> str:
    index, count = shard
    return "failures.jsonl" if count == 1 else f"failures.{index}-of-{count}.jsonl"


def run(jobs: list[Job], out_dir: PathLike, edit: Callable[[list, list, list, list[int], dict], list], *,
        batch_size: int, seed: int, progress: Callable[..., Iterable] | None = None,
        shard: tuple[int, int] = (0, 1)) -> dict:
    """Edit every job of `shard` (index, count) whose output does not exist yet. `edit(sources, masks,
    references, seeds, options)` returns uint8 images, and is always given `batch_size` rows (at most the number
    of jobs in the whole list) of jobs with the same `options` (a dict of the manifest's per-line settings; jobs
    are grouped by them, in order within a group). Each job's seed is `seed` + its index in the whole list, so a
    resumed or sharded run gives the same pictures (with the same `batch_size`). Unreadable inputs are skipped and
    recorded in this run's failures file (`failures_file(shard)`, rewritten by each run: every job without an output is
    tried again). Returns counts and the failure records."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {job.id: i for i, job in enumerate(jobs)}
    batch_size = max(1, min(batch_size, len(jobs)))  # of the whole list: the same in every shard and resume
    mine = shard_of(jobs, *shard)
    finished = storage.names(out_dir)  # one listing, not a request per job (buckets)
    todo = [j for j in mine if output_path(out_dir, j).name not in finished]
    groups: dict[tuple, list[Job]] = {}
    for job in todo:
        groups.setdefault(job.options, []).append(job)
    stats = {"total": len(mine), "skipped_done": len(mine) - len(todo), "written": 0, "failed": 0}
    records = []
    bar = progress(total=len(todo)) if progress else None
    t0 = time.perf_counter()
    failures = storage.AppendLog(out_dir / failures_file(shard), append=False)
    try:
        for chunk in (c for group in groups.values() for c in batches(group, batch_size)):
            ready, arrays, read = [], [], {}
            for job in chunk:
                try:
                    arrays.append(check_inputs(job, read))
                    ready.append(job)
                except images.ImageError as e:
                    records.append({"id": job.id, "error": str(e)})
                    failures.write(json.dumps(records[-1]) + "\n")
                    stats["failed"] += 1
            if ready:
                # Always batch_size rows (the last job repeated): one compiled shape for the whole run, and a
                # picture that depends on its job and the batch size only, not on how many jobs were ready
                # around it (XLA's arithmetic can differ in the last bit between batch shapes).
                rows = [*arrays, *[arrays[-1]] * (batch_size - len(arrays))]
                seeds = [seed + index[j.id] for j in ready]
                sources, masks, refs = (list(x) for x in zip(*rows))
                results = edit(sources, masks, refs, seeds + [seeds[-1]] * (batch_size - len(seeds)),
                               dict(chunk[0].options))
                for job, image in zip(ready, results):
                    images.save_png(image, output_path(out_dir, job))
                    stats["written"] += 1
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(img_per_s=f"{stats['written'] / (time.perf_counter() - t0):.2f}")
    finally:
        failures.close()
        if bar is not None:
            bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["failures"] = records
    return stats


def write_summary(out_dir: PathLike, jobs: list[Job], records: list[dict]) -> Path:
    """Every shard's failures in one `failures.jsonl`, in job order, for the whole run."""
    order = {job.id: i for i, job in enumerate(jobs)}
    path = storage.path(out_dir) / "failures.jsonl"
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: order[r["id"]])))
    return path


def _done_marker(out_dir: PathLike, index: int, count: int) -> Path:
    return storage.path(out_dir) / f".shard.{index}-of-{count}.done"


def shard_done(out_dir: PathLike, shard: tuple[int, int]) -> None:
    """Mark `shard` finished: its failures file is then complete."""
    storage.write_text(_done_marker(out_dir, *shard), "")


def collect_shard_failures(out_dir: PathLike, count: int) -> list[dict] | None:
    """For `--shard` runs, which cannot talk to each other: every shard's failure records from the shards'
    files, or None while some shard has not finished (`shard_done`)."""
    out_dir = storage.path(out_dir)
    storage.refresh(out_dir)  # the other shards' markers were written by other processes
    if not all(_done_marker(out_dir, i, count).exists() for i in range(count)):
        return None
    return [json.loads(line) for i in range(count)
            for line in (out_dir / failures_file((i, count))).read_text().splitlines() if line.strip()]

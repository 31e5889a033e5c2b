"""Editing many images: jobs from a JSONL manifest or a COCOEE-layout folder, batches over all local
devices, resumable (finished outputs are skipped), and no input able to stop the run or lose its results."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from pbe_jax import images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
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


def read_manifest(path: Path) -> list[Job]:
    """JSONL, one edit per line: {"source": ..., "mask": ..., "reference": ..., "id": optional}; relative
    paths are relative to the manifest."""
    path = Path(path)
    jobs, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            paths = {k: (path.parent / row[k]) for k in ("source", "mask", "reference")}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with source, mask and reference paths ({e})")
        job_id = str(row.get("id", Path(row["source"]).stem))
        if job_id in seen:
            raise ValueError(f"{path}:{n}: id {job_id!r} appears twice; give each line a unique \"id\"")
        seen.add(job_id)
        jobs.append(Job(job_id, **paths))
    return jobs


def _strip_id(stem: str) -> str:
    for suffix in SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_layout(folder: Path) -> list[Job]:
    """A COCOEE-layout folder: source, mask and reference subfolders whose files share an id."""
    folder = Path(folder)
    subdirs = {}
    for role, prefixes in LAYOUT.items():
        found = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.startswith(prefixes)]
        if not found:
            raise FileNotFoundError(f"{folder}: no {role} folder (expected one named {' or '.join(prefixes)}…)")
        subdirs[role] = found[0]
    files = {role: {_strip_id(p.stem): p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
             for role, d in subdirs.items()}
    ids = sorted(files["source"])
    missing = [i for i in ids if i not in files["mask"] or i not in files["reference"]]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} source images have no matching mask or reference, "
                                f"e.g. {missing[:3]}")
    return [Job(i, files["source"][i], files["mask"][i], files["reference"][i]) for i in ids]


def load_jobs(spec: Path) -> list[Job]:
    spec = Path(spec)
    if spec.is_dir():
        return read_layout(spec)
    if spec.is_file():
        return read_manifest(spec)
    raise FileNotFoundError(f"{spec}: neither a manifest file nor a folder")


def output_path(out_dir: Path, job: Job) -> Path:
    return Path(out_dir) / f"{job.id}.png"


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)`, then `tmp` renamed to `path`: a crash leaves the old file or the new one, never a
    half-written file that a resumed run would take as finished."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_png(image: np.ndarray, path: Path) -> None:
    """Atomic (`write_atomically`)."""
    write_atomically(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def check_inputs(job: Job) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a job's images; raise ImageError with the file and the reason when one is unusable."""
    source = images.to_rgb(job.source, str(job.source))
    mask = images.to_mask(job.mask, str(job.mask))
    reference = images.to_rgb(job.reference, str(job.reference))
    edit = mask >= 0.5
    if not edit.any():
        raise images.ImageError(f"{job.mask}: the mask is empty (no white pixels), nothing to edit")
    return source, mask, reference


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i:i + size]


def run(jobs: list[Job], out_dir: Path, edit: Callable[[list, list, list, list[int]], np.ndarray], *,
        batch_size: int, seed: int, progress: Callable[[Iterable], Iterable] | None = None) -> dict:
    """Edit every job whose output does not exist yet. `edit(sources, masks, references, seeds)` returns
    uint8 images. Each job's seed is `seed` + its index in the full job list, so a resumed or re-batched run
    gives the same pictures. Unreadable inputs are skipped and recorded in failures.jsonl."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {job.id: i for i, job in enumerate(jobs)}
    todo = [j for j in jobs if not output_path(out_dir, j).exists()]
    stats = {"total": len(jobs), "skipped_done": len(jobs) - len(todo), "written": 0, "failed": 0}
    bar = progress(total=len(todo)) if progress else None
    t0 = time.perf_counter()
    with open(out_dir / "failures.jsonl", "a") as failures:
        for chunk in batches(todo, batch_size):
            ready, arrays = [], []
            for job in chunk:
                try:
                    arrays.append(check_inputs(job))
                    ready.append(job)
                except images.ImageError as e:
                    failures.write(json.dumps({"id": job.id, "error": str(e)}) + "\n")
                    failures.flush()
                    stats["failed"] += 1
            if ready:
                sources, masks, refs = (list(x) for x in zip(*arrays))
                results = edit(sources, masks, refs, [seed + index[j.id] for j in ready])
                for job, image in zip(ready, results):
                    save_png(image, output_path(out_dir, job))
                    stats["written"] += 1
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(img_per_s=f"{stats['written'] / (time.perf_counter() - t0):.2f}")
    if bar is not None:
        bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return stats


def grid(source: np.ndarray, mask: np.ndarray, reference: np.ndarray, *results: np.ndarray) -> np.ndarray:
    """source | mask | reference | result(s), side by side at the (first) result's height."""
    h = results[0].shape[0]

    def fit(a):
        a = a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1)
        w = max(1, round(a.shape[1] * h / a.shape[0]))
        return np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC))

    m = (np.asarray(mask) * 255).astype(np.uint8)
    gap = np.full((h, 4, 3), 255, np.uint8)
    parts = [fit(source), gap, fit(m), gap, fit(reference)]
    for result in results:
        parts += [gap, result]
    return np.concatenate(parts, axis=1)


def enlarge(image: np.ndarray, min_height: int) -> np.ndarray:
    """`image` scaled up by the smallest whole factor that makes it at least `min_height` tall, each pixel a
    block (no smoothing), so that small edits can be looked at; unchanged when already that tall."""
    factor = -(-min_height // image.shape[0])
    return np.repeat(np.repeat(image, factor, 0), factor, 1) if factor > 1 else image

"""The paper's Table 1 on COCOEE, computed as the original release's evaluation computes it (issue 14):

  clip_score     100 × cosine of the CLIP ViT-B/32 image features (with the visual projection) of the generated
                 region and of the reference (`cocoee.region_pixels`, `cocoee.reference_pixels`), per item,
                 averaged
  fid_clip       the Fréchet distance (pytorch-fid's sqrtm form) between the CLIP features of the whole results
                 (`cocoee.clip_pixels`, openai CLIP's preprocess) and those of a real image set, COCO test2017
                 prepared by `cocoee.coco_reference` (short side 512, centre crop 512²)
  qs             GMM-GIQA: mean of clip(log-likelihood / 300, 0, 1) × 100 of the results' CLIP features under
                 the released Gaussian mixture (`gmm`)
  fid_inception  the standard FID (pytorch-fid's InceptionV3) between the results and the same real set
  psnr, ssim     the result against the source (GT) outside the mask: how well the rest of the image is kept

The benchmark is the release's layout: `GT_3500/{id}_GT.png`, `Mask_bbox_3500/{id}_mask.png`,
`Ref_3500/{id}_ref.png` and `id_list.npy` (ids as integers, written with 12 digits; without it, the ids of
the GT folder); the results are `RESULTS/{id}.png` (what `sample.py --batch COCOEE --out RESULTS` writes).
Items whose files are missing or unreadable, or whose mask has no white pixel, are listed and skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
from typing import Callable, Iterable

import numpy as np

from pbe_jax import batch, images, storage
from pbe_jax.eval import cocoee, metrics
from pbe_jax.eval.features import Extractor
from pbe_jax.eval.gmm import GaussianMixture, qs
from pbe_jax.storage import Path, PathLike

KINDS = ("clip", "inception")  # the two feature spaces a Fréchet distance is computed in


@dataclasses.dataclass(frozen=True)
class Entry:
    id: str
    gt: Path | None
    mask: Path | None
    reference: Path | None


def read_benchmark(folder: PathLike) -> list[Entry]:
    """The benchmark's ids (id_list.npy, else the GT folder's) and each one's GT, mask and reference file
    (None where the folder has none)."""
    folder = storage.path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such benchmark folder")
    files = batch.layout_files(folder)
    id_list = folder / "id_list.npy"
    if id_list.is_file():
        try:
            raw = np.load(storage.local_or_buffer(id_list), allow_pickle=False).reshape(-1)
        except (OSError, ValueError) as e:
            raise ValueError(f"{id_list}: not a numpy array of ids ({e})") from e
        ids = [f"{int(i):012d}" if np.issubdtype(raw.dtype, np.integer) else str(i) for i in raw]
    else:
        ids = sorted(files["source"])
    if not ids:
        raise ValueError(f"{folder}: the benchmark lists no ids")
    return [Entry(i, files["source"].get(i), files["mask"].get(i), files["reference"].get(i)) for i in ids]


@dataclasses.dataclass
class Loaded:
    id: str
    result: np.ndarray  # uint8, at the mask's size
    mask: np.ndarray  # uint8 (H, W), as the file holds it ("L")
    reference: np.ndarray
    gt: np.ndarray
    resized: bool


def _gray(path: Path) -> np.ndarray:
    return np.asarray(images.load_image(path).convert("L"))


def load_item(entry: Entry, result_path: Path) -> Loaded:
    """Read one item; ImageError (naming the file) when anything is missing or unusable."""
    for role in ("gt", "mask", "reference"):
        if getattr(entry, role) is None:
            raise images.ImageError(f"id {entry.id}: the benchmark has no {role} image for it")
    mask = _gray(entry.mask)
    if not (mask == 255).any():
        raise images.ImageError(f"{entry.mask}: the mask has no white (255) pixel, so no region to score")
    gt = images.to_rgb(entry.gt, str(entry.gt))
    if gt.shape[:2] != mask.shape:
        raise images.ImageError(f"{entry.mask}: mask of {mask.shape[1]}×{mask.shape[0]} for a GT image of "
                                f"{gt.shape[1]}×{gt.shape[0]}")
    result = images.to_rgb(result_path, str(result_path))
    resized = result.shape != gt.shape
    if resized:
        result = images.resize_rgb(result, gt.shape[:2])
    return Loaded(entry.id, result, mask, images.to_rgb(entry.reference, str(entry.reference)), gt, resized)


def _progress(total: int, desc: str, enabled: bool | None):
    """A tqdm bar on stderr: always (True), never (False), or where stderr is a terminal (None)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=None if enabled is None else not enabled)


def evaluate(results_dir: PathLike, benchmark_dir: PathLike, *, clip: Extractor, clip_size: int = cocoee.CLIP_SIZE,
             inception: Extractor | None = None, gmm: GaussianMixture | None = None,
             fid_stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, batch_size: int = 32,
             progress: bool | None = False) -> dict:
    """Score one results folder against a COCOEE-layout benchmark. `clip`: an Extractor of the CLIP tower
    with its projection (inputs `clip_size`² CLIP-normalised pixels); `inception`: an Extractor of the FID
    InceptionV3 (inputs [0, 1] images) for `fid_inception`; `gmm` for `qs`; `fid_stats`: {"clip": (mu,
    sigma), "inception": (mu, sigma)} of the real set (`reference_stats`). A measure whose inputs are not
    given is None and explained under "skipped". ValueError when no item could be evaluated."""
    results_dir, benchmark_dir = storage.path(results_dir), storage.path(benchmark_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such results folder")
    fid_stats = fid_stats or {}
    entries = read_benchmark(benchmark_dir)
    finished = storage.names(results_dir)
    present = [e for e in entries if batch.output_path(results_dir, e).name in finished]
    missing = [e.id for e in entries if batch.output_path(results_dir, e).name not in finished]
    rows, failed, features, resized = [], [], {"clip": [], "inception": []}, 0
    bar = _progress(len(present), results_dir.name, progress)
    try:
        for chunk in batch.batches(present, batch_size):
            items = []
            for entry in chunk:
                try:
                    items.append(load_item(entry, batch.output_path(results_dir, entry)))
                except images.ImageError as e:
                    failed.append({"id": entry.id, "error": str(e)})
            bar.update(len(chunk))
            if not items:
                continue
            resized += sum(it.resized for it in items)
            # One call for the three inputs of every item: regions, references, whole results.
            region, ref, whole = np.split(clip(
                [cocoee.region_pixels(it.result, it.mask, clip_size) for it in items]
                + [cocoee.reference_pixels(it.reference, clip_size) for it in items]
                + [cocoee.clip_pixels(it.result, clip_size) for it in items]), 3)
            features["clip"].append(whole)
            if inception is not None:
                features["inception"].append(inception([it.result.astype(np.float32) / 255 for it in items]))
            for it, score in zip(items, metrics.cosine(region, ref) * 100):
                rows.append({"id": it.id, "clip_score": float(score),
                             **metrics.preservation(it.result, it.gt, it.mask)})
    finally:
        bar.close()
    if not rows:
        raise ValueError(f"{results_dir}: no item of {benchmark_dir} could be evaluated ({len(entries)} ids, "
                         f"{len(missing)} results missing, {len(failed)} unusable"
                         + (f", e.g. {failed[0]['error']}" if failed else "") + ")")
    feats = {k: np.concatenate(v) for k, v in features.items() if v}
    out, skipped = {}, {}
    out["clip_score"] = float(np.mean([r["clip_score"] for r in rows]))
    for kind, given in (("clip", True), ("inception", inception is not None)):
        key = f"fid_{kind}"
        if not given:
            out[key], skipped[key] = None, "no Inception weights (--inception-weights)"
        elif kind not in fid_stats:
            out[key], skipped[key] = None, "no real-image statistics (--fid-reference or --fid-stats)"
        elif len(feats[kind]) < 2:
            out[key], skipped[key] = None, "a Fréchet distance needs at least 2 results"
        else:
            out[key] = metrics.frechet_distance_sqrtm(*fid_stats[kind], *metrics.feature_stats(feats[kind]))
    out["qs"] = qs(feats["clip"], gmm) if gmm is not None else None
    if gmm is None:
        skipped["qs"] = "no Gaussian mixture (--gmm)"
    for key in ("psnr", "ssim"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return {**out, "n": len(rows), "results": str(results_dir), "benchmark": str(benchmark_dir),
            "items": len(entries), "missing": missing, "failed": failed, "resized": resized,
            "skipped": skipped, "per_item": rows}


# ---- the real image set's statistics ------------------------------------------------------------------


def real_images(folder: PathLike) -> list[Path]:
    folder = storage.path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of real images (--fid-reference)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in images.IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise ValueError(f"{folder}: {len(paths)} images; FID statistics need at least 2")
    return paths


def reference_stats(folder: PathLike, extractors: dict[str, Callable[[list[np.ndarray]], np.ndarray]], *,
                    batch_size: int = 32, progress: bool | None = False) -> tuple[dict, dict]:
    """Mean and covariance of each extractor's features over the real images in `folder` (each prepared by
    `cocoee.coco_reference`); `extractors` maps a kind to a function from those uint8 images to features.
    Returns ({kind: (mu, sigma)}, {"n": images used, "failed": [{"file", "error"}]})."""
    feats, failed, n = {k: [] for k in extractors}, [], 0
    paths = real_images(folder)
    bar = _progress(len(paths), "real images", progress)
    try:
        for chunk in batch.batches(paths, batch_size):
            prepared = []
            for p in chunk:
                try:
                    prepared.append(cocoee.coco_reference(images.to_rgb(p, str(p))))
                except (images.ImageError, ValueError) as e:
                    failed.append({"file": str(p), "error": str(e)})
            bar.update(len(chunk))
            if prepared:
                n += len(prepared)
                for kind, fn in extractors.items():
                    feats[kind].append(fn(prepared))
    finally:
        bar.close()
    if n < 2:
        raise ValueError(f"{folder}: {n} usable images; FID statistics need at least 2")
    return {k: metrics.feature_stats(np.concatenate(v)) for k, v in feats.items()}, {"n": n, "failed": failed}


def clip_input(size: int) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    return lambda rgbs: [cocoee.clip_pixels(a, size) for a in rgbs]


def unit_range(rgbs: Iterable[np.ndarray]) -> list[np.ndarray]:
    return [a.astype(np.float32) / 255 for a in rgbs]


def save_stats(path: PathLike, stats: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    """One .npz: `<kind>_mu`, `<kind>_sigma` for each kind, and `meta` (JSON: what computed them)."""
    arrays = {f"{k}_{name}": np.asarray(a, np.float64) for k, pair in stats.items() for name, a in zip(("mu", "sigma"), pair)}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    storage.write_bytes(path, buffer.getvalue())


def load_stats(path: PathLike) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """What `save_stats` wrote: ({kind: (mu, sigma)}, meta)."""
    try:
        with np.load(storage.local_or_buffer(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not an .npz of FID statistics ({e})") from e
    stats = {}
    for kind in KINDS:
        if f"{kind}_mu" in arrays:
            mu, sigma = arrays[f"{kind}_mu"], arrays.get(f"{kind}_sigma")
            if sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(f"{path}: {kind}_mu {mu.shape} and {kind}_sigma "
                                 f"{None if sigma is None else sigma.shape} are not (D,) and (D, D)")
            stats[kind] = (mu, sigma)
    if not stats:
        raise ValueError(f"{path}: holds no statistics (expected {', '.join(k + '_mu' for k in KINDS)})")
    return stats, json.loads(str(arrays["meta"])) if "meta" in arrays else {}


def cached_reference_stats(path: PathLike, reference: PathLike | None,
                           extractors: dict[str, tuple[Callable[[list[np.ndarray]], np.ndarray], dict]], *,
                           batch_size: int = 32, progress: bool | None = False,
                           log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """The real set's statistics of each kind in `extractors` ({kind: (feature function, what computes it, for
    the file's meta)}): those the .npz at `path` holds, and those it lacks computed from the images in
    `reference` (`reference_stats`) and written back into it, so a later run (or one that adds a kind)
    computes nothing twice. Kinds that can be had neither way are left out (and said so)."""
    path = storage.path(path)
    stats, meta = load_stats(path) if path.is_file() else ({}, {})
    todo = {k: fn for k, (fn, _) in extractors.items() if k not in stats}
    if todo and reference is None:
        log(f"warning: {path} has no {' or '.join(todo)} statistics and no real images were given "
            f"(--fid-reference): no fid_{' or fid_'.join(todo)}")
    elif todo:
        log(f"computing {', '.join(todo)} statistics of {reference} (cached in {path})")
        new, info = reference_stats(reference, todo, batch_size=batch_size, progress=progress)
        for f in info["failed"][:10]:
            log(f"  skipped {f['file']}: {f['error']}")
        meta.update({k: {"reference": str(reference), "n": info["n"], "skipped": len(info["failed"]),
                         **extractors[k][1]} for k in todo})
        stats.update(new)
        save_stats(path, stats, meta)
    elif reference is not None:
        log(f"using the cached statistics of {reference} in {path}")
    return {k: v for k, v in stats.items() if k in extractors}


def default_stats_path(reference: PathLike, clip_model: str, clip_dtype: str) -> Path:
    """Where statistics of `reference` are cached when --fid-stats does not say: one file per real set and
    CLIP tower, under the user's cache (PBE_JAX_CACHE, default ~/.cache/pbe_jax)."""
    ref = str(reference) if storage.is_remote(reference) else str(storage.path(reference).resolve())
    key = hashlib.sha256(json.dumps([ref, str(clip_model), clip_dtype]).encode()).hexdigest()[:16]
    root = os.environ.get("PBE_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pbe_jax"))
    return storage.path(root) / "fid_stats" / f"{storage.path(ref).name}-{key}.npz"


def markdown(reports: dict[str, dict]) -> str:
    """Table 1's form: a row per results folder (FID and QS in CLIP space as the paper has them, then the
    standard FID and the preservation of the unmasked region)."""
    columns = [("FID ↓", "fid_clip", ".2f"), ("QS ↑", "qs", ".2f"), ("CLIP score ↑", "clip_score", ".2f"),
               ("FID (Inception) ↓", "fid_inception", ".2f"), ("PSNR unmasked ↑", "psnr", ".2f"),
               ("SSIM unmasked ↑", "ssim", ".4f")]
    used = [c for c in columns if any(r[c[1]] is not None for r in reports.values())]
    lines = ["| Method | n | " + " | ".join(c[0] for c in used) + " |", "|---" * (len(used) + 2) + "|"]
    for name, r in reports.items():
        cells = ["-" if r[key] is None else format(r[key], fmt) for _, key, fmt in used]
        lines.append(f"| {name} | {r['n']} | " + " | ".join(cells) + " |")
    for name, r in reports.items():
        lines.append(f"\n{name}: {r['n']} of {r['items']} items evaluated; {len(r['missing'])} results missing; "
                     f"{len(r['failed'])} unusable; {r['resized']} resized to the GT's size")
        lines += [f"  skipped {f['id']}: {f['error']}" for f in r["failed"][:10]]
        lines += [f"  {key}: not computed, {why}" for key, why in r["skipped"].items()]
    return "\n".join(lines)

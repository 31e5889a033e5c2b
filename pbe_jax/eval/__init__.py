"""The quality benchmark, measured as the paper measures it: a results folder (`RESULTS/<id>.png`, what
`sample.py --batch BENCH --out RESULTS` writes) scored item by item against a COCOEE-layout benchmark
folder (`source/`, `mask/`, `reference/`, and optionally `labels.jsonl`).

Per item: the generated region is the result cropped to the item's box (from labels.jsonl, else the mask's
bounding box). CLIP-style score = cosine of its embedding and the reference's; PSNR and SSIM compare the
result with the source outside the mask; the attribute score asks a classifier trained on the synthetic
world whether the region shows the reference's shape, colour and pattern. FID, when Inception features can
be computed, compares the set of results with the sources (or with precomputed statistics).

labels.jsonl (as `python -m pbe_jax.data.benchmark make` writes it), one line per id: {"id": "000123",
"box": [x0, y0, x1, y1], "reference": {"shape": int, "colour": int, "pattern": int}, ...} (indices into
`pbe_jax.data.synthetic` SHAPES, the world's colours (`benchmark.json`'s "colours": the base ones, then any
extra ones) and PATTERNS; the box in source pixels; other keys are not read).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from pbe_jax import batch, images, storage
from pbe_jax.data import benchmark, synthetic
from pbe_jax.eval import attributes
from pbe_jax.eval.metrics import EmbedFn, cosine, crop, feature_stats, frechet_distance, in_batches, preservation
from pbe_jax.storage import Path, PathLike

LABELS_FILE = "labels.jsonl"


def read_labels(benchmark_dir: Path, classes: tuple[int, int, int] = attributes.ClassifierConfig.classes
                ) -> dict[str, dict]:
    """The benchmark's labels.jsonl, checked for what scoring needs (attributes within `classes`, the
    number of shapes, colours and patterns): id → {"box": [x0, y0, x1, y1], "attributes": [shape, colour,
    pattern] or None}."""
    path = storage.path(benchmark_dir) / LABELS_FILE
    out = {}
    for item_id, row in benchmark.read_labels(benchmark_dir).items():
        where = f"{path}, id {item_id}"
        try:
            box = [float(v) for v in row["box"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: needs a \"box\": [x0, y0, x1, y1] ({type(e).__name__}: {e})") from e
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"{where}: box {row['box']} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        attrs = None
        if row.get("reference") is not None:
            try:
                attrs = [int(row["reference"][a]) for a in attributes.ATTRIBUTES]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: reference needs integer {', '.join(attributes.ATTRIBUTES)} "
                                 f"({type(e).__name__}: {e})") from e
            for a, v, k in zip(attributes.ATTRIBUTES, attrs, classes):
                if not 0 <= v < k:
                    raise ValueError(f"{where}: reference {a}={v} is outside 0..{k - 1}")
        out[str(item_id)] = {"box": box, "attributes": attrs}
    return out


def world(benchmark_dir: PathLike) -> tuple[tuple[str, ...], str | None]:
    """The extra colours of the synthetic world the benchmark was made in (benchmark.json records its
    vocabularies; none without one), and why its attribute indices would not mean what a classifier of that
    world reads, if they would not (then no extra colours)."""
    meta = storage.path(benchmark_dir) / "benchmark.json"
    if not meta.is_file():
        return (), None
    made = json.loads(meta.read_text())
    ours = {"shapes": list(synthetic.SHAPES), "patterns": list(synthetic.PATTERNS)}
    changed = [k for k, v in ours.items() if k in made and made[k] != v]
    if changed:
        return (), f"{meta} lists other {' and '.join(changed)} than pbe_jax.data.synthetic now has"
    try:
        return synthetic.extra_colours_of(made.get("colours", synthetic.COLOUR_NAMES), str(meta)), None
    except ValueError as e:
        return (), str(e)


@dataclasses.dataclass
class Item:
    id: str
    source: np.ndarray
    edit: np.ndarray  # bool (H, W), True = the masked region
    reference: np.ndarray
    result: np.ndarray  # at the source's size
    box: list
    attributes: list | None
    resized: bool


def _load(job: batch.Job, results_dir: Path, labels: dict) -> Item:
    source = images.to_rgb(job.source, str(job.source))
    edit = images.to_mask(job.mask, str(job.mask)) >= 0.5
    if edit.shape != source.shape[:2]:
        raise images.ImageError(f"{job.mask}: mask of {edit.shape[1]}×{edit.shape[0]} for a source of "
                                f"{source.shape[1]}×{source.shape[0]}")
    path = batch.output_path(results_dir, job)
    result = images.to_rgb(path, str(path))
    resized = result.shape != source.shape
    label = labels.get(job.id, {})
    box = label.get("box") or images.mask_box(edit)
    if box is None:
        raise images.ImageError(f"{job.mask}: the mask is empty and {LABELS_FILE} gives no box")
    return Item(job.id, source, edit, images.to_rgb(job.reference, str(job.reference)),
                images.resize_rgb(result, source.shape[:2]), list(box), label.get("attributes"), resized)


def _mean(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)), "n": len(values)} if values else None


def _embedded(cache: dict, fn: EmbedFn, benchmark_dir: Path, what: str, items: list[Item]) -> np.ndarray:
    """fn over the benchmark images `what` ("reference" or "source") of `items`, each computed once per
    (benchmark, fn, what) in `cache`."""
    store = cache.setdefault((str(benchmark_dir if storage.is_remote(benchmark_dir) else benchmark_dir.resolve()), fn,
                              what), {})
    todo = [it for it in items if it.id not in store]
    if todo:
        store.update(zip([it.id for it in todo], in_batches(fn, [getattr(it, what) for it in todo])))
    return np.stack([store[it.id] for it in items])


def evaluate(results_dir: PathLike, benchmark_dir: PathLike, *, embed_fn: EmbedFn | None = None,
             classifier: attributes.AttributeClassifier | None = None, inception_fn: EmbedFn | None = None,
             fid_stats: tuple[np.ndarray, np.ndarray] | None = None, batch_size: int = 32,
             cache: dict | None = None) -> dict:
    """Score `results_dir` against `benchmark_dir`. Optional parts: `embed_fn` (e.g.
    `metrics.clip_embedder(folder)`) for the CLIP-style score, `classifier` for the attribute score (items
    with labels), `inception_fn` for FID against `fid_stats` (mu, sigma), or else against the sources.
    `cache`: one dict passed to every call that scores a results folder of the same benchmark, so that its
    references are embedded and its sources' Inception features computed once, not once per folder.

    Returns {"results", "benchmark", "items", "evaluated", "missing": [ids], "failed": [{"id", "error"}],
    "resized": count of results not at the source's size (resized to it, bicubic), "metrics": {"clip",
    "psnr", "ssim": {"mean", "n"}, "attributes": {"shape", "colour", "pattern", "all", "n"}, "fid": {"value",
    "n"}}, "skipped": {metric: why}, "per_item": [{"id", "box", "clip", "psnr", "ssim", "predicted",
    "label"}]}. A metric that could not be computed is None in "metrics" and explained in "skipped"."""
    results_dir, benchmark_dir = storage.path(results_dir), storage.path(benchmark_dir)
    cache = {} if cache is None else cache
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such results folder")
    jobs = batch.read_layout(benchmark_dir)
    extra_colours, vocabulary = world(benchmark_dir)
    classes = attributes.classes_of(extra_colours)
    labels = read_labels(benchmark_dir, classes) if (benchmark_dir / LABELS_FILE).is_file() else {}
    if classifier is not None and not vocabulary and classifier.config.classes != classes:
        vocabulary = (f"the attribute classifier reads {list(classifier.config.classes)} shapes, colours, "
                      f"patterns; the benchmark's world has {list(classes)}")
    if vocabulary or not labels:
        classifier = None
    finished = storage.names(results_dir)  # one listing, not a request per item (buckets)
    present = [j for j in jobs if batch.output_path(results_dir, j).name in finished]
    missing = sorted({j.id for j in jobs} - {j.id for j in present})
    rows, failed, fake, real, resized = [], [], [], [], 0
    # In chunks, so a benchmark of thousands of 512² images never sits in memory at once.
    for chunk in batch.batches(present, batch_size):
        items = []
        for job in chunk:
            try:
                items.append(_load(job, results_dir, labels))
            except images.ImageError as e:
                failed.append({"id": job.id, "error": str(e)})
        if not items:
            continue
        regions = [crop(it.result, it.box) for it in items]
        clip = None
        if embed_fn is not None:
            clip = cosine(in_batches(embed_fn, regions), _embedded(cache, embed_fn, benchmark_dir, "reference", items))
        labelled = [i for i, it in enumerate(items) if it.attributes is not None]
        predicted = {}
        if classifier is not None and labelled:
            predicted = dict(zip(labelled, attributes.predict(classifier, [regions[i] for i in labelled],
                                                                           batch_size=batch_size).tolist()))
        if inception_fn is not None:
            fake.append(in_batches(inception_fn, [it.result for it in items]))
            if fid_stats is None:
                real.append(_embedded(cache, inception_fn, benchmark_dir, "source", items))
        for i, it in enumerate(items):
            resized += it.resized
            rows.append({"id": it.id, "box": it.box, "clip": None if clip is None else float(clip[i]),
                         **preservation(it.result, it.source, it.edit),
                         "predicted": predicted.get(i), "label": it.attributes})

    skipped, scored = {}, [r for r in rows if r["predicted"] is not None]
    if embed_fn is None:
        skipped["clip"] = "no CLIP tower given (embed_fn / --model)"
    if not labels:
        skipped["attributes"] = f"the benchmark has no {LABELS_FILE}"
    elif vocabulary:
        skipped["attributes"] = vocabulary
    elif classifier is None:
        skipped["attributes"] = "no attribute classifier given"
    elif not scored:
        skipped["attributes"] = f"no evaluated item has reference attributes in {LABELS_FILE}"
    fid = None
    if inception_fn is None:
        skipped["fid"] = "no Inception features (inception_fn / --inception); none ship with pbe_jax"
    elif sum(map(len, fake)) < 2:
        skipped["fid"] = "FID needs at least 2 results"
    else:
        stats = fid_stats if fid_stats is not None else feature_stats(np.concatenate(real))
        fid = {"value": frechet_distance(*stats, *feature_stats(np.concatenate(fake))), "n": sum(map(len, fake))}
    metrics = {name: _mean([r[name] for r in rows]) for name in ("clip", "psnr", "ssim")}
    metrics["attributes"] = attributes.accuracy([r["predicted"] for r in scored],
                                                [r["label"] for r in scored]) if scored else None
    metrics["fid"] = fid
    return {"results": str(results_dir), "benchmark": str(benchmark_dir), "items": len(jobs),
            "evaluated": len(rows), "missing": missing, "failed": failed,
            "resized": resized, "metrics": metrics, "skipped": skipped,
            "per_item": rows}


__all__ = ["LABELS_FILE", "evaluate", "read_labels", "world"]

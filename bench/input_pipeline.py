"""Training pairs per second per host core, from prepared shards and from raw folders of JPEGs, against what one
TPU host consumes.

    python bench/input_pipeline.py --out bench/results/cpu/input_pipeline.json
    python bench/input_pipeline.py --quick        # a few items each: the CI test's size, well under a minute

Images are photo-like, so that JPEG decoding costs what it costs on photos: a 1/f amplitude spectrum (white
noise shaped in Fourier space, as in natural images), sharp-edged shapes whose boxes are the objects (2-80 % of
the image), mild noise, saved at JPEG quality 90; their bits per pixel are reported (photos at q90: about 2-4).
Sources, at 512², 1024×768 and 12 MP (4032×3024):
  shards-*   `pbe_jax.data.shards` records, images stored as prepare stores them: shorter side at most 1024
             (`photos.decode`), re-encoded at q90 (512² and 1024×768 keep their size, 12 MP becomes 1365×1024);
  folder-*   `FolderSource` over a JSONL file of the original JPEGs, with its defaults (over 1024 on the shorter
             side: draft-mode decoding and a resize to 1024).
For each source and 0, 1 and 2 grain workers (`make_loader`, batches of 8): samples/s (wall), CPU seconds per
sample of this process and its children (the workers, from /proc) and samples per CPU second ("per core"), in
steady state, after the first batches. `split`: decode (`source[i]`) and pair construction (`make_pair`) timed
apart, without grain, on one core. `demand`: per topology, the roofline samples/s per chip of the largest batch
that fits (bench/results/tpu-aot/train-<topology>-b*.json) times the chips of one host, and the host cores that
rate needs at the per-core rate measured here (2 workers). The roofline is 100 % MFU, so the demand is an upper
bound. Files are read from the page cache: the times are CPU, not disk or network. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SIZES = {"512": (512, 512), "1024x768": (1024, 768), "12MP": (4032, 3024)}
QUALITY = 90
STORED_SHORT_SIDE = 1024
WORKERS = (0, 1, 2)
# Chips on one host of each slice: a v5p-8 is 4 chips (8 TensorCores) on one host, a v5litepod-8 and a v6e-8
# are 8 chips on one host (Cloud TPU docs: "Chips per host").
HOST_CHIPS = {"v5p-8": 4, "v5e-8": 8, "v6e-8": 8}
# Samples timed per configuration, so that each runs a few seconds on one core.
SAMPLES = {"512": 256, "1024x768": 128, "12MP": 64}


def smooth_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 (height, width), zero mean, unit variance, amplitude ∝ 1/f: white noise shaped in Fourier space."""
    fy = np.fft.fftfreq(height).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(width).astype(np.float32)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = np.inf  # no DC term
    out = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((height, width), dtype=np.float32)) / f, s=(height, width))
    return (out / out.std()).astype(np.float32)


def photo(rng: np.random.Generator, width: int, height: int, shapes: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (height, width, 3) photo-like image and float32 (shapes, 4) boxes of its objects: a 1/f luminance
    field with lower-resolution 1/f colour (as photos' chroma is), then ellipses and polygons covering 2-80 % of
    the image each, textured by the same field, then noise of σ 2."""
    lum = smooth_field(rng, height, width)
    small = (max(height // 4, 8), max(width // 4, 8))
    chroma = [np.asarray(Image.fromarray(smooth_field(rng, *small)).resize((width, height), Image.BILINEAR))
              for _ in range(2)]
    rgb = (rng.uniform(70, 180, 3).astype(np.float32) + 35 * lum[..., None]
           + np.stack([12 * chroma[0], -6 * (chroma[0] + chroma[1]), 12 * chroma[1]], -1))
    boxes = []
    for _ in range(shapes):
        area = np.exp(rng.uniform(np.log(0.02), np.log(0.8))) * width * height
        bw = min(width, np.sqrt(area * np.exp(rng.uniform(-0.6, 0.6))))
        bh = min(height, area / bw)
        x0, y0 = rng.uniform(0, width - bw), rng.uniform(0, height - bh)
        xa, ya, xb, yb = int(x0), int(y0), int(np.ceil(x0 + bw)), int(np.ceil(y0 + bh))
        mask = Image.new("L", (xb - xa, yb - ya))
        if rng.random() < 0.5:
            ImageDraw.Draw(mask).ellipse([x0 - xa, y0 - ya, x0 - xa + bw, y0 - ya + bh], fill=255)
        else:
            k, turn = int(rng.integers(3, 8)), rng.uniform(0, 2 * np.pi)
            a = turn + 2 * np.pi * np.arange(k) / k
            ImageDraw.Draw(mask).polygon(list(zip(x0 - xa + bw / 2 * (1 + np.cos(a)),
                                                  y0 - ya + bh / 2 * (1 + np.sin(a)))), fill=255)
        m = np.asarray(mask, np.float32)[..., None] / 255
        region = rgb[ya:yb, xa:xb]
        region[:] = region * (1 - m) + (rng.uniform(20, 235, 3).astype(np.float32) + 20 * lum[ya:yb, xa:xb, None]) * m
        boxes.append([x0, y0, x0 + bw, y0 + bh])
    rgb += rng.normal(0, 2.0, rgb.shape).astype(np.float32)
    return np.clip(rgb, 0, 255).round().astype(np.uint8), np.asarray(boxes, np.float32)


def jpeg(rgb: np.ndarray, quality: int = QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def bits_per_pixel(data: bytes, width: int, height: int) -> float:
    return round(8 * len(data) / (width * height), 2)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process, its live descendants (grain's workers) and its reaped children,
    from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def stat(pid: int) -> list[str]:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    def children(pid: int) -> list[int]:
        found = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        return found + [g for c in found for g in children(c)]

    me = stat(os.getpid())
    total = sum(int(v) for v in me[11:15])  # utime, stime, cutime, cstime
    for pid in children(os.getpid()):
        try:
            total += sum(int(v) for v in stat(pid)[11:13])
        except FileNotFoundError:  # exited between the listing and the reading
            pass
    return total / tick


def make_sources(folder: Path, rng: np.random.Generator, unique: int, items: int) -> tuple[dict, dict]:
    """({name: source}, {name: what its images are}) for shards-* and folder-* at every size in SIZES."""
    from pbe_jax.data import photos, shards
    from pbe_jax.data.sources import FolderSource

    sources, info = {}, {}
    for name, (w, h) in SIZES.items():
        originals = []
        for _ in range(unique):
            rgb, boxes = photo(rng, w, h)
            originals.append((jpeg(rgb), boxes))
        raw = folder / f"folder-{name}"
        raw.mkdir()
        lines = []
        for i in range(items):
            data, boxes = originals[i % unique]
            (raw / f"{i:05d}.jpg").write_bytes(data)
            lines.append(json.dumps({"path": f"{i:05d}.jpg", "boxes": boxes.tolist()}))
        (raw / "annotations.jsonl").write_text("\n".join(lines) + "\n")
        sources[f"folder-{name}"] = FolderSource(raw, raw / "annotations.jsonl")
        info[f"folder-{name}"] = {"size": [w, h], "bits_per_pixel": bits_per_pixel(originals[0][0], w, h)}

        stored = []
        for data, boxes in originals:
            p = photos.decode(data, max_short_side=STORED_SHORT_SIDE)
            stored.append((jpeg(p.rgb), p.boxes(boxes, "displayed"), p.rgb.shape[1::-1]))
        records = [shards.encode(str(i), stored[i % unique][1], stored[i % unique][0]) for i in range(items)]
        out = folder / f"shards-{name}"
        out.mkdir()
        half = (len(records) + 1) // 2
        for index, part in enumerate((records[:half], records[half:])):
            shards.write_shard(out, index, 2, part, {"images": len(part)})
        (out / shards.SETTINGS).write_text(json.dumps({"num_shards": 2}))
        sources[f"shards-{name}"] = shards.ShardSource(out)
        sw, sh = stored[0][2]
        info[f"shards-{name}"] = {"size": [int(sw), int(sh)], "bits_per_pixel": bits_per_pixel(stored[0][0], sw, sh)}
    return sources, info


def split(source, count: int) -> dict:
    """Decode and pair construction timed apart (CPU time of this process), no grain, one core."""
    from pbe_jax.data import pairs

    config = pairs.PairConfig()
    decode = pair = 0.0
    for i in range(count):
        t0 = time.process_time()
        item = source[i % len(source)]
        t1 = time.process_time()
        pairs.make_pair(item, np.random.default_rng(i), config)
        decode, pair = decode + t1 - t0, pair + time.process_time() - t1
    return {"decode_ms": round(1e3 * decode / count, 2), "pair_ms": round(1e3 * pair / count, 2),
            "samples_per_cpu_s": round(count / (decode + pair), 1)}


def run_loader(source, workers: int, batch_size: int, batches: int, warmup: int = 2) -> dict:
    """Steady-state rates of `make_loader` over `batches` batches, after `warmup` (workers started, buffers full)."""
    from pbe_jax.data import loader

    it = loader.make_loader(source, batch_size=batch_size, seed=0, image_size=512, reference_size=224,
                            worker_count=workers)
    try:
        for _ in range(warmup):
            next(it)
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        it.close()
    n = batches * batch_size
    # None: the window was too short for the kernel's CPU-time ticks (10 ms), as it can be with --quick.
    return {"samples_per_s": round(n / wall, 1), "cpu_s_per_sample": round(cpu / n, 4),
            "samples_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None}


def report(result: dict, out: str | None) -> None:
    """Print the result as JSON, and write it to `out` too when given (the bench scripts of the data path)."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


def demand(aot: Path, per_core: dict[str, float]) -> dict:
    """Per topology: the largest batch that fits, its roofline samples/s per chip, the samples/s one host's chips
    consume, and the cores that needs at each `per_core` rate (samples per CPU second)."""
    out = {}
    for topology, chips in HOST_CHIPS.items():
        runs = {p.name: json.loads(p.read_text()) for p in sorted(aot.glob(f"train-{topology}-b*.json"))}
        fitting = {k: r for k, r in runs.items() if r.get("fits")}
        if not fitting:
            out[topology] = {"error": f"no train-{topology}-b*.json in {aot} that fits ({len(runs)} found)"}
            continue
        name, best = max(fitting.items(), key=lambda kv: kv[1]["per_chip_batch"])
        per_host = chips * best["samples_per_s_per_chip"]
        out[topology] = {"file": name, "per_chip_batch": int(best["per_chip_batch"]),
                         "roofline_samples_per_s_per_chip": round(best["samples_per_s_per_chip"], 1),
                         "chips_per_host": chips, "samples_per_s_per_host": round(per_host, 1),
                         "cores_needed": {k: round(per_host / v, 1) if v else None for k, v in per_core.items()}}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--aot", default=str(ROOT / "bench" / "results" / "tpu-aot"),
                   help="the TPU compile reports (default bench/results/tpu-aot)")
    p.add_argument("--quick", action="store_true",
                   help="a few items per configuration and no worker process (starting workers takes seconds): checks "
                        "that it runs")
    args = p.parse_args(argv)
    batch_size, unique, items, split_count = (2, 1, 8, 4) if args.quick else (8, 4, 64, 48)
    workers = WORKERS[:1] if args.quick else WORKERS  # starting workers takes seconds; test_data runs them
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        sources, info = make_sources(Path(tmp), rng, unique, items)
        results = {}
        for name, source in sources.items():
            samples = 4 * batch_size if args.quick else SAMPLES[name.split("-", 1)[1]]
            row = {**info[name], "split": split(source, split_count)}
            for w in workers:
                row[f"workers_{w}"] = run_loader(source, w, batch_size, samples // batch_size)
            results[name] = row
            print(json.dumps({name: row}), file=sys.stderr, flush=True)
    per_core = {k: results[k][f"workers_{workers[-1]}"]["samples_per_cpu_s"] for k in ("shards-512", "shards-12MP")}
    result = {"host": {"cores": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()],
                       "note": "a shared 2-core machine: other jobs ran alongside; CPU seconds per sample are "
                               "less affected by them than samples/s"},
              "settings": {"batch_size": batch_size, "image_size": 512, "reference_size": 224, "jpeg_quality": QUALITY,
                           "stored_short_side": STORED_SHORT_SIDE, "quick": args.quick,
                           "cores_needed_at": f"samples_per_cpu_s with {workers[-1]} workers"},
              "sources": results,
              "demand": demand(Path(args.aot), per_core)}
    report(result, args.out)


if __name__ == "__main__":
    main()

"""Start-up time and memory of training from prepared shards at OpenImages scale, with 0, 1 and 2 grain workers.

    python bench/shard_startup.py                          # 2 M items in 2000 shards, under /tmp
    python bench/shard_startup.py --items 20000 --out x.json

Writes (once; a rerun reuses them) `--items` records of one small JPEG each into shards of `--per-shard`, then,
for each worker count, in a fresh process: opens `ShardSource`, builds the loader and takes its first batch.
Reports the seconds to open the source and to the first batch, the main process's resident memory added by
the source and the loader (over the same process after its imports), the workers' own memory (USS: pages no
other process shares), and the size of the pickled source that each worker receives. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from input_pipeline import report  # noqa: E402


def write(folder: Path, items: int, per_shard: int) -> float:
    import numpy as np
    from PIL import Image

    from pbe_jax.data import shards

    count = -(-items // per_shard)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shards.SETTINGS).write_text(json.dumps({"num_shards": count, "items": items}))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    done = shards.complete_shards(folder, count)
    t0 = time.perf_counter()
    for k in range(count):
        if k in done:
            continue
        n = min(per_shard, items - k * per_shard)
        records = (shards.encode(f"{k}/{i}", [[4, 4, 40, 30]], buf.getvalue()) for i in range(n))
        shards.write_shard(folder, k, count, records, {"images": n})
    return time.perf_counter() - t0


def measure(folder: str, workers: int) -> dict:
    import pickle

    import psutil

    import grain  # noqa: F401 -- imported first (make_loader imports it): its memory is not the source's

    from pbe_jax.data import loader, shards

    me = psutil.Process()
    base = me.memory_info().rss
    t0 = time.perf_counter()
    source = shards.ShardSource(folder)
    opened = time.perf_counter() - t0
    it = loader.make_loader(source, batch_size=8, seed=0, image_size=64, reference_size=32, worker_count=workers)
    next(it)
    first = time.perf_counter() - t0
    children = me.children(recursive=True)
    uss = [c.memory_full_info().uss for c in children]
    out = {"workers": workers, "items": len(source), "open_s": round(opened, 3), "first_batch_s": round(first, 3),
           "main_rss_added_mb": round((me.memory_info().rss - base) / 2 ** 20, 1),
           "worker_processes": len(children), "worker_uss_mb": [round(u / 2 ** 20, 1) for u in uss],
           "pickled_source_kb": round(len(pickle.dumps(source)) / 1024, 1)}
    it.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=2_000_000)
    p.add_argument("--per-shard", type=int, default=1000, help="records per shard (prepare's default)")
    p.add_argument("--workers", default="0,1,2", help="grain worker counts to measure")
    p.add_argument("--folder", default=None, help="where the shards go (default /tmp/pbe_shard_startup_<items>)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--measure", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return 0
    folder = Path(args.folder or f"/tmp/pbe_shard_startup_{args.items}")
    written_s = write(folder, args.items, args.per_shard)
    rows = []
    for w in (int(x) for x in args.workers.split(",")):
        r = subprocess.run([sys.executable, __file__, "--measure", str(folder), str(w)], capture_output=True,
                           text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    result = {"machine": f"{os.cpu_count()} cores (the dev machine, shared with other work)", "items": args.items,
              "shards": -(-args.items // args.per_shard), "write_s": round(written_s, 1), "runs": rows}
    report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What per-step progress costs: the web app's generation calls back to the host once per denoising step
(`PaintByExample(..., on_step=…)`, a `jax.debug.callback` in the sampler's loop); this times the same edit with
and without it, interleaved, on this machine's default device, and prints JSON.

    python bench/progress_callback.py                       # the shipped model at 64² and 256², batch 1 and 4
    python bench/progress_callback.py --pretrained DIR --sizes 512 --batches 1

The callback's cost is a fixed amount per step (a host round trip), so it matters most where a step is
shortest: the small shipped model on a fast device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default=str(ROOT / "checkpoints" / "synthetic"))
    p.add_argument("--sizes", default="64,256")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()

    import jax

    from pbe_jax import images, parallel
    from pbe_jax.pipeline import PaintByExample

    pipe = PaintByExample.from_pretrained(args.pretrained, mesh=parallel.data_mesh())
    example = ROOT / "examples" / "synthetic"
    source, mask, reference = (images.load_image(example / f"{n}.png") for n in ("source", "mask", "reference"))
    rows = []
    for size in map(int, args.sizes.split(",")):
        for batch in map(int, args.batches.split(",")):
            kw = dict(steps=args.steps, sampler=args.sampler, height=size, width=size, num_images_per_reference=batch)
            calls = []
            variants = {"plain": {}, "per_step": {"on_step": lambda done, total: calls.append(done)}}
            times = {name: [] for name in variants}
            for extra in variants.values():  # compile both programs first
                pipe(source, mask, reference, **kw, **extra)
            for _ in range(args.reps):
                for name, extra in variants.items():
                    t0 = time.perf_counter()
                    pipe(source, mask, reference, **kw, **extra)
                    times[name].append(time.perf_counter() - t0)
            plain, per_step = (statistics.median(times[k]) for k in ("plain", "per_step"))
            spread = statistics.median(abs(a - b) for a, b in zip(times["plain"][1:], times["plain"][:-1]))
            rows.append({"size": size, "batch": batch, "steps": args.steps, "plain_s": round(plain, 4),
                         "per_step_s": round(per_step, 4), "overhead_ms_per_step": round(
                             (per_step - plain) / args.steps * 1e3, 3),
                         "overhead_fraction": round(per_step / plain - 1, 4),
                         "run_to_run_spread_s": round(spread, 4),
                         "min_s": {k: round(min(v), 4) for k, v in times.items()},
                         "callbacks_per_call": len(calls) / (args.reps + 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                      "model": args.pretrained, "sampler": args.sampler, "reps": args.reps, "rows": rows}, indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())

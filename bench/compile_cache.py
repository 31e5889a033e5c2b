"""Time to the first image of `python sample.py`, without and with JAX's persistent compilation cache: the
same command run twice against a fresh cache folder, from launch until the edit's file exists. Prints JSON.

    python bench/compile_cache.py                      # the shipped model and example (CPU)
    python bench/compile_cache.py --reps 3 -- --pretrained DIR --size 512 --dtype bfloat16   # SD size (GPU)

Target: the second run reaches its first image in at most half the first run's time.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_image_seconds(args: list[str], cache: str, out: Path) -> float:
    """Launch sample.py and return the seconds until its output file appears (the run is then left to finish)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PERSISTENT_CACHE", "JAX_COMPILATION_CACHE"))}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args, "--compile-cache", cache, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    while not out.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"sample.py failed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    proc.wait()
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="pairs of runs, each pair with a fresh cache (default 3)")
    p.add_argument("sample_args", nargs="*", help="arguments for sample.py (after --)")
    args = p.parse_args()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="pbe_jax_cache_bench_") as tmp:
        for rep in range(args.reps):
            cache = os.path.join(tmp, f"cache{rep}")
            first = first_image_seconds(args.sample_args, cache, Path(tmp) / f"first{rep}.png")
            second = first_image_seconds(args.sample_args, cache, Path(tmp) / f"second{rep}.png")
            pairs.append({"first_s": round(first, 2), "second_s": round(second, 2), "ratio": round(second / first, 3)})
            print(json.dumps(pairs[-1]), file=sys.stderr, flush=True)
    ratios = sorted(p["ratio"] for p in pairs)
    print(json.dumps({"sample_args": args.sample_args, "pairs": pairs, "median_ratio": ratios[len(ratios) // 2],
                      "target_ratio": 0.5, "meets_target": ratios[len(ratios) // 2] <= 0.5}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

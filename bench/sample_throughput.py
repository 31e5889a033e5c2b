"""Sampling throughput: the JAX pipeline against diffusers' PaintByExamplePipeline, measured in one run.

    python bench/sample_throughput.py                 # GPU: SD-1.4 size, 512², bf16; CPU: tiny config
    python bench/sample_throughput.py --config tiny --batches 1,4 --samplers dpmpp_2m:20

Prints one JSON object: for each batch size, images/s and seconds per call for both frameworks and their
ratio, the first call's time (compilation included) and peak device memory — for the paper's PLMS at
`--steps` (50) and, in the same run, for each of `--samplers` at its own step count (by default DPM-Solver++ 2M
and UniPC at 20 steps, sample.py's setting; bench/quality_steps.py measured no count up to 25 at which they
are as close to their converged result as PLMS-50 is to its own, see docs/sampling.md), with each one's speed-up
over PLMS. The PyTorch pipeline runs in a
subprocess (its own memory; JAX preallocates) on the same machine right after. Weights are random: at full
size drawn with numpy on the host (a jitted random init of 860 M parameters compiles for minutes).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def inputs(batch: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    m = np.zeros((size, size), np.uint8)
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    ref = [rng.integers(0, 256, (300, 260, 3), dtype=np.uint8) for _ in range(batch)]
    return img, [m] * batch, ref


def time_calls(fn, reps: int):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return first, (time.perf_counter() - t0) / reps


def random_jax_models(policy, seed: int = 0, *, components=("unet", "vae", "image_encoder"), device=None):
    """Full-size networks with numpy-drawn weights (N(0, 0.02²), norm scales 1), placed without running any
    random init (a jitted init of 860 M parameters compiles for minutes). Each parameter is drawn from its
    own seed on a pool of host threads (numpy releases the GIL while filling), so the 1.3 B numbers take
    seconds. `device` is where the arrays go (default: JAX's default device); `components` picks networks
    (the rest are None)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from pbe_jax.convert import PaintByExampleModels, mapping
    from pbe_jax.models import (AutoencoderKL, CLIPVisionConfig, PaintByExampleImageEncoder, UNet2DConditionModel,
                                UNetConfig, VAEConfig)

    def draw(key: tuple, path, shape) -> np.ndarray:
        if path[-1] == "scale":
            return np.ones(shape, np.float32)
        a = np.random.default_rng([seed, *key]).standard_normal(shape, np.float32)
        a *= 0.02
        return a

    nets = dict.fromkeys(("unet", "vae", "image_encoder"))
    specs = (("unet", UNet2DConditionModel, UNetConfig()), ("vae", AutoencoderKL, VAEConfig()),
             ("image_encoder", PaintByExampleImageEncoder, CLIPVisionConfig()))
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        for k, (name, cls, cfg) in enumerate(specs):
            if name not in components:
                continue
            _, flat = mapping.abstract_model(cls, cfg, policy)
            paths = list(flat)
            arrays = pool.map(lambda ip: draw((k, ip[0]), ip[1], flat[ip[1]].get_value().shape), enumerate(paths))
            params = dict(zip(paths, arrays))
            with jax.default_device(device or jax.devices()[0]):
                nets[name] = mapping.materialize(cls, cfg, policy, params, f"random {name}")
    return PaintByExampleModels(**nets)


def runs(args) -> list[tuple[str, str, int]]:
    """(key prefix, sampler, steps) to measure: PLMS at args.steps first, its rows keyed `batch<B>`, then
    args.samplers, if any, keyed `<sampler>_<steps>_batch<B>`."""
    return [("", "plms", args.steps), *((f"{s}_{k}_", s, k) for s, k in getattr(args, "samplers", []))]


def run_jax(args, emit=None) -> dict:
    """The JAX pipeline at each sampler and batch size of args (keys as `runs` makes them); `emit(key, row)`
    sees each row as it is measured."""
    import jax
    import jax.numpy as jnp

    from pbe_jax.convert import load
    from pbe_jax.models import Policy
    from pbe_jax.pipeline import PaintByExample, default_dtype

    policy = Policy(dtype=jnp.dtype(default_dtype()), attention_backend=args.attention)
    t0 = time.perf_counter()
    models = random_jax_models(policy) if args.config == "sd14" else load(args.folder, policy=policy)
    pipe = PaintByExample(models)
    out = {"device": jax.devices()[0].device_kind, "dtype": str(policy.dtype),
           "load_s": round(time.perf_counter() - t0, 1)}
    for prefix, sampler, steps in runs(args):
        for b in args.batch_sizes:
            img, m, ref = inputs(b, args.size)
            first, dt = time_calls(lambda: pipe(img, m, ref, steps=steps, guidance_scale=5.0, sampler=sampler,
                                                height=args.size, width=args.size), args.reps)
            stats = jax.devices()[0].memory_stats() or {}
            row = {"s_per_call": round(dt, 4), "img_per_s": round(b / dt, 3), "first_call_s": round(first, 1),
                   "peak_GiB": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None}
            out[f"{prefix}batch{b}"] = row
            print(json.dumps({"jax": {f"{prefix}batch{b}": row}}), file=sys.stderr, flush=True)
            if emit is not None:
                emit(f"{prefix}batch{b}", row)
    return out


def run_torch(args, emit=None) -> dict:
    """diffusers' pipeline at each sampler and batch size of args (fp16 on GPU; the samplers' diffusers
    schedulers swapped in with `from_config`); `emit(key, row)` as for run_jax."""
    import torch

    from pbe_jax.parity import reference

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    if args.config == "sd14":
        from diffusers import PaintByExamplePipeline, PNDMScheduler
        from transformers import CLIPImageProcessor

        nets = reference.build_full_size()
        pipe = PaintByExamplePipeline(**nets, scheduler=PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
            set_alpha_to_one=False, steps_offset=1), safety_checker=None, requires_safety_checker=False,
            feature_extractor=CLIPImageProcessor(crop_size={"height": 224, "width": 224},
                                                 size={"shortest_edge": 224}))
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = reference.torch_pipeline(args.folder)
    pipe.to("cuda" if cuda else "cpu", dtype)
    from PIL import Image

    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "dtype": str(dtype),
           "threads": torch.get_num_threads()}
    plms = pipe.scheduler
    for prefix, sampler, steps in runs(args):
        pipe.scheduler = reference.swap_scheduler(plms, sampler)
        for b in args.batch_sizes:
            img, m, ref = inputs(b, args.size)
            pil = lambda xs: [Image.fromarray(x) for x in xs]  # noqa: E731
            kw = dict(image=pil(img), mask_image=pil(m), example_image=pil(ref), num_inference_steps=steps,
                      guidance_scale=5.0, output_type="np", height=args.size, width=args.size)

            def call():
                with torch.no_grad():
                    pipe(**kw)
                if cuda:
                    torch.cuda.synchronize()

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            first, dt = time_calls(call, args.reps)
            row = {"s_per_call": round(dt, 4), "img_per_s": round(b / dt, 3), "first_call_s": round(first, 1),
                   "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
            out[f"{prefix}batch{b}"] = row
            if emit is not None:
                emit(f"{prefix}batch{b}", row)
    return out


def sampler_steps(text: str) -> list[tuple[str, int]]:
    """"dpmpp_2m:20,unipc:15" → [("dpmpp_2m", 20), ("unipc", 15)]; "" → []."""
    from pbe_jax.diffusion import SAMPLERS

    out = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"{item!r}: expected SAMPLER:STEPS with SAMPLER one of "
                                             f"{', '.join(SAMPLERS)} and STEPS ≥ 1")
        out.append((name, int(steps)))
    return out


DEFAULT_SAMPLERS = "dpmpp_2m:20,unipc:20"


def speedups(result: dict, args) -> dict:
    """images/s of each sampler over PLMS's, per framework, sampler and batch size."""
    return {fw: {f"{prefix}batch{b}": round(result[fw][f"{prefix}batch{b}"]["img_per_s"]
                                            / result[fw][f"batch{b}"]["img_per_s"], 2)
                 for prefix, _, _ in runs(args)[1:] for b in args.batch_sizes}
            for fw in ("jax", "torch") if fw in result}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sd14", "tiny"], default=None, help="default: sd14 on GPU, tiny on CPU")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16 on GPU, 1,4 on CPU)")
    p.add_argument("--steps", type=int, default=50, help="PLMS steps of the baseline (default 50, the paper's)")
    p.add_argument("--samplers", type=sampler_steps, default=DEFAULT_SAMPLERS,
                   help="SAMPLER:STEPS,... measured beside PLMS in the same run (default %(default)s, sample.py's "
                        "setting; '' for PLMS alone)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import jax

    gpu = jax.default_backend() == "gpu"
    args.config = args.config or ("sd14" if gpu else "tiny")
    args.batch_sizes = [int(b) for b in (args.batches or ("1,16" if gpu else "1,4")).split(",")]
    args.size = 512 if args.config == "sd14" else 32
    if args.torch_only:
        print("RESULT " + json.dumps(run_torch(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.config == "tiny" and args.folder is None:
            from pbe_jax.parity import reference

            args.folder = str(reference.save_tiny(tmp, "sd"))
        result = {"config": args.config, "size": args.size, "steps": args.steps, "guidance": 5.0,
                  "jax": run_jax(args)}
        if not args.no_torch:
            cmd = [sys.executable, __file__, "--torch-only", "--config", args.config, "--steps", str(args.steps),
                   "--reps", str(args.reps), "--batches", ",".join(map(str, args.batch_sizes)),
                   "--samplers", ",".join(f"{s}:{k}" for s, k in args.samplers)]
            if args.folder:
                cmd += ["--folder", args.folder]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                             "JAX_PLATFORMS": "cpu"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"the PyTorch run failed:\n{proc.stderr[-3000:]}")
            result["torch"] = json.loads(line[0][len("RESULT "):])
            result["ratio_img_per_s"] = {f"batch{b}": round(result["jax"][f"batch{b}"]["img_per_s"] /
                                                             result["torch"][f"batch{b}"]["img_per_s"], 2)
                                         for b in args.batch_sizes}
        if args.samplers:
            result["speedup_over_plms"] = speedups(result, args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Training-step throughput: the JAX step against the PyTorch reference step, measured in one run.

    python bench/train_throughput.py                    # GPU: SD-1.4 size, 512²; CPU: the tiny config
    python bench/train_throughput.py --batches 16,32 --remat both

The JAX step is the real one (`pbe_jax.train.step`): on-device masks and reference augmentation, two VAE
encodes, the CLIP tower and bottleneck, UNet forward and backward, AdamW; "unet_only" rows time the UNet
forward, backward and AdamW on ready latents. The PyTorch reference (diffusers UNet, 2 VAE encodes, CLIP, AdamW,
bf16 autocast on GPU; no augmentation) runs in a subprocess afterwards. Prints one JSON object: samples/s,
step time, peak memory, compile time of the first step, and MFU from XLA's FLOP count where the device's
peak is known.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, vendor figures


def batch(b: int, size: int, ref: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    box = np.array([size * 0.3, size * 0.3, size * 0.7, size * 0.7], np.float32)
    return {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
            "reference": rng.integers(0, 256, (b, ref, ref, 3), dtype=np.uint8),
            "box": np.tile(box, (b, 1)), "box_ext": np.tile(box + [-20, -20, 20, 20], (b, 1)).clip(0, size)}


def timed(fn, state, args, reps):
    """(first call's seconds, compilation included unless already compiled; mean seconds per call after it;
    the last call's output)."""
    import jax

    t0 = time.perf_counter()
    state, out = fn(state, *args)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        state, out = fn(state, *args)
    jax.block_until_ready(out)
    return first, (time.perf_counter() - t0) / reps, out


def run_jax(args) -> dict:
    import jax

    from pbe_jax.train.trainer import models_of

    dev = jax.devices()[0]
    out = {"device": dev.device_kind, "peak_tflops": peak_tflops(dev)}
    full = full_size_models() if args.config == "sd14" else None  # drawn once, reused by every row
    for remat in args.remat_options:
        for b in args.batch_sizes:
            cfg = step_config(args.config, b, remat)
            key = f"bs{b}_remat{int(remat)}"
            try:
                out[key] = jax_step(cfg, full or models_of(cfg), args.reps)
            except Exception as e:  # out of memory at a size is a result, not a crash
                out[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(json.dumps({"jax": {key: out[key]}}), file=sys.stderr, flush=True)
            if not remat and isinstance(out[key], dict):  # the UNet-only step where the whole step ran
                out[f"unet_only_bs{b}"] = unet_only((full or models_of(cfg)).unet, cfg, b, args.reps)
    return out


def peak_tflops(dev) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in dev.device_kind), None)


def step_config(config: str, b: int, remat: bool, *extra: str, size: int | None = None):
    """The named config (sd14: full size, random init) at batch b, with remat on or off (and images of
    `size`² instead of the config's)."""
    from pbe_jax.train import config as config_lib

    overrides = [f"data.batch_size={b}", f"model.remat={remat}", "optim.warmup_steps=1", *extra]
    if config == "sd14":
        overrides.append("model.init=scratch")
    if size:
        overrides.append(f"data.image_size={size}")
    return config_lib.override(config_lib.load(config), overrides)


def full_size_models(components=("unet", "vae", "image_encoder")):
    """SD-1.4-size networks with random weights, kept on the host (the CPU device): the trainer then places
    only its own state on the accelerator, so peak device memory is the step's alone."""
    import jax
    import jax.numpy as jnp

    from pbe_jax.models import Policy
    from sample_throughput import random_jax_models

    return random_jax_models(Policy(dtype=jnp.bfloat16), components=components, device=jax.devices("cpu")[0])


def jax_step(cfg, models, reps: int) -> dict:
    """The real training step (`build_trainer`) at cfg's batch on the first device: compile time (AOT),
    step time, samples/s, TFLOP/s and MFU from XLA's FLOP count, the compiled program's memory (arguments,
    temporaries, outputs not aliased to donated inputs) and the device's peak memory."""
    import jax

    from pbe_jax import parallel
    from pbe_jax.train.trainer import build_trainer

    dev = jax.devices()[0]
    with jax.default_device(jax.devices("cpu")[0]):  # state made on the host, then placed on `dev`
        trainer = build_trainer(cfg, models=models, mesh=parallel.make_mesh(devices=[dev]))
    del models  # a caller that passed its only reference frees the float32 frozen towers here
    b = cfg.data.batch_size
    x = parallel.global_batch(batch(b, cfg.data.image_size, cfg.data.reference_size), trainer.mesh)
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(trainer.state, x).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost or {}).get("flops")
    _, dt, metrics = timed(compiled, trainer.state, (x,), reps)  # the executable compiled above
    stats = dev.memory_stats() or {}
    peak = peak_tflops(dev)
    row = {"step_s": round(dt, 4), "samples_per_s": round(b / dt, 2), "compile_s": round(compile_s, 1),
           "loss": float(metrics["loss"]), "peak_GiB": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None,
           "compiled_GiB": round(compiled_bytes(compiled) / 2**30, 2),
           "tflops": round(flops / dt / 1e12, 1) if flops else None}
    if flops and peak:
        row["mfu"] = round(flops / dt / 1e12 / peak, 3)
    return row


def compiled_bytes(compiled) -> int:
    """What a compiled program needs on its device: arguments + temporaries + outputs that do not reuse a
    donated argument's buffer (XLA's buffer assignment, before any allocator overhead)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def unet_only(unet, cfg, b: int, reps: int) -> dict:
    """UNet forward, backward and AdamW on ready latents (no VAE, no CLIP): the anchor's "UNet only" step."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pbe_jax.models import VAEConfig

    dev = jax.devices()[0]
    graphdef, params = nnx.split(unet)
    opt = optax.adamw(1e-5)
    vae = VAEConfig.from_dict(cfg.model.vae, "model.vae")
    lat = cfg.data.image_size // 2 ** (len(vae.block_out_channels) - 1)
    k = jax.random.key(0)
    x = jax.random.normal(k, (b, lat, lat, 9))
    c = jax.random.normal(k, (b, 1, unet.config.cross_attention_dim[0]))
    n = jax.random.normal(k, (b, lat, lat, 4))
    t = jnp.full((b,), 500)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, c).astype(jnp.float32) - n))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, _):
        p, o = state
        value, g = jax.value_and_grad(loss)(p)
        u, o = opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), value

    # Committed to `dev` as a whole, so that the step's outputs fed back in match its inputs (no recompile).
    state = jax.device_put((params, opt.init(params)), dev)
    first, dt, _ = timed(step, state, (None,), reps)
    stats = dev.memory_stats() or {}
    return {"step_s": round(dt, 4), "samples_per_s": round(b / dt, 2), "first_step_s": round(first, 1),
            "peak_GiB": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2) or None}


def run_torch(args, emit=None) -> dict:
    """The PyTorch reference step for every (remat, batch) of args; `emit(key, row)` sees each row as it
    is measured."""
    import torch

    from pbe_jax.parity import reference

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if args.config == "sd14":
        nets = reference.build_full_size()
        size, ref = getattr(args, "size", 512), 224
    else:
        nets = reference.load_torch(args.folder)
        size, ref = 64, 32
    unet, vae, enc = (nets[k].to(dev) for k in ("unet", "vae", "image_encoder"))
    trainable = list(unet.parameters()) + list(enc.mapper.parameters()) + list(enc.final_layer_norm.parameters()) \
        + list(enc.proj_out.parameters()) + [enc.uncond_vector]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device=dev) ** 2, 0)
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu"}
    rows = getattr(args, "rows", None) or [(b, r) for r in args.remat_options for b in args.batch_sizes]
    for b, remat in rows:
        unet.enable_gradient_checkpointing() if remat else unet.disable_gradient_checkpointing()

        def step(b=b):
            gt = torch.randn(b, 3, size, size, device=dev)
            refi = torch.randn(b, 3, ref, ref, device=dev)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
                with torch.no_grad():
                    z = vae.encode(gt).latent_dist.sample() * 0.18215
                    zm = vae.encode(gt * 0.5).latent_dist.sample() * 0.18215
                c = enc(refi)
                t = torch.randint(0, 1000, (b,), device=dev)
                n = torch.randn_like(z)
                a = alphas[t].view(-1, 1, 1, 1)
                m = torch.ones(b, 1, *z.shape[2:], device=dev)
                eps = unet(torch.cat([a.sqrt() * z + (1 - a).sqrt() * n, zm, m], 1), t,
                           encoder_hidden_states=c).sample
                loss = torch.nn.functional.mse_loss(eps.float(), n)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()

        key = f"bs{b}_remat{int(remat)}"
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.reps):
                step()
            dt = (time.perf_counter() - t0) / args.reps
            out[key] = {"step_s": round(dt, 4), "samples_per_s": round(b / dt, 2), "first_step_s": round(first, 1),
                        "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        except torch.OutOfMemoryError:
            out[key] = "OutOfMemoryError"
            torch.cuda.empty_cache()
        if emit is not None:
            emit(key, out[key])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["sd14", "tiny"], default=None, help="default: sd14 on GPU, tiny on CPU")
    p.add_argument("--batches", default=None, help="default 16,32 on GPU, 8 on CPU")
    p.add_argument("--remat", choices=["off", "on", "both"], default="both")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import jax

    gpu = jax.default_backend() == "gpu"
    args.config = args.config or ("sd14" if gpu else "tiny")
    args.batch_sizes = [int(b) for b in (args.batches or ("16,32" if gpu else "8")).split(",")]
    args.remat_options = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    if args.torch_only:
        print("RESULT " + json.dumps(run_torch(args)))
        return
    result = {"config": args.config, "jax": run_jax(args)}
    if not args.no_torch:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--torch-only", "--config", args.config, "--reps", str(args.reps),
                   "--batches", ",".join(map(str, args.batch_sizes)), "--remat", args.remat]
            if args.config == "tiny":
                cmd += ["--folder", str(_tiny_torch_folder(tmp))]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"the PyTorch run failed:\n{proc.stderr[-3000:]}")
            result["torch"] = json.loads(line[0][len("RESULT "):])
        result["ratio_samples_per_s"] = {
            k: round(v["samples_per_s"] / result["torch"][k]["samples_per_s"], 2)
            for k, v in result["jax"].items() if isinstance(v, dict) and isinstance(result["torch"].get(k), dict)}
    print(json.dumps(result, indent=1))


def _tiny_torch_folder(tmp: str) -> Path:
    """The tiny config's networks as a diffusers folder, so PyTorch steps the same architecture."""
    from pbe_jax import convert
    from pbe_jax.train import config as config_lib
    from pbe_jax.train.trainer import models_of

    return convert.save(models_of(config_lib.load("tiny")), Path(tmp) / "tiny", format="diffusers")


if __name__ == "__main__":
    main()

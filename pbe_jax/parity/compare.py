"""Parity harness: the PyTorch reference (diffusers/transformers) and this JAX port on the same weights
and inputs, per component (image encoder, VAE encode, VAE decode, UNet).

    python -m pbe_jax.parity                      # a tiny random pipeline built here (offline)
    python -m pbe_jax.parity --diffusers DIR      # a diffusers Paint-by-Example folder
    python -m pbe_jax.parity --random sd14        # random weights at full SD-1.4 size (GPU advised)
    python -m pbe_jax.parity --end-to-end         # also the whole pipeline against PaintByExamplePipeline
    python -m pbe_jax.parity --train --steps 100 --png curve.png   # the training step (pbe_jax.parity.train)
    python -m pbe_jax.parity --train --random sd14 --size 256 --batch 1 --grads-only   # its gradients, full size

Errors are max |jax − torch| and that divided by max |torch| (the output's scale). In float32 the check is
error ≤ tolerance × scale. With --dtype bfloat16 the port runs in bf16 against the float32 reference and
the check is that its error is at most twice PyTorch's own bf16 error on the same inputs.
End to end, both pipelines start from the same initial latents and encode the masked image with the
posterior mean (the frameworks cannot draw the same noise); the check is max |Δ| ≤ 2 on the uint8 output,
for PLMS, DDIM, DPM-Solver++ 2M and UniPC. Exit status 1 when any check fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

COMPONENTS = ("image_encoder", "vae_encode", "vae_decode", "unet")


def jitted(module, fn: Callable) -> Callable:
    """`fn(module, *args)` jitted, with the module split once at the boundary and merged inside."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    f = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: f(state, *args)


def make_inputs(torch_modules: dict[str, Any], batch: int, image_size: int, seed: int) -> dict[str, np.ndarray]:
    """Random NCHW inputs (the reference's layout) for every component."""
    rng = np.random.default_rng(seed)
    enc_cfg, unet_cfg = torch_modules["image_encoder"].config, torch_modules["unet"].config
    vae_cfg = torch_modules["vae"].config
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)
    latent = image_size // f
    return {
        "reference": rng.standard_normal((batch, 3, enc_cfg.image_size, enc_cfg.image_size), np.float32),
        "image": rng.uniform(-1, 1, (batch, 3, image_size, image_size)).astype(np.float32),
        "latents": rng.standard_normal((batch, vae_cfg.latent_channels, latent, latent), np.float32),
        "sample": rng.standard_normal((batch, unet_cfg.in_channels, latent, latent), np.float32),
        "timesteps": np.linspace(981, 1, batch).round().astype(np.int64),
        "context": rng.standard_normal((batch, 1, unet_cfg.cross_attention_dim), np.float32),
    }


def run_torch(modules: dict[str, Any], x: dict[str, np.ndarray], dtype: str = "float32") -> dict[str, np.ndarray]:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t = {k: torch.from_numpy(v).to(device) for k, v in x.items()}
    t = {k: (v.to(tdtype) if v.is_floating_point() else v) for k, v in t.items()}
    out = {}
    with torch.no_grad():
        for m in modules.values():
            m.to(device, tdtype)
        out["image_encoder"] = modules["image_encoder"](t["reference"])
        post = modules["vae"].encode(t["image"]).latent_dist
        out["vae_encode"] = torch.cat([post.mean, post.logvar], 1)
        out["vae_decode"] = modules["vae"].decode(t["latents"]).sample
        out["unet"] = modules["unet"](t["sample"], t["timesteps"], encoder_hidden_states=t["context"]).sample
        for m in modules.values():
            m.to("cpu", torch.float32)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def run_jax(models, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax.numpy as jnp

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    nchw = lambda a: np.asarray(a, np.float32).transpose(0, 3, 1, 2)  # noqa: E731
    encode = jitted(models.vae, lambda m, img: jnp.concatenate(m.encode(img)[:2], axis=-1))
    return {
        "image_encoder": np.asarray(jitted(models.image_encoder, lambda m, r: m(r))(nhwc(x["reference"])),
                                    np.float32),
        "vae_encode": nchw(encode(nhwc(x["image"]))),
        "vae_decode": nchw(jitted(models.vae, lambda m, z: m.decode(z))(nhwc(x["latents"]))),
        "unet": nchw(jitted(models.unet, lambda m, s, t, c: m(s, t, c))(
            nhwc(x["sample"]), jnp.asarray(x["timesteps"]), jnp.asarray(x["context"]))),
    }


def errors(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    if ours.shape != ref.shape:
        raise AssertionError(f"shape {ours.shape} from JAX, {ref.shape} from PyTorch")
    err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    return {"max_abs": err, "scale": scale, "rel": err / max(scale, 1e-30)}


def compare(torch_modules: dict[str, Any], models, *, dtype: str = "float32", batch: int = 2,
            image_size: int | None = None, tolerance: float = 1e-4, seed: int = 0) -> list[dict]:
    """One row per component: errors of the JAX port against the float32 PyTorch reference, and pass/fail."""
    image_size = image_size or torch_modules["vae"].config.sample_size
    x = make_inputs(torch_modules, batch, image_size, seed)
    truth = run_torch(torch_modules, x)
    ours = run_jax(models, x)
    yardstick = run_torch(torch_modules, x, dtype) if dtype != "float32" else None
    rows = []
    for name in COMPONENTS:
        row = {"component": name, "shape": list(truth[name].shape), "dtype": dtype,
               **errors(ours[name], truth[name])}
        if yardstick is None:
            row["limit"] = tolerance * row["scale"]
        else:
            row["torch_max_abs"] = errors(yardstick[name], truth[name])["max_abs"]
            row["limit"] = 2 * row["torch_max_abs"]
        row["ok"] = bool(row["max_abs"] <= row["limit"])
        rows.append(row)
    return rows


def compare_end_to_end(folder, *, batch: int = 2, steps: int = 10, guidance_scale: float = 5.0,
                       seed: int = 0, policy=None) -> list[dict]:
    """The JAX pipeline and diffusers' PaintByExamplePipeline on the same random images and initial latents."""
    from pbe_jax.convert import load
    from pbe_jax.diffusion import SAMPLERS
    from pbe_jax.parity import reference
    from pbe_jax.pipeline import PaintByExample

    ours = PaintByExample(load(folder, policy=policy))
    size = ours.default_size
    rng = np.random.default_rng(seed)
    img = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    masks = []
    for i in range(batch):
        m = np.zeros((size, size), np.uint8)
        m[size // 4: 3 * size // 4, size // 5 + i: 3 * size // 5 + i] = 255
        masks.append(m)
    refs = [rng.integers(0, 256, (size + 7 * i, size - 5 * i, 3), dtype=np.uint8) for i in range(batch)]
    f = ours.vae_factor
    latents = rng.standard_normal((batch, ours.models.vae.config.latent_channels, size // f, size // f),
                                  np.float32)
    rows = []
    for sampler in SAMPLERS:
        theirs = reference.run_torch_pipeline(reference.torch_pipeline(folder, sampler), img, masks, refs, latents,
                                              steps, guidance_scale)
        mine = ours(img, masks, refs, steps=steps, guidance_scale=guidance_scale, latents=latents,
                    sampler=sampler, height=size, width=size, sample_posterior=False)
        err = int(np.abs(mine.astype(int) - theirs.astype(int)).max())
        rows.append({"component": f"pipeline/{sampler}", "shape": list(mine.shape), "dtype": "uint8",
                     "max_abs": float(err), "scale": 255.0, "rel": err / 255.0, "limit": 2.0, "ok": err <= 2})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'component':<18}{'shape':<22}{'max abs err':>13}{'scale':>11}{'rel err':>11}{'limit':>11}  ok"
    lines = [head]
    for r in rows:
        extra = f"  (PyTorch {r['dtype']}: {r['torch_max_abs']:.3g})" if "torch_max_abs" in r else ""
        lines.append(f"{r['component']:<18}{str(tuple(r['shape'])):<22}{r['max_abs']:>13.3e}{r['scale']:>11.3g}"
                     f"{r['rel']:>11.2e}{r['limit']:>11.3g}  {'yes' if r['ok'] else 'NO'}{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--diffusers", metavar="DIR", help="a diffusers Paint-by-Example folder")
    src.add_argument("--random", choices=["sd", "tiny", "alt", "sd14"], default="sd",
                     help="without --diffusers: random weights of a tiny configuration (sd, alt) or full "
                          "SD-1.4 size (sd14); default sd")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the JAX port (the reference is always float32)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the VAE's sample_size)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="float32 limit, relative to the output scale")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto", help="JAX attention backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end-to-end", action="store_true",
                   help="also compare whole pipelines (all four samplers; needs a folder: --diffusers or a tiny --random)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps for --end-to-end (default 10); training steps for --train (default 1: "
                        "one step; more: also the two loss curves)")
    p.add_argument("--train", action="store_true",
                   help="compare the training step with the PyTorch reference of the original's (loss, every "
                        "trainable gradient, the AdamW update; with --steps N the loss curves)")
    p.add_argument("--lr", type=float, default=1e-4, help="--train: peak learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="--train: linear warm-up steps from 1e-6 × lr, as the original (default 0: none, so that "
                        "the first update is large enough to compare in float32)")
    p.add_argument("--clip-norm", type=float, default=0.0, help="--train: global-norm clipping (default 0: none)")
    p.add_argument("--grads-only", action="store_true",
                   help="--train: one step's loss and gradients only, with no optimiser state on either side and "
                        "PyTorch's networks released before JAX's step runs (what fits --random sd14 on a 24 GB host)")
    p.add_argument("--png", metavar="FILE", help="--train --steps N: draw both loss curves to FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from pbe_jax.convert import load
    from pbe_jax.models import Policy
    from pbe_jax.parity import reference

    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
        reference.disable_tf32()
    policy = Policy(dtype=jnp.dtype(args.dtype), attention_backend=args.attention)
    if args.random == "tiny":
        args.random = "sd"
    if args.end_to_end and args.random == "sd14" and not args.diffusers:
        p.error("--end-to-end needs a folder: use --diffusers DIR or a tiny --random configuration")
    if args.train and (args.end_to_end or args.dtype != "float32"):
        p.error("--train compares in float32 and on its own (without --end-to-end)")
    if args.grads_only and (not args.train or (args.steps or 1) > 1):
        p.error("--grads-only is one training step: use it with --train and without --steps N > 1")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.diffusers:
            source, folder = args.diffusers, args.diffusers
            torch_modules = reference.load_torch(folder)
            models = load(folder, policy=policy)
        elif args.random == "sd14":
            source, folder = "random SD-1.4-size weights", None
            torch_modules = reference.build_full_size()
            models = reference.to_jax(torch_modules, policy)
        else:
            source, folder = f"tiny random pipeline '{args.random}'", reference.save_tiny(tmp, args.random, seed=args.seed)
            torch_modules = reference.load_torch(folder)
            models = load(folder, policy=policy)
        if args.train:
            return train_parity(args, torch_modules, models, source, t0)
        rows = compare(torch_modules, models, dtype=args.dtype, batch=args.batch, image_size=args.size,
                       tolerance=args.tolerance, seed=args.seed)
        if args.end_to_end:
            rows += compare_end_to_end(folder, batch=args.batch, steps=args.steps or 10, seed=args.seed,
                                       policy=policy)
    ok = all(r["ok"] for r in rows)
    info = {"source": source, "device": str(jax.devices()[0].device_kind), "dtype": args.dtype,
            "seconds": round(time.perf_counter() - t0, 1), "ok": ok}
    if args.json:
        print(json.dumps({**info, "components": rows}))
    else:
        print(f"{source} on {info['device']}, JAX compute {args.dtype}")
        print(format_rows(rows))
        print("PASS" if ok else "FAIL", f"({info['seconds']} s)")
    return 0 if ok else 1


def train_parity(args, torch_modules, models, source: str, t0: float) -> int:
    """--train: the training step against the reference (pbe_jax.parity.train); exit status 1 above tolerance."""
    import jax
    from tqdm import tqdm

    from pbe_jax.parity import train

    steps = args.steps or 1
    settings = train.Settings(batch=args.batch, lr=args.lr, warmup_steps=args.warmup_steps,
                              clip_norm=args.clip_norm, seed=args.seed)
    if args.grads_only:
        report = train.gradients_only(torch_modules, models, settings=settings, image_size=args.size)
    else:
        with tqdm(total=steps, desc="training steps (both frameworks)", disable=steps < 5 or args.json) as bar:
            report = train.run(torch_modules, models, settings=settings, steps=steps, image_size=args.size,
                               progress=lambda i, n: bar.update(1))
    report.update(source=source, device=str(jax.devices()[0].device_kind), seconds=round(time.perf_counter() - t0, 1))
    if args.png and "curve" in report:
        train.plot(report, args.png)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{source} on {report['device']}: the training step, float32, against the original's in PyTorch")
        print(train.format_report(report))
        if args.png and "curve" in report:
            print(f"loss curves drawn to {args.png}")
        print("PASS" if report["ok"] else "FAIL", f"({report['seconds']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

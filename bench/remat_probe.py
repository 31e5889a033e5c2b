"""Does per-block rematerialisation (model.remat) lower the training step's compiled memory?

    python bench/remat_probe.py memory --target h100-1 --size 512 --batches 1,8,16 [--remat both]
    python bench/remat_probe.py memory --target cpu --size 256 --batches 2
    python bench/remat_probe.py check                  # tiny config, CPU: loss and grads, remat off vs on

`memory`: the real training step (`abstract_trainer`, shapes only, SD-1.4 sizes from scratch, bf16 compute and
frozen towers, attention=auto) lowered and compiled for one device of a GPU or TPU topology (compile-only, from
this CPU host: pbe_jax.aot's targets) or for this CPU; one JSON line per (batch, remat)
with `compiled.memory_analysis()`'s argument / temporary / output bytes and the compile time.
`check`: the tiny config's loss and gradients with remat off and on, same state and batch; reports whether they
are bit-identical and the largest difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
GIB = 2**30


def devices(target: str):
    """One device of `target`: this CPU, or any topology `python -m pbe_jax.aot` names (h100-1, l4-1, v5e-1: a
    compile-only device, the [gpu] or [tpu] extra)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if target == "cpu":
        return jax.devices("cpu")[:1]
    from pbe_jax import aot

    aot.prepare_host()
    return aot.topology(target).devices[:1]


def step_config(b: int, remat: bool, size: int, extra=()):
    from pbe_jax.train import config as config_lib

    return config_lib.override(config_lib.load("sd14"), [
        "model.init=scratch", f"data.image_size={size}", "model.frozen_dtype=bfloat16", "model.dtype=bfloat16",
        "model.attention=auto", "mesh_fsdp=1", f"data.batch_size={b}", f"model.remat={remat}", *extra])


def memory(args) -> None:
    devs = devices(args.target)
    from pbe_jax import parallel
    from pbe_jax.train.trainer import abstract_trainer, batch_spec

    for b in (int(v) for v in args.batches.split(",")):
        for remat in {"off": [False], "on": [True], "both": [False, True]}[args.remat]:
            cfg = step_config(b, remat, args.size, args.override)
            mesh = parallel.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, devices=devs)
            trainer = abstract_trainer(cfg, mesh=mesh)
            t0 = time.perf_counter()
            compiled = trainer.step_fn.lower(trainer.state, batch_spec(cfg)).compile()
            seconds = time.perf_counter() - t0
            m = compiled.memory_analysis()
            if args.hlo:
                Path(f"{args.hlo}_{args.target}_{args.size}_b{b}_remat{int(remat)}.hlo").write_text(compiled.as_text())
            print(json.dumps({
                "target": args.target, "device": devs[0].device_kind, "image_size": args.size, "batch": b,
                "remat": remat, "arguments_GiB": round(m.argument_size_in_bytes / GIB, 3),
                "temporaries_GiB": round(m.temp_size_in_bytes / GIB, 3),
                "outputs_GiB": round(m.output_size_in_bytes / GIB, 3),
                "aliased_GiB": round(m.alias_size_in_bytes / GIB, 3), "compile_s": round(seconds, 1)}), flush=True)
            del compiled, trainer


def check(args) -> int:
    """The tiny config's loss and gradients (the step's own `loss_fn`) with remat off and on."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from pbe_jax.train import config as config_lib
    from pbe_jax.train.trainer import build_trainer
    from pbe_jax.train.step import StepConfig, loss_fn

    results = {}
    for remat in (False, True):
        cfg = config_lib.override(config_lib.load("tiny"), [f"model.remat={remat}", *args.override])
        trainer = build_trainer(cfg)
        s = trainer.state
        rng = np.random.default_rng(0)
        b, size, ref = cfg.data.batch_size, cfg.data.image_size, cfg.data.reference_size
        box = np.tile(np.array([[size // 4, size // 4, 3 * size // 4, 3 * size // 4]], np.float32), (b, 1))
        batch = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
                 "reference": rng.integers(0, 256, (b, ref, ref, 3), dtype=np.uint8),
                 "box": box, "box_ext": box}
        from pbe_jax.diffusion import NoiseSchedule
        schedule = NoiseSchedule.from_config(trainer.extra_configs.get("scheduler"))
        key = jax.random.key(1)
        f = jax.jit(jax.value_and_grad(loss_fn), static_argnums=(2, 5, 6))
        loss, grads = f(s.params, s.frozen, trainer.graphdef, batch, key, schedule,
                        StepConfig.from_train_config(cfg))
        results[remat] = (float(loss), jax.tree.map(np.asarray, grads))
    (l0, g0), (l1, g1) = results[False], results[True]
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    diffs = [float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
             for a, b in zip(leaves0, leaves1)]
    rel = [d / max(float(np.max(np.abs(a))), 1e-30) for d, a in zip(diffs, leaves0)]
    out = {"config": "tiny", "loss_remat_off": l0, "loss_remat_on": l1, "loss_identical": l0 == l1,
           "grad_leaves": len(leaves0),
           "grad_leaves_identical": sum(np.array_equal(a, b) for a, b in zip(leaves0, leaves1)),
           "grad_max_abs_diff": max(diffs), "grad_max_rel_diff": max(rel)}
    print(json.dumps(out), flush=True)
    return 0 if out["loss_identical"] or abs(l0 - l1) <= 1e-6 * abs(l0) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory", help="compiled memory of the full-size step, remat off / on")
    m.add_argument("--target", default="h100-1", help="cpu, or a topology: h100-1, l4-1, v5e-1, … (default h100-1)")
    m.add_argument("--size", type=int, default=512)
    m.add_argument("--batches", default="1,8,16")
    m.add_argument("--remat", choices=["off", "on", "both"], default="both")
    m.add_argument("--hlo", default=None,
                   help="write each compiled HLO to <prefix>_<target>_<size>_b<B>_remat<0|1>.hlo")
    c = sub.add_parser("check", help="tiny config: loss and grads with remat off vs on")
    for s in (m, c):
        s.add_argument("--override", nargs="*", default=[], help="extra config overrides a.b=value")
    args = p.parse_args(argv)
    if args.command == "memory":
        memory(args)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())

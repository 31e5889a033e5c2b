"""Full SD-1.4-size training checks that need no accelerator: one real step on the CPU, and XLA's compiled
memory analysis of the step at several batch sizes.

    python bench/full_size_cpu.py step [--size 256] [--lora RANK]           # ≈ 18 GB of host memory, minutes
    python bench/full_size_cpu.py memory [--batches 1,16,32] [--remat both] [--size 512] [--lora RANK]
    python bench/full_size_cpu.py build [--fsdp 8]                          # ≈ 17 GB of host memory, 2 min

`step`: SD-1.4 shapes (UNet 859.5 M, VAE, CLIP ViT-L/14 + bottleneck; random weights drawn with numpy),
batch 1, remat, bf16 frozen towers, bf16 compute — the 24 GB-card setting — runs the real `train_step`
twice (the first at the warm-up's learning rate 0, the second at 1e-5) and checks that the loss is finite,
that every trainable parameter tensor changed and that no frozen one did; prints the peak host memory.
`--lora RANK`: the LoRA step instead (docs/lora.md: rank RANK on the attention projections, the whole UNet
frozen in bf16 with the towers); then the trainable tensors are the adapter's factors, and the B factors of
the cross-attention's to_q and to_k must stay exactly zero (with a one-token context their layers get no
gradient, and AdamW's decay keeps a zero at zero) while every other factor changes.
`memory`: the same step lowered from shapes alone (no weights drawn) and compiled for this machine's
backend; prints `compiled.memory_analysis()` per (batch, remat) — arguments, temporaries, outputs not
aliased to donated inputs — an estimate of what the step needs on a device. Compiled for the CPU, XLA's
buffer assignment and fusion differ from a GPU's, so treat the numbers as estimates, not measurements.
`build`: the peak host memory of building the SD-1.4 trainer (configs/sd14.py: bf16 frozen towers, no EMA;
random weights) on 8 fake CPU devices with mesh_fsdp=8: the weights as loaded, then the train state on the
mesh. With fake devices every shard lives in this one process, so the state's shards add up to the whole
state; what the figure shows is what building it costs beyond the loaded weights and the shards.
Each prints one JSON line per result.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def fingerprint(tree) -> list[tuple[float, np.ndarray]]:
    """Per leaf: the float64 sum and a strided sample of 256 values (enough to see any update)."""
    import jax

    out = []
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf).astype(np.float32).ravel()
        out.append((float(a.astype(np.float64).sum()), a[:: max(1, a.size // 256)].copy()))
    return out


def no_gradient(state) -> list[bool]:
    """Per leaf of a train state's params: an adapter factor whose layer gets no gradient by construction,
    the cross-attention's query and key (softmax over the one context token is 1 whatever they are); B starts
    at zero there and stays zero."""
    import jax

    names = [jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value")
             for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return [n.startswith("lora.factors.") and n.endswith((".attn2.to_q.B", ".attn2.to_k.B")) for n in names]


def changed(before, after) -> list[bool]:
    return [sb != sa or not np.array_equal(xb, xa) for (sb, xb), (sa, xa) in zip(before, after)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def release_freed_memory() -> None:
    """glibc keeps large freed blocks for reuse once its mmap threshold has adapted upwards, so the host's
    resident memory would count transient copies (numpy weights, compilation) twice. A fixed threshold
    makes every large block an mmap that goes back to the system when freed."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, and no more adapting
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


def lora(args) -> list[str]:
    """The override of a LoRA step, or none (sd14 stores whatever is frozen in bf16: then the UNet too)."""
    return [f"model.lora.rank={args.lora}"] if args.lora else []


def step(args) -> dict:
    import jax

    import train_throughput
    from pbe_jax import parallel
    from pbe_jax.train.trainer import abstract_trainer, batch_spec, build_trainer

    release_freed_memory()
    say = lambda what: print(f"{what}: host memory {peak_rss_gib():.2f} GiB peak", file=sys.stderr, flush=True)  # noqa: E731
    cfg = train_throughput.step_config("sd14", 1, True, "model.frozen_dtype=bfloat16", *lora(args), size=args.size)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()  # compiled from shapes first, so compilation's memory is gone before the weights come
    shapes = abstract_trainer(cfg, mesh=mesh)
    compiled = shapes.step_fn.lower(shapes.state, batch_spec(cfg)).compile()
    compile_s = time.perf_counter() - t0
    say(f"compiled in {compile_s:.0f} s")
    t0 = time.perf_counter()
    models = train_throughput.full_size_models()
    trainer = build_trainer(cfg, models=models, mesh=mesh)
    del models  # the trainer's state holds what training needs (frozen towers now in bf16)
    build_s = time.perf_counter() - t0
    say(f"state built in {build_s:.0f} s")
    n_trainable = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    n_frozen = sum(x.size for x in jax.tree.leaves(trainer.state.frozen))
    trainable0, frozen0 = fingerprint(trainer.state.params), fingerprint(trainer.state.frozen)
    x = parallel.global_batch(train_throughput.batch(1, cfg.data.image_size, cfg.data.reference_size), mesh)
    losses, times = [], []
    state = trainer.state
    for i in range(2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, x)
        losses.append(float(metrics["loss"]))
        times.append(round(time.perf_counter() - t0, 1))
        say(f"step {i + 1} in {times[-1]} s, loss {losses[-1]:.4f}")
    trainable_changed = changed(trainable0, fingerprint(state.params))
    frozen_changed = changed(frozen0, fingerprint(state.frozen))
    still = no_gradient(state.params)
    still_zero = [not np.asarray(leaf).any() for leaf, s in zip(jax.tree.leaves(state.params), still) if s]
    result = {"what": "one full-size training step on the CPU", "device": jax.devices()[0].device_kind,
              "lora_rank": args.lora,
              "image_size": cfg.data.image_size, "batch": 1, "remat": True, "frozen_dtype": "bfloat16",
              "compute_dtype": cfg.model.dtype, "trainable_params": n_trainable, "frozen_params": n_frozen,
              "compile_s": round(compile_s, 1), "build_s": round(build_s, 1), "step_s": times, "loss": losses,
              "loss_finite": bool(np.all(np.isfinite(losses))),
              "trainable_tensors_changed": f"{sum(trainable_changed)}/{len(trainable_changed)}",
              "frozen_tensors_changed": f"{sum(frozen_changed)}/{len(frozen_changed)}",
              "no_gradient_factors_still_zero": f"{sum(still_zero)}/{sum(still)}",
              "compiled_GiB": round(train_throughput.compiled_bytes(compiled) / 2**30, 2),
              "peak_host_GiB": round(peak_rss_gib(), 2)}
    moved_as_expected = all(c != s for c, s in zip(trainable_changed, still)) and all(still_zero)
    result["ok"] = bool(result["loss_finite"] and moved_as_expected and not any(frozen_changed))
    return result


def memory(args) -> list[dict]:
    import jax

    import train_throughput
    from pbe_jax import parallel
    from pbe_jax.train.trainer import abstract_trainer, batch_spec

    rows = []
    for remat in {"off": [False], "on": [True], "both": [False, True]}[args.remat]:
        for b in (int(v) for v in args.batches.split(",")):
            cfg = train_throughput.step_config("sd14", b, remat, *lora(args), size=args.size)
            trainer = abstract_trainer(cfg, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
            t0 = time.perf_counter()
            compiled = trainer.step_fn.lower(trainer.state, batch_spec(cfg)).compile()
            m = compiled.memory_analysis()
            gib = lambda n: round(n / 2**30, 2)  # noqa: E731
            row = {"what": f"compiled memory of the full-size train step ({jax.default_backend()} compile)",
                   "batch": b, "remat": remat, "lora_rank": args.lora, "image_size": args.size, "frozen_dtype": cfg.model.frozen_dtype,
                   "arguments_GiB": gib(m.argument_size_in_bytes), "temporaries_GiB": gib(m.temp_size_in_bytes),
                   "outputs_not_aliased_GiB": gib(m.output_size_in_bytes - m.alias_size_in_bytes),
                   "total_GiB": gib(train_throughput.compiled_bytes(compiled)),
                   "compile_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def current_rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


def build(args) -> dict:
    """Peak host memory of `build_trainer` for SD-1.4 with mesh_fsdp=args.fsdp on as many fake CPU devices."""
    import jax

    import train_throughput
    from pbe_jax import parallel
    try:
        from pbe_jax.train.trainer import build_trainer
    except ImportError:  # the code before the trainer had its own module (the "before" figure)
        from pbe_jax.train.loop import build_trainer

    release_freed_memory()
    cfg = train_throughput.step_config("sd14", args.fsdp, False, f"mesh_fsdp={args.fsdp}", "mesh_data=1")
    mesh = parallel.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    base = current_rss_gib()
    t0 = time.perf_counter()
    models = train_throughput.full_size_models()
    weights = sum(x.nbytes for x in jax.tree.leaves(models.components()))
    loaded = peak_rss_gib()
    trainer = build_trainer(cfg, models=models, mesh=mesh)
    jax.block_until_ready(trainer.state)
    build_s = time.perf_counter() - t0
    leaves = jax.tree.leaves(trainer.state)
    state = sum(x.nbytes for x in leaves)
    per_device = max(sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
                     for d in mesh.devices.flat)
    del models
    return {"what": f"peak host memory building the SD-1.4 trainer, mesh_fsdp={args.fsdp} on fake CPU devices",
            "devices": len(jax.devices()), "mesh": dict(mesh.shape), "frozen_dtype": cfg.model.frozen_dtype,
            "ema": cfg.ema_decay > 0, "rss_at_start_GiB": round(base, 2), "weights_GiB": round(weights / 2**30, 2),
            "peak_after_loading_GiB": round(loaded, 2), "state_GiB": round(state / 2**30, 2),
            "state_per_device_GiB": round(per_device / 2**30, 2), "peak_host_GiB": round(peak_rss_gib(), 2),
            "rss_after_GiB": round(current_rss_gib(), 2), "build_s": round(build_s, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("step", help="one real full-size step (batch 1, remat, bf16 frozen towers)")
    s.add_argument("--size", type=int, default=256, help="image side (default 256)")
    m = sub.add_parser("memory", help="compiled memory analysis of the full-size step")
    m.add_argument("--batches", default="1,16,32")
    m.add_argument("--remat", choices=["off", "on", "both"], default="both")
    m.add_argument("--size", type=int, default=512, help="image side (default 512)")
    b = sub.add_parser("build", help="peak host memory of building the SD-1.4 trainer on fake CPU devices")
    b.add_argument("--fsdp", type=int, default=8, help="mesh_fsdp, and the number of fake CPU devices (default 8)")
    for sub_parser in (s, m):
        sub_parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                                help="the LoRA step at this rank (default 0: full fine-tuning)")
    args = p.parse_args(argv)
    if args.command == "build":
        import os

        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.fsdp}")
        os.environ["JAX_PLATFORMS"] = "cpu"
        print(json.dumps(build(args)), flush=True)
        return 0
    if args.command == "step":
        result = step(args)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

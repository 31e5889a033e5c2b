"""`python -m pbe_jax.aot train|sample --topology …` and `train.py --compile-only`: the command line of the
compile-only report (the package's docstring says what it reports)."""
from __future__ import annotations

import argparse
import sys

from pbe_jax.aot import targets
from pbe_jax.aot.report import emit, sample_models, sample_report, train_report

USAGE = """Compile the training step or the sampler for a TPU slice or GPU nodes from any machine, and report per device
what the compiler says of it: memory (its buffer assignment) against the device's, FLOPs and the roofline time
they imply, the kernels and library calls (Mosaic; cuBLAS, cuDNN, Triton) and the collectives of the compiled
program. No accelerator is touched and nothing is run: libtpu (`pip install -e ".[tpu]"`) and the CUDA plugin
(`pip install -e ".[gpu]"`) compile for a named topology on a CPU host.

    python -m pbe_jax.aot train --topology v5e-8 --config sd14 data.batch_size=64 model.remat=True
    python -m pbe_jax.aot train --topology v5p-8 --slices 2 --config sd14 data.batch_size=64 mesh_fsdp=4
    python -m pbe_jax.aot train --topology h100-8 --config sd14 data.batch_size=64 model.frozen_dtype=bfloat16
    python -m pbe_jax.aot train --topology h100:2x8 --config sd14 data.batch_size=128
    python -m pbe_jax.aot sample --topology v6e-8 --config sd14 --batch-size 64 --sampler dpmpp_2m --steps 20
    python -m pbe_jax.aot sample --topology l4-1 --pretrained checkpoints/synthetic --batch-size 16 --json r.json

--topology is a Cloud TPU name (v4-8, v5p-8: TensorCores; v5e-8 = v5litepod-8, v6e-8: chips), a raw TPU
topology (v5e:2x4, v5p:2x2x2), or NVIDIA GPUs: h100-8 (one node of 8), h100:2x8 (2 nodes of 8), h200-8,
a100-80gb-8, l4-1 (pbe_jax/aot/gpus/ holds each GPU's description for the compiler, with its sources).
Exit status 0 when the program fits in a device's memory less the margin the report states, 3 when it does
not (the JSON is still written), 2 for a bad option, 1 for an error. The numbers are the compiler's for that
target, not a run: memory is its buffer assignment (before the allocator's fragmentation; for GPUs without
autotuning, which picks kernels and cuDNN workspaces on the device), the roofline is FLOPs ÷ the device's peak
dense bf16 rate, a lower bound on the step's time, not a prediction of it.
"""


def _missing(text: str) -> int:
    print(targets.missing_compiler(text), file=sys.stderr)
    return 1


def check_train(cfg, topology_name: str, slices: int = 1, json_path: str | None = None) -> int:
    """`train.py --compile-only`: the training step of `cfg` compiled for a topology; the exit status of `emit`."""
    if not targets.have_compiler(topology_name):
        return _missing(topology_name)
    targets.prepare_host()
    return emit(train_report(cfg, targets.topology(topology_name, slices)), json_path)


def main(argv=None) -> int:
    from pbe_jax.diffusion import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m pbe_jax.aot", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="program", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--topology", required=True,
                        help="v5e-8, v5p-8, v4-8, v6e-8, …, v5e:2x4, v5p:2x2x2; h100-8, h100:2x8, h200-8, "
                             "a100-80gb-8, l4-1")
    common.add_argument("--slices", type=int, default=1,
                        help="TPU slices joined by the data-centre network (default 1; GPU nodes: h100:2x8)")
    common.add_argument("--json", metavar="FILE", help="also write the report as JSON (local or gs://)")
    common.add_argument("--hlo", metavar="FILE", help="also write the compiled program's HLO text, to read")
    t = sub.add_parser("train", parents=[common], help="the training step train.py builds",
                       description="The training step of a config, as train.py builds it, shapes only.")
    t.add_argument("--config", default="tiny", help="a name in configs/ or a config file (default tiny)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as train.py takes them")
    s = sub.add_parser("sample", parents=[common], help="the generation sample.py runs",
                       description="The whole jitted generation of sample.py, shapes only (a folder's configs are "
                                   "read, its weights never).")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="a Paint-by-Example folder or single file (its configs only)")
    source.add_argument("--config", help="a training config's networks (sd14: SD-1.4 size)")
    s.add_argument("--batch-size", type=int, default=8, help="images per call, over one host's devices (default 8)")
    s.add_argument("--sampler", choices=SAMPLERS, default="plms")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--size", type=int, default=None, help="image side (default: the model's, 512 for SD)")
    s.add_argument("--scale", type=float, default=5.0, help="guidance scale (default 5: two UNet rows per image)")
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    s.add_argument("--attention", choices=["auto", "xla", "cudnn", "splash"], default="auto",
                   help="auto: cuDNN flash attention on GPUs, splash on TPUs for long self-attention, else xla")
    args = p.parse_args(argv)
    try:
        targets.parse_topology(args.topology)
        targets.check_slices(args.topology, args.slices)
    except targets.TopologyError as e:
        p.error(str(e))
    if args.program == "sample" and (args.batch_size < 1 or args.steps < 1):
        p.error("--batch-size and --steps must be at least 1")
    if not targets.have_compiler(args.topology):
        return _missing(args.topology)
    targets.prepare_host()
    try:
        topo = targets.topology(args.topology, args.slices)
        if args.program == "train":
            from pbe_jax.train import config as config_lib

            cfg = config_lib.override(config_lib.load(args.config), args.overrides)
            report = train_report(cfg, topo, args.hlo)
        else:
            models = sample_models(args.pretrained, args.config, args.dtype, args.attention)
            report = sample_report(models, topo, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                                   size=args.size or models.vae.config.sample_size, guidance_scale=args.scale,
                                   settings={"dtype": args.dtype, "attention": args.attention}, hlo_path=args.hlo)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return emit(report, args.json)

"""Train Paint by Example (JAX): the paper's recipe on one CPU, a GPU node or a TPU slice.

    python train.py --config tiny --workdir runs/tiny                    # a small model on a laptop CPU
    python train.py --config sd14 --workdir runs/sd14 \\
        model.sd_folder=/data/stable-diffusion-v1-4 model.clip_folder=/data/clip-vit-large-patch14 \\
        data.source=shards data.path=gs://b/oi          # shards: python -m pbe_jax.data.prepare (docs/data.md);
                                                         # model.sd_file=sd-v1-4.ckpt: an SD v1 single file
    python train.py --config sd14 --workdir runs/lora model.init=pbe model.pbe_folder=/data/Paint-by-Example \\
        model.lora.rank=16 data.source=folder data.folder=/data/mine   # LoRA on your own images (with
                                                                         # boxes): only the adapter trains
    python train.py --config tiny --workdir runs/tiny --resume           # continue after an interruption
    python train.py --workdir runs/tiny --export                         # a diffusers folder from the
    python train.py --workdir runs/tiny --export 2000                    # latest checkpoint, or step 2000
    python train.py --config sd14 --workdir gs://bucket/runs/sd14 distributed=True ...   # every host of a
                                                                         # TPU pod slice runs the same line
    python train.py --config sd14 --workdir gs://bucket/runs/sd14 ... --compile-only v5p-64   # before the pod
                                                                         # exists: does that step fit?

Overrides are KEY=VALUE with dotted keys into the config (values are Python literals, else strings):
data.batch_size=32, optim.lr=2e-5, model.remat=True, mesh_fsdp=8, steps=1000, ... Named configs live
in configs/; `--show-config` prints the resolved one. The run writes, under --workdir (a local folder or
gs://bucket/...): checkpoints/ (orbax, last N, resumable), metrics.jsonl, tensorboard/, samples/ (grids every
sample_every steps) and export/ (a diffusers folder at the end; with model.lora.rank, the adapter merged, and
export/lora/pytorch_lora_weights.safetensors, the adapter in diffusers' layout).

--compile-only TOPOLOGY compiles the step this exact command would run for a TPU slice (v5e-8, v5p-64,
v4-8, v6e-16, v5e:2x4, ...; `--slices N` for a multislice run; libtpu, the [tpu] extra) or for GPU nodes (h100-8,
h100:2x8, h200-8, a100-80gb-8, l4-1; the CUDA plugin, the [gpu] extra) on this machine, touching no data,
weights (only their config.json files) or workdir, and prints the compiler's memory per device, FLOPs,
roofline, kernels and library calls and collectives (python -m pbe_jax.aot has the same for sampling). Exit
status 0 when it fits in a device's memory, 3 when it does not.

SIGTERM (a preemption notice) finishes the current step, checkpoints it (every process agreeing on the step),
prints the command that resumes and exits with status 0. Exit status 1: bad arguments, config or storage;
2: the loss diverged (the last good checkpoint is kept).
"""
import argparse
import json
import shlex
import sys


def main(argv=None) -> int:
    from pbe_jax import compile_cache

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="a name in configs/ or a path to a config file (default tiny)")
    p.add_argument("--workdir", help="where checkpoints, metrics, samples and the export go (needed to train or "
                                     "--export; not with --show-config or --compile-only)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--export", nargs="?", const="latest", metavar="STEP",
                   help="train nothing: write the models of the latest checkpoint (or of STEP) in --workdir as a "
                        "diffusers folder, built from the config saved with it (to WORKDIR/export, or "
                        "WORKDIR/export_STEP for an earlier step; see --export-to)")
    p.add_argument("--export-to", metavar="DIR", help="with --export: the folder to write instead")
    p.add_argument("--compile-only", metavar="TOPOLOGY",
                   help="train nothing: compile this command's step for a TPU slice (v5e-8, v5p-64, v4-8, v6e-8, "
                        "v5e:2x4, ...; the [tpu] extra) or GPU nodes (h100-8, h100:2x8, h200-8, a100-80gb-8, l4-1; "
                        "the [gpu] extra) and report whether it fits (exit 0) or not (exit 3)")
    p.add_argument("--slices", type=int, default=1, metavar="N",
                   help="with --compile-only: N such TPU slices joined by the data-centre network (default 1)")
    p.add_argument("--json", metavar="FILE", help="with --compile-only: also write the report as JSON")
    compile_cache.add_argument(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.batch_size=8")
    args = p.parse_args(argv)
    compile_cache.enable(args.compile_cache)  # before anything compiles
    if args.export_to and not args.export:
        p.error("--export-to needs --export")
    if args.export:
        if args.overrides or args.resume or args.show_config:
            p.error("--export takes the config saved with the checkpoint: no KEY=VALUE, --resume or --show-config")
        if not args.workdir:
            p.error("--export needs --workdir (the run whose checkpoint to export)")
        return export(args.workdir, args.export, args.export_to)

    from pbe_jax.train import config as config_lib

    try:
        cfg = config_lib.override(config_lib.load(args.config), args.overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.show_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=1))
        return 0
    if args.compile_only:
        return compile_only(p, cfg, args)
    if args.slices != 1 or args.json:
        p.error("--slices and --json go with --compile-only")
    if not args.workdir:
        p.error("--workdir is needed to train (where checkpoints, metrics and the export go)")

    from pbe_jax.train.loop import TrainingDiverged, train
    from pbe_jax.train.preemption import Preempted

    try:
        metrics = train(cfg, args.workdir, resume=args.resume)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        print(f"{e}; resume with: {shlex.join(['python', 'train.py', *again, '--resume'])}", flush=True)
        return 0
    except (OSError, ValueError) as e:  # an existing run without --resume, a missing folder, an unreachable
        print(f"error: {e}", file=sys.stderr)  # bucket, data that cannot be read or resumed
        return 1
    print(f"done: {json.dumps(metrics)}")
    return 0


def compile_only(parser, cfg, args) -> int:
    from pbe_jax import aot

    if args.resume:
        parser.error("--compile-only trains nothing: no --resume")
    try:
        aot.parse_topology(args.compile_only)
        aot.check_slices(args.compile_only, args.slices)
    except aot.TopologyError as e:
        parser.error(str(e))
    try:
        return aot.check_train(cfg, args.compile_only, args.slices, args.json)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def export(workdir: str, step: str, out: str | None) -> int:
    if step != "latest" and not step.isdigit():
        print(f"error: --export {step!r}: expected a step number", file=sys.stderr)
        return 1
    from pbe_jax.train.loop import export_checkpoint

    try:
        done, folder = export_checkpoint(workdir, None if step == "latest" else int(step), out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {folder} (step {done})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

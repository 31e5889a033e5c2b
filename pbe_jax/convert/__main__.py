"""python -m pbe_jax.convert SRC DST: a diffusers Paint-by-Example folder → this project's checkpoint
(loads without torch), or a checkpoint → a diffusers folder that diffusers' `from_pretrained` opens; a single
file in the original release's layout (its `model.ckpt`, or a `.safetensors` of it) → either; and any of them
→ `--format ldm`, a single file in the original's layout (DST.safetensors, or DST.ckpt as `{"state_dict": …}`)
that the original code loads with no missing or unexpected weights. Every path may be local or in a bucket
(gs://bucket/...).
"""
import argparse
import sys

from pbe_jax.convert.formats import convert
from pbe_jax.convert.weights import WeightsError
from pbe_jax.models.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers folder (unet/, vae/, image_encoder/, ...), a pbe_jax checkpoint, or a "
                               "single file in the original's layout (.ckpt, .safetensors)")
    p.add_argument("dst", help="the folder (or, with --format ldm, the file) to write; replaced if it exists, "
                               "written atomically")
    p.add_argument("--format", "--to", dest="to", choices=["jax", "diffusers", "ldm"], default=None,
                   help="output format (default: jax, or diffusers for a pbe_jax checkpoint); ldm: the original "
                        "release's single file")
    p.add_argument("--no-ema", action="store_true", help="a single file's plain weights, not its EMA copies")
    p.add_argument("--variant", default=None, help="read diffusers weight files of this variant, e.g. fp16")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="store the weights in this type (default: as loaded, float32); loading casts back")
    args = p.parse_args(argv)
    try:
        to = convert(args.src, args.dst, to=args.to, variant=args.variant, dtype=args.dtype, ema=not args.no_ema)
    except (WeightsError, ConfigError, OSError, ValueError) as e:  # OSError: missing files, storage errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = {"jax": "pbe_jax checkpoint", "diffusers": "diffusers folder", "ldm": "single file, original layout"}[to]
    print(f"wrote {args.dst} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

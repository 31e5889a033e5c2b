"""python -m pbe_jax.convert SRC DST: a diffusers Paint-by-Example folder → this project's checkpoint
(loads without torch), or a checkpoint → a diffusers folder that diffusers' `from_pretrained` opens. Either may
be a local folder or an object-store one (gs://bucket/...)."""
import argparse
import sys

from pbe_jax.convert.diffusers import convert
from pbe_jax.convert.weights import WeightsError
from pbe_jax.models.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pbe_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers folder (unet/, vae/, image_encoder/, ...) or a pbe_jax checkpoint")
    p.add_argument("dst", help="the folder to write; replaced if it exists, written atomically")
    p.add_argument("--to", choices=["jax", "diffusers"], default=None,
                   help="output format (default: jax for a diffusers source, diffusers for a pbe_jax checkpoint)")
    p.add_argument("--variant", default=None, help="read diffusers weight files of this variant, e.g. fp16")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="store the weights in this type (default: as loaded, float32); loading casts back")
    args = p.parse_args(argv)
    try:
        to = convert(args.src, args.dst, to=args.to, variant=args.variant, dtype=args.dtype)
    except (WeightsError, ConfigError, OSError, ValueError) as e:  # OSError: missing files, storage errors
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} ({'pbe_jax checkpoint' if to == 'jax' else 'diffusers folder'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

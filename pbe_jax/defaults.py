"""The defaults that sample.py, the web page (pbe_jax.app) and the library share, each held once here. Plain values
with no imports beyond pathlib, so that the CLIs' --help reads them without importing JAX."""
from pathlib import Path

# The samplers, each equal to the diffusers scheduler of that name (pbe_jax.diffusion.samplers builds them).
SAMPLERS = ("plms", "ddim", "dpmpp_2m", "unipc")
# DPM-Solver++ 2M at 20 steps: 2.5× fewer network calls than the paper's PLMS-50, with the same attribute score,
# a CLIP score 0.6 lower and higher PSNR/SSIM on the synthetic benchmark (bench/quality_steps.py, docs/sampling.md
# "Samplers and steps"); `--sampler plms --steps 50` is the paper's setting.
DEFAULT_SAMPLER = "dpmpp_2m"  # the sampler of an edit that names none
DEFAULT_STEPS = 20  # denoising steps of an edit that names none
DEFAULT_SCALE = 5.0  # classifier-free guidance scale (the paper's)

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the shipped model and example live beside the package
SHIPPED_MODEL = ROOT / "checkpoints" / "synthetic"  # the small model this project trains and ships (offline default)
SHIPPED_EXAMPLE = ROOT / "examples" / "synthetic"  # the example that `python sample.py` edits with no arguments

GRID_HEIGHT = 256  # smaller edits are enlarged (whole pixels) in the grid, for looking at
GRID_MAX_HEIGHT = 512  # a grid of photo-sized edits is drawn at this height (shrunk)

"""Paint by Example (Yang et al. 2022) in JAX/Flax: exemplar-guided image editing with latent diffusion."""
import ctypes.util
import os

__version__ = "0.1.0"

# The CUDA plugin (the [gpu] extra, which also compiles for GPUs on any host) checks its CUDA versions with
# cuInit when JAX first looks for plugins. On a host without NVIDIA's driver that prints a traceback on every
# run and the plugin is dropped anyway; there the check is skipped (the plugin then stays out of the way).
if "JAX_SKIP_CUDA_CONSTRAINTS_CHECK" not in os.environ and ctypes.util.find_library("cuda") is None:
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"


def __getattr__(name):
    # `pbe_jax.PaintByExample` without importing the models for `import pbe_jax` alone.
    if name == "PaintByExample":
        from pbe_jax.pipeline import PaintByExample

        return PaintByExample
    raise AttributeError(f"module 'pbe_jax' has no attribute {name!r}")

"""Paint by Example (Yang et al. 2022) in JAX/Flax: exemplar-guided image editing with latent diffusion."""
__version__ = "0.1.0"


def __getattr__(name):
    # `pbe_jax.PaintByExample` without importing the models for `import pbe_jax` alone.
    if name == "PaintByExample":
        from pbe_jax.pipeline import PaintByExample

        return PaintByExample
    raise AttributeError(f"module 'pbe_jax' has no attribute {name!r}")

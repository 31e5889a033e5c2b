"""Paint by Example (Yang et al. 2022) in JAX/Flax: exemplar-guided image editing with latent diffusion."""
__version__ = "0.1.0"

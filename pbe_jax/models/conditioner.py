"""Paint by Example's condition: the information bottleneck on the reference image and the learned
unconditional vector for classifier-free guidance.

pooled CLIP token (B, D) → mapper (⌊(layers + 1) / 5⌋ transformer blocks, one head, GELU MLP, biased
attention) → LayerNorm → linear D → projection_dim → one condition token (B, 1, projection_dim).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from pbe_jax.models.layers import Policy, layer_norm, linear
from pbe_jax.models.transformer import BasicTransformerBlock


class Mapper(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.blocks = nnx.List([
            BasicTransformerBlock(d, 1, d, context_dim=None, activation="gelu", attention_bias=True,
                                  policy=policy, rngs=rngs) for _ in range((cfg.num_hidden_layers + 1) // 5)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class PaintByExampleImageEncoder(nnx.Module):
    """diffusers' `PaintByExampleImageEncoder`: the CLIP tower (`model`), the bottleneck, `uncond_vector`."""

    def __init__(self, config: CLIPVisionConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        d, p = config.hidden_size, config.projection_dim
        self.config = config
        self.model = CLIPVisionModel(config, policy=policy, rngs=rngs)
        self.mapper = Mapper(config, policy, rngs)
        self.final_layer_norm = layer_norm(d, 1e-5, policy, rngs)
        self.proj_out = linear(d, p, True, policy, rngs)
        self.uncond_vector = nnx.Param(jax.random.normal(rngs.params(), (1, 1, p), policy.param_dtype))

    def bottleneck(self, pooled: jax.Array) -> jax.Array:
        """Pooled CLIP embedding (B, D) → condition (B, 1, projection_dim)."""
        return self.proj_out(self.final_layer_norm(self.mapper(pooled[:, None, :])))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """CLIP-normalised reference pixels (B, H, W, 3) → condition (B, 1, projection_dim)."""
        _, pooled = self.model(pixels)
        return self.bottleneck(pooled)

    def uncond(self, batch: int) -> jax.Array:
        """The learned unconditional token, (batch, 1, projection_dim), in the compute dtype."""
        v = self.uncond_vector[...]
        return jnp.broadcast_to(v, (batch,) + v.shape[1:]).astype(self.proj_out.dtype or v.dtype)

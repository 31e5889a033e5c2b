"""The diffusers transformer pieces: feed-forward (GELU/GEGLU), `BasicTransformerBlock` (also the
Paint-by-Example mapper's block) and `Transformer2DModel` over a feature map."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models.attention import Attention
from pbe_jax.models.layers import Policy, conv, group_norm, layer_norm, linear


class GELU(nnx.Module):
    """Linear then GELU ("gelu": exact erf form) or GEGLU ("geglu": half the projection gates the other)."""

    def __init__(self, dim: int, inner: int, gated: bool, policy: Policy, rngs: nnx.Rngs):
        self.gated = gated
        self.proj = linear(dim, inner * 2 if gated else inner, True, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj(x)
        if self.gated:
            h, gate = jnp.split(h, 2, axis=-1)
            return h * jax.nn.gelu(gate, approximate=False)
        return jax.nn.gelu(h, approximate=False)


class FeedForward(nnx.Module):
    """diffusers `FeedForward`: net.0 is the activation with its projection, net.1 dropout, net.2 the output."""

    def __init__(self, dim: int, activation: str, policy: Policy, rngs: nnx.Rngs, mult: int = 4):
        if activation not in ("geglu", "gelu"):
            raise ValueError(f"feed-forward activation {activation!r} is not supported (geglu, gelu)")
        inner = dim * mult
        self.net = nnx.List([GELU(dim, inner, activation == "geglu", policy, rngs), None,
                             linear(inner, dim, True, policy, rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))  # net[1] is dropout, 0 in every model here


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention (only with a context dim) and feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, context_dim: int | None, activation: str = "geglu",
                 attention_bias: bool = False, eps: float = 1e-5, policy: Policy, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, eps, policy, rngs)
        self.attn1 = Attention(dim, heads, head_dim, bias=attention_bias, policy=policy, rngs=rngs)
        if context_dim is not None:
            self.norm2 = layer_norm(dim, eps, policy, rngs)
            self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, bias=attention_bias,
                                   policy=policy, rngs=rngs)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = layer_norm(dim, eps, policy, rngs)
        self.ff = FeedForward(dim, activation, policy, rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
    """diffusers `Transformer2DModel` on a feature map: GroupNorm (eps 1e-6), proj_in (1×1 conv or linear),
    transformer blocks over the H·W tokens, proj_out, residual."""

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int,
                 linear_projection: bool, policy: Policy, rngs: nnx.Rngs):
        self.norm = group_norm(channels, groups, 1e-6, policy, rngs)
        proj = (lambda: linear(channels, channels, True, policy, rngs)) if linear_projection else \
            (lambda: conv(channels, channels, 1, policy, rngs))
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, context_dim=context_dim, policy=policy,
                                  rngs=rngs) for _ in range(layers)])
        self.proj_out = proj()

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.proj_in(self.norm(x)).reshape(b, h * w, c)  # a 1×1 conv and a linear agree on NHWC
        for block in self.transformer_blocks:
            t = block(t, context)
        return self.proj_out(t.reshape(b, h, w, c)) + x

"""The CLIP vision transformer (ViT: pre-layernorm, class token, quick-GELU MLPs), NHWC pixels in.

Module paths mirror transformers' `CLIPVisionModel` as released checkpoints name it (`vision_model.…`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models.attention import dot_product_attention
from pbe_jax.models.config import ConfigError, from_mapping
from pbe_jax.models.layers import ACTIVATIONS, Policy, conv, layer_norm, linear


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig` (ViT-L/14 by default). `projection_dim` is the width of the
    Paint-by-Example condition token."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    num_hidden_layers: int = 24
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "CLIP vision config") -> "CLIPVisionConfig":
        """From a vision config, or the `vision_config` of a full CLIP config (one without vision keys at the
        top level: a Paint-by-Example encoder loaded by transformers carries both, and uses the top level).
        transformers configs carry many keys that do not concern the vision tower (dropouts, init ranges,
        token ids): they are skipped."""
        if "vision_config" in d and "hidden_size" not in d:
            projection_dim = d.get("projection_dim", cls.projection_dim)
            d = {**d["vision_config"], "projection_dim": projection_dim}
        return from_mapping(cls, d, source, strict=False)

    def to_dict(self) -> dict:
        # transformers reads the training-only keys too when it builds the module; give its defaults.
        return {"architectures": ["PaintByExampleImageEncoder"], "model_type": "clip_vision_model",
                **dataclasses.asdict(self), "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0,
                "initializer_range": 0.02}


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads, self.backend = cfg.num_attention_heads, policy.attention_backend
        self.k_proj = linear(d, d, True, policy, rngs)
        self.v_proj = linear(d, d, True, policy, rngs)
        self.q_proj = linear(d, d, True, policy, rngs)
        self.out_proj = linear(d, d, True, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads)  # noqa: E731
        o = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                  backend=self.backend)
        return self.out_proj(o.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, True, policy, rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, True, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(cfg, policy, rngs)
        self.layer_norm1 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, policy, rngs)
        self.mlp = CLIPMLP(cfg, policy, rngs)
        self.layer_norm2 = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, policy, rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.dtype = policy.dtype
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), policy.param_dtype))
        self.patch_embedding = conv(cfg.num_channels, d, p, policy, rngs, stride=p, padding=0, bias=False)
        self.position_embedding = nnx.Embed((cfg.image_size // p) ** 2 + 1, d, dtype=policy.dtype,
                                            param_dtype=policy.param_dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        patches = self.patch_embedding(pixels.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(cfg, policy, rngs)
        self.pre_layrnorm = layer_norm(d, eps, policy, rngs)  # sic: transformers' spelling
        self.encoder = CLIPEncoder(cfg, policy, rngs)
        self.post_layernorm = layer_norm(d, eps, policy, rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return hidden, self.post_layernorm(hidden[:, 0])


class CLIPVisionModel(nnx.Module):
    """CLIP-normalised pixels (B, H, W, 3) → (last hidden state (B, 1 + patches, D), pooled (B, D))."""

    def __init__(self, config: CLIPVisionConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, policy, rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.vision_model(pixels)


class CLIPVisionModelWithProjection(nnx.Module):
    """transformers' `CLIPVisionModelWithProjection` (the image half of `CLIPModel`): CLIP-normalised pixels
    (B, H, W, 3) → `image_embeds` (B, projection_dim) = visual_projection(pooled), unnormalised, what
    `CLIPModel.get_image_features` returns. `config.projection_dim` is the projection's width."""

    def __init__(self, config: CLIPVisionConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, policy, rngs)
        self.visual_projection = linear(config.hidden_size, config.projection_dim, False, policy, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels)[1])

"""Flax NNX ports of the three Paint-by-Example networks (NHWC; attribute paths mirror diffusers)."""
from pbe_jax.models.attention import dot_product_attention
from pbe_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
from pbe_jax.models.conditioner import PaintByExampleImageEncoder
from pbe_jax.models.config import ConfigError
from pbe_jax.models.layers import Policy
from pbe_jax.models.unet import UNet2DConditionModel, UNetConfig
from pbe_jax.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

__all__ = ["AutoencoderKL", "CLIPVisionConfig", "CLIPVisionModel", "CLIPVisionModelWithProjection", "ConfigError",
           "DiagonalGaussian", "PaintByExampleImageEncoder", "Policy", "UNet2DConditionModel", "UNetConfig",
           "VAEConfig", "dot_product_attention"]

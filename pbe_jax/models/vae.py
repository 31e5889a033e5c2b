"""The SD AutoencoderKL (f = 8): encoder to a diagonal Gaussian posterior, decoder back to pixels, NHWC."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models.attention import Attention
from pbe_jax.models.config import ConfigError, from_mapping, to_dict
from pbe_jax.models.layers import Downsample2D, Policy, ResnetBlock2D, Upsample2D, conv, group_norm

_UNSUPPORTED = {"act_fn": ("silu", "swish"), "latents_mean": None, "latents_std": None, "norm_type": "group"}
_IGNORED = ("sample_size", "force_upcast")
_EPS = 1e-6  # the VAE's GroupNorms all use 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A diffusers `vae/config.json` (AutoencoderKL)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "vae config") -> "VAEConfig":
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ConfigError(f"{source}: _class_name {d['_class_name']!r} is not AutoencoderKL")
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key, [kind] * n)
            bad = [t for t in types if t != kind]
            if bad or len(types) != n:
                raise ConfigError(f"{source}: {key}={list(types)!r} is not supported by this port "
                                  f"(only {n} × {kind!r})")
        d = {k: v for k, v in d.items() if k not in ("down_block_types", "up_block_types")}
        return from_mapping(cls, d, source, unsupported=_UNSUPPORTED, ignored=_IGNORED)

    def to_dict(self) -> dict:
        n = len(self.block_out_channels)
        return {**to_dict(self, "AutoencoderKL"), "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n}


class DiagonalGaussian(NamedTuple):
    """The encoder's posterior over latents, NHWC (before the scaling factor)."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    def sample(self, key: jax.Array) -> jax.Array:
        """A sample, its noise drawn from `key` (float32)."""
        return self.sample_with(jax.random.normal(key, self.mean.shape, jnp.float32))

    def sample_with(self, noise: jax.Array) -> jax.Array:
        """The sample for standard-normal `noise` of the mean's shape: mean + std · noise, in the mean's dtype."""
        return self.mean + jnp.exp(0.5 * self.logvar) * noise.astype(self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class SpatialAttention(Attention):
    """The VAE mid-block attention: GroupNorm, one head over all H·W positions, residual."""

    def __init__(self, c: int, groups: int, policy: Policy, rngs: nnx.Rngs):
        super().__init__(c, 1, c, bias=True, policy=policy, rngs=rngs)
        self.group_norm = group_norm(c, groups, _EPS, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        return super().__call__(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c) + x


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, attention: bool, policy: Policy, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(c, c, None, groups, _EPS, policy=policy, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = nnx.List([SpatialAttention(c, groups, policy, rngs)]) if attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class ResampleBlock(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: ResNets (no time embedding), then a resampler."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str | None, policy: Policy,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, _EPS, policy=policy,
                                               rngs=rngs) for j in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(cout, 0, policy, rngs)]) if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(cout, policy, rngs)]) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, policy: Policy, rngs: nnx.Rngs):
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv(cfg.in_channels, ch[0], 3, policy, rngs)
        self.down_blocks = nnx.List([
            ResampleBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < n - 1 else None,
                          policy, rngs) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, policy, rngs)
        self.conv_norm_out = group_norm(ch[-1], g, _EPS, policy, rngs)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, policy: Policy, rngs: nnx.Rngs):
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, policy, rngs)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, policy, rngs)
        self.up_blocks = nnx.List([
            ResampleBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None,
                          policy, rngs) for i in range(n)])
        self.conv_norm_out = group_norm(ch[-1], g, _EPS, policy, rngs)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, policy, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Pixels in [-1, 1] (NHWC) ↔ latents. `encode` gives the unscaled posterior; `scale`/`unscale` apply
    the scaling (and shift) factor the diffusion model works with."""

    def __init__(self, config: VAEConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg, self.config, self.dtype = config, config, policy.dtype
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, policy, rngs)
        self.decoder = Decoder(cfg, policy, rngs)
        self.quant_conv = conv(2 * z, 2 * z, 1, policy, rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(z, z, 1, policy, rngs) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def scale(self, z: jax.Array) -> jax.Array:
        """Posterior sample → diffusion latent."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale(self, latents: jax.Array) -> jax.Array:
        """Diffusion latent → decoder input."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: encode, take the posterior sample (or mean without a key), decode."""
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

"""The SD-1.x UNet2DConditionModel (Paint by Example: 9 input channels, one context token), NHWC."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models.config import ConfigError, from_mapping, per_block, to_dict
from pbe_jax.models.layers import Downsample2D, Policy, ResnetBlock2D, Upsample2D, conv, group_norm, linear
from pbe_jax.models.transformer import Transformer2D

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
ATTENTION_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
_PER_BLOCK = ("layers_per_block", "attention_head_dim", "cross_attention_dim", "transformer_layers_per_block")

# diffusers options whose non-default values change the network in ways this port does not implement.
_UNSUPPORTED = {
    "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": ("silu", "swish"), "only_cross_attention": False,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "num_attention_heads": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None, "dropout": 0.0,
    "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
}
# Options that do not change the result here: sample_size is a default; upcast_attention is always on
# (the attention softmax runs in float32); addition_embed_type_num_heads needs addition_embed_type;
# diffusers passes resnet_out_scale_factor to none of the block types above.
_IGNORED = ("sample_size", "upcast_attention", "addition_embed_type_num_heads", "resnet_out_scale_factor")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """A diffusers `unet/config.json`. `attention_head_dim` is, as in diffusers' SD-1.x configs, the number
    of heads per block."""

    in_channels: int = 9
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: Any = 2
    attention_head_dim: Any = 8
    cross_attention_dim: Any = 768
    transformer_layers_per_block: Any = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    sample_size: int = 64

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, allowed, types in (("down_block_types", DOWN_BLOCKS, self.down_block_types),
                                    ("up_block_types", UP_BLOCKS, self.up_block_types)):
            if len(types) != n:
                raise ConfigError(f"{key} has {len(types)} entries, block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ConfigError(f"{key} contains {t!r}, which this port does not implement "
                                      f"(supported: {', '.join(allowed)})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"block_out_channels {c} is not divisible by norm_num_groups "
                                  f"{self.norm_num_groups}")
        for key in _PER_BLOCK:
            object.__setattr__(self, key, per_block(getattr(self, key), n, key))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "unet config") -> "UNetConfig":
        if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ConfigError(f"{source}: _class_name {d['_class_name']!r} is not UNet2DConditionModel")
        return from_mapping(cls, d, source, unsupported=_UNSUPPORTED, ignored=_IGNORED)

    def to_dict(self) -> dict:
        d = to_dict(self, "UNet2DConditionModel")
        for key in _PER_BLOCK:  # one value for every block is written as that value, as SD configs have it
            if len(set(d[key])) == 1:
                d[key] = d[key][0]
        return d


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' sinusoidal `get_timestep_embedding`, in float32, with its operation order."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin: int, dim: int, policy: Policy, rngs: nnx.Rngs):
        self.linear_1 = linear(cin, dim, True, policy, rngs)
        self.linear_2 = linear(dim, dim, True, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNetBlock(nnx.Module):
    """One down, mid or up level: ResNet blocks, transformers (after each ResNet on attention levels, between
    the two ResNets of the mid level), then an optional resampler. Up levels concatenate a skip connection
    before each ResNet."""

    def __init__(self, resnet_channels: list[tuple[int, int]], n_attentions: int, temb: int, *, heads: int,
                 layers: int, context_dim: int, cfg: UNetConfig, policy: Policy, rngs: nnx.Rngs,
                 resample: str | None = None, scale: float = 1.0):
        g, eps, cout = cfg.norm_num_groups, cfg.norm_eps, resnet_channels[-1][1]
        self.resnets = nnx.List([ResnetBlock2D(ci, co, temb, g, eps, output_scale_factor=scale, policy=policy,
                                               rngs=rngs) for ci, co in resnet_channels])
        self.attentions = nnx.List([
            Transformer2D(cout, heads, layers, context_dim, g, cfg.use_linear_projection, policy, rngs)
            for _ in range(n_attentions)]) if n_attentions else None
        self.downsamplers = nnx.List([Downsample2D(cout, cfg.downsample_padding, policy, rngs)]) \
            if resample == "down" else None
        self.upsamplers = nnx.List([Upsample2D(cout, policy, rngs)]) if resample == "up" else None


class UNet2DConditionModel(nnx.Module):
    """ε-prediction UNet: (sample NHWC, timesteps, context (B, S, D)) → ε NHWC."""

    def __init__(self, config: UNetConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        cfg, self.config = config, config
        ch = cfg.block_out_channels
        n, temb = len(ch), ch[0] * 4
        kw = dict(cfg=cfg, policy=policy, rngs=rngs)
        self.conv_in = conv(cfg.in_channels, ch[0], 3, policy, rngs)
        self.time_embedding = TimestepEmbedding(ch[0], temb, policy, rngs)

        down, cout = [], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            pairs = [(cin if j == 0 else cout, cout) for j in range(cfg.layers_per_block[i])]
            down.append(UNetBlock(pairs, len(pairs) if kind in ATTENTION_BLOCKS else 0, temb,
                                  heads=cfg.attention_head_dim[i], layers=cfg.transformer_layers_per_block[i],
                                  context_dim=cfg.cross_attention_dim[i], resample="down" if i < n - 1 else None,
                                  **kw))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetBlock([(ch[-1], ch[-1])] * 2, 1, temb, heads=cfg.attention_head_dim[-1],
                                   layers=cfg.transformer_layers_per_block[-1],
                                   context_dim=cfg.cross_attention_dim[-1], scale=cfg.mid_block_scale_factor, **kw)

        up, rch = [], ch[::-1]
        layers, heads = cfg.layers_per_block[::-1], cfg.attention_head_dim[::-1]
        tlayers, ctx = cfg.transformer_layers_per_block[::-1], cfg.cross_attention_dim[::-1]
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout, skip_in = cout, rch[i], rch[min(i + 1, n - 1)]
            pairs = [((prev if j == 0 else cout) + (skip_in if j == layers[i] else cout), cout)
                     for j in range(layers[i] + 1)]
            up.append(UNetBlock(pairs, len(pairs) if kind in ATTENTION_BLOCKS else 0, temb, heads=heads[i],
                                layers=tlayers[i], context_dim=ctx[i], resample="up" if i < n - 1 else None, **kw))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, policy, rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, 3, policy, rngs)
        self.dtype = policy.dtype
        self.remat = False  # set True for training: each ResNet and transformer is recomputed in backward

    def _run(self, module: nnx.Module, *args) -> jax.Array:
        if self.remat:
            return nnx.remat(lambda m, *a: m(*a))(module, *args)
        return module(*args)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        context = context.astype(self.dtype)
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._run(resnet, x, temb)
                if block.attentions is not None:
                    x = self._run(block.attentions[j], x, context)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)

        mid = self.mid_block
        x = self._run(mid.resnets[0], x, temb)
        x = self._run(mid.resnets[1], self._run(mid.attentions[0], x, context), temb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                x = self._run(resnet, jnp.concatenate([x, skips.pop()], axis=-1), temb)
                if block.attentions is not None:
                    x = self._run(block.attentions[j], x, context)
            if block.upsamplers is not None:
                # Upsample to the next skip's size: 2× unless the input size was not a multiple of 2^levels.
                x = block.upsamplers[0](x, skips[-1].shape[1:3])

        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

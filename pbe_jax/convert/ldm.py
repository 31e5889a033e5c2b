"""The CompVis/LDM single-file layout ("model.ckpt", "sd-v1-4.ckpt", "v1-5-pruned-emaonly.safetensors")
↔ diffusers' parameter names, for the UNet and the VAE, both ways, and the diffusers configs that the
tensors' shapes determine. Pure numpy and dictionaries.

Both directions read one table of (LDM prefix, diffusers prefix, kind of module) rows, built from the
model's structure: the number of levels, the layers per level, which levels have attention. `*_from_ldm`
reads that structure from the LDM keys, `*_to_ldm` from the diffusers config, so the two are inverse by
construction. A row's kind renames what follows its prefix:

- plain: nothing (`weight`, `bias` follow the prefix directly),
- resnet: LDM's `in_layers.0/2`, `emb_layers.1`, `out_layers.0/3`, `skip_connection` (UNet) or
  `nin_shortcut` (VAE) ↔ `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`,
- transformer: the same names on both sides (checked against the names a SpatialTransformer has),
- VAE attention: `norm`, `q`, `k`, `v`, `proj_out` (1×1 convolutions) ↔ `group_norm`, `to_q`, `to_k`,
  `to_v`, `to_out.0` (linears); diffusers' older `query`, `key`, `value`, `proj_attn` are read too.

Any key under the prefix that no row covers is a `WeightsError` naming the key: a checkpoint with parts
this port does not know (class embeddings, a different block layout) fails loudly instead of loading
half its weights.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import numpy as np

from pbe_jax.convert.weights import WeightsError
from pbe_jax.models.config import per_block

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_PARAMS = ("weight", "bias")
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTENTION_OLD = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # older diffusers
_TRANSFORMER = re.compile(r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(norm[123]|attn[12]\.to_(q|k|v|out\.0)"
                          r"|ff\.net\.(0\.proj|2)))\.(weight|bias)")


class _Row(NamedTuple):
    ldm: str  # prefixes, each ending in "."
    diffusers: str
    kind: str  # "plain", "unet_resnet", "vae_resnet", "transformer", "vae_attention"


class _Structure(NamedTuple):
    layers: tuple[int, ...]  # resnets per down level (up levels have one more)
    down_attention: tuple[bool, ...]  # per down level
    up_attention: tuple[bool, ...]  # per up block, in diffusers' order (deepest level first)
    mid_attention: bool


# ---------------------------------------------------------------------------------------------- tables

def _unet_table(s: _Structure) -> list[_Row]:
    rows = [_Row("time_embed.0.", "time_embedding.linear_1.", "plain"),
            _Row("time_embed.2.", "time_embedding.linear_2.", "plain"),
            _Row("input_blocks.0.0.", "conv_in.", "plain"),
            _Row("out.0.", "conv_norm_out.", "plain"), _Row("out.2.", "conv_out.", "plain"),
            _Row("middle_block.0.", "mid_block.resnets.0.", "unet_resnet")]
    if s.mid_attention:
        rows += [_Row("middle_block.1.", "mid_block.attentions.0.", "transformer"),
                 _Row("middle_block.2.", "mid_block.resnets.1.", "unet_resnet")]
    n, k = len(s.layers), 1
    for level, layers in enumerate(s.layers):
        down = f"down_blocks.{level}."
        for j in range(layers):
            rows.append(_Row(f"input_blocks.{k}.0.", f"{down}resnets.{j}.", "unet_resnet"))
            if s.down_attention[level]:
                rows.append(_Row(f"input_blocks.{k}.1.", f"{down}attentions.{j}.", "transformer"))
            k += 1
        if level < n - 1:
            rows.append(_Row(f"input_blocks.{k}.0.op.", f"{down}downsamplers.0.conv.", "plain"))
            k += 1
    k = 0
    for u, layers in enumerate(reversed(s.layers)):
        up, attention = f"up_blocks.{u}.", s.up_attention[u]
        for j in range(layers + 1):
            rows.append(_Row(f"output_blocks.{k}.0.", f"{up}resnets.{j}.", "unet_resnet"))
            if attention:
                rows.append(_Row(f"output_blocks.{k}.1.", f"{up}attentions.{j}.", "transformer"))
            if j == layers and u < n - 1:
                rows.append(_Row(f"output_blocks.{k}.{2 if attention else 1}.conv.", f"{up}upsamplers.0.conv.",
                                 "plain"))
            k += 1
    return rows


def _vae_table(s: _Structure) -> list[_Row]:
    rows = [_Row("quant_conv.", "quant_conv.", "plain"), _Row("post_quant_conv.", "post_quant_conv.", "plain")]
    for part in ("encoder", "decoder"):
        rows += [_Row(f"{part}.conv_in.", f"{part}.conv_in.", "plain"),
                 _Row(f"{part}.norm_out.", f"{part}.conv_norm_out.", "plain"),
                 _Row(f"{part}.conv_out.", f"{part}.conv_out.", "plain"),
                 _Row(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "vae_resnet"),
                 _Row(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "vae_resnet")]
        if s.mid_attention:
            rows.append(_Row(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "vae_attention"))
    n = len(s.layers)
    for level, layers in enumerate(s.layers):
        for j in range(layers):
            rows.append(_Row(f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.",
                             "vae_resnet"))
        if level < n - 1:
            rows.append(_Row(f"encoder.down.{level}.downsample.conv.",
                             f"encoder.down_blocks.{level}.downsamplers.0.conv.", "plain"))
    for u in range(n):  # LDM numbers the decoder's levels from the finest, diffusers from the deepest
        level = n - 1 - u
        for j in range(s.layers[level] + 1):
            rows.append(_Row(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{u}.resnets.{j}.", "vae_resnet"))
        if level > 0:
            rows.append(_Row(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{u}.upsamplers.0.conv.",
                             "plain"))
    return rows


# ------------------------------------------------------------------------------------------- renaming

def _rename_inside(kind: str, rest: str, value: np.ndarray, to_diffusers: bool, key: str):
    """The part of a key after its row's prefix, and the value, on the other side; None if unknown."""
    module, _, param = rest.rpartition(".")
    if param not in _PARAMS:
        return None
    if kind == "plain":
        return (param, value) if module == "" else None
    if kind == "transformer":
        return (rest, value) if _TRANSFORMER.fullmatch(rest) else None
    names = {"unet_resnet": _UNET_RESNET, "vae_resnet": _VAE_RESNET, "vae_attention": _VAE_ATTENTION}[kind]
    if not to_diffusers:
        names = {d: ldm for ldm, d in names.items()}
        if kind == "vae_attention":
            names.update(_VAE_ATTENTION_OLD)
    if module not in names:
        return None
    other = names[module]
    if kind == "vae_attention" and param == "weight" and other not in ("norm", "group_norm"):
        value = _conv_to_linear(value, key) if to_diffusers else _linear_to_conv(value, key)
    return f"{other}.{param}", value


def _conv_to_linear(a: np.ndarray, key: str) -> np.ndarray:
    if a.ndim == 2:
        return a
    if a.ndim == 4 and a.shape[2:] == (1, 1) or a.ndim == 3 and a.shape[2] == 1:
        return a.reshape(a.shape[:2])
    raise WeightsError(f"{key}: shape {a.shape} is not a 1x1 convolution or a linear layer")


def _linear_to_conv(a: np.ndarray, key: str) -> np.ndarray:
    a = _conv_to_linear(a, key)
    return a.reshape(a.shape + (1, 1))


def _rename(state: Mapping[str, Any], rows: list[_Row], to_diffusers: bool, source: str,
            prefix: str = "") -> dict[str, Any]:
    frm, to = (0, 1) if to_diffusers else (1, 0)
    by_prefix = {row[frm]: row for row in rows}
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts, row = key.split("."), None
        for m in range(len(parts) - 1, 0, -1):  # the longest row prefix that the key starts with
            row = by_prefix.get(".".join(parts[:m]) + ".")
            if row is not None:
                break
        renamed = row and _rename_inside(row.kind, key[len(row[frm]):], value, to_diffusers, prefix + key)
        if not renamed:
            raise WeightsError(f"{prefix + key}: no {'diffusers' if to_diffusers else 'LDM'} name for this "
                               f"{source} key (a part this port does not know, or a layout that does not "
                               f"fit the others)")
        new = row[to] + renamed[0]
        if new in out:
            raise WeightsError(f"{prefix + key}: another {source} key also maps to {new}")
        out[new] = renamed[1]
    return out


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _indices(keys, pattern: str) -> dict[int, list[str]]:
    """Keys grouped by the number that `pattern` (a regex with one group) captures at their start."""
    out: dict[int, list[str]] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            out.setdefault(int(m.group(1)), []).append(k)
    return out


def _contiguous(groups: dict[int, list[str]], start: int, prefix: str, what: str) -> None:
    expected = list(range(start, start + len(groups)))
    if sorted(groups) != expected:
        bad = next(i for i in sorted(groups) if i not in expected)
        raise WeightsError(f"{prefix}{groups[bad][0]}: {what} are not numbered {start}, {start + 1}, ... "
                           f"without gaps")




def _shape_of(ldm: Mapping[str, Any], prefix: str, what: str):
    """key → its tensor's shape; WeightsError naming the key when the file lacks it."""
    def shape(key: str) -> tuple:
        if key not in ldm:
            raise WeightsError(f"{prefix}{key}: missing; the {what} config cannot be read without it")
        return ldm[key].shape
    return shape


def _as_dict(config: Any) -> dict:
    return dict(config.to_dict() if hasattr(config, "to_dict") else config)


# ----------------------------------------------------------------------------------------------- UNet

def _unet_structure_from_ldm(ldm: Mapping[str, Any], prefix: str) -> _Structure:
    inputs = _indices(ldm, r"input_blocks\.(\d+)\.")
    inputs.pop(0, None)  # conv_in
    _contiguous(inputs, 1, prefix, "input_blocks")
    levels: list[list[int]] = [[]]
    for k in sorted(inputs):
        if any(key.startswith(f"input_blocks.{k}.0.op.") for key in inputs[k]):
            levels.append([])
        else:
            levels[-1].append(k)
    layers = tuple(len(level) for level in levels)
    down_attention = tuple(any(key.startswith(f"input_blocks.{k}.1.") for k in level for key in inputs[k])
                           for level in levels)
    outputs = _indices(ldm, r"output_blocks\.(\d+)\.")
    _contiguous(outputs, 0, prefix, "output_blocks")
    if outputs and len(outputs) != sum(n + 1 for n in layers):
        raise WeightsError(f"{prefix}output_blocks: {len(outputs)} blocks, but the input blocks' levels "
                           f"{list(layers)} need {sum(n + 1 for n in layers)} (one more per level)")
    up_attention, k = [], 0
    for n in reversed(layers):
        blocks = range(k, k + n + 1)
        up_attention.append(any(re.match(rf"output_blocks\.{b}\.1\.(?!conv\.)", key)
                                for b in blocks for key in outputs.get(b, ())))
        k += n + 1
    mid_attention = any(key.startswith("middle_block.1.") for key in ldm)
    return _Structure(layers, down_attention, tuple(up_attention), mid_attention)


def _unet_structure_from_config(config: Mapping[str, Any]) -> _Structure:
    n = len(config["block_out_channels"])
    down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)))
    up = tuple(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise WeightsError(f"config mid_block_type={mid!r}: the LDM layout has a cross-attention mid block")
    return _Structure(tuple(int(x) for x in per_block(config.get("layers_per_block", 2), n, "layers_per_block")),
                      tuple(t.startswith("CrossAttn") for t in down), tuple(t.startswith("CrossAttn") for t in up),
                      mid is not None)


def unet_from_ldm(sd: Mapping[str, np.ndarray], prefix: str = UNET_PREFIX) -> dict[str, np.ndarray]:
    """The UNet's weights of an LDM checkpoint (the keys under `prefix`; the rest is ignored) under
    diffusers' UNet2DConditionModel names. Levels and layers per level are read from the keys."""
    ldm = _strip(sd, prefix)
    return _rename(ldm, _unet_table(_unet_structure_from_ldm(ldm, prefix)), True, "LDM UNet", prefix)


def unet_to_ldm(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """A diffusers UNet2DConditionModel state dict under LDM names (without the `model.diffusion_model.`
    prefix). `config` is the diffusers UNet config (a dict, or an object with `to_dict`)."""
    rows = _unet_table(_unet_structure_from_config(_as_dict(config)))
    return _rename(state, rows, False, "diffusers UNet")


def _only_value(values: set, what: str) -> Any:
    if len(values) > 1:
        raise WeightsError(f"{what} differs between blocks ({sorted(values)}); this conversion reads one value")
    return next(iter(values)) if values else None


def _with_options(config: dict, options: dict, what: str) -> dict:
    for key, value in options.items():
        value = list(value) if isinstance(value, tuple) else value
        if key in config and config[key] != value:
            raise ValueError(f"{what} {key} is determined by the weights ({config[key]!r}); cannot set it to "
                             f"{value!r}")
        config[key] = value
    return config


def _level_value(values: list) -> Any:
    return values[0] if len(set(values)) == 1 else list(values)


def unet_config_from_ldm(sd: Mapping[str, np.ndarray], prefix: str = UNET_PREFIX, *, attention_head_dim: Any = 8,
                         sample_size: int = 64, **options: Any) -> dict:
    """The diffusers UNet2DConditionModel config that an LDM checkpoint's UNet tensors determine.

    Shapes give in/out channels, block_out_channels, layers_per_block, the block types (cross-attention
    where a level has transformers), cross_attention_dim, use_linear_projection (proj_in a linear rather
    than a 1x1 convolution) and transformer_layers_per_block. The number of heads cannot be read from the
    weights: `attention_head_dim` (heads per block, as diffusers' SD configs mean it) defaults to SD v1's 8.
    `options` adds other diffusers config entries that weights cannot show (norm_num_groups, norm_eps,
    flip_sin_to_cos, freq_shift, ...); contradicting a value the weights determine is a ValueError.
    """
    ldm = _strip(sd, prefix)
    s = _unet_structure_from_ldm(ldm, prefix)
    shape = _shape_of(ldm, prefix, "UNet")

    n, first = len(s.layers), 1
    block_out_channels = []
    for level, layers in enumerate(s.layers):
        if layers == 0:
            raise WeightsError(f"{prefix}input_blocks: level {level} has no resnet blocks")
        block_out_channels.append(int(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0]))
        first += layers + (level < n - 1)
    attn = [k for k in ldm if re.fullmatch(r".*\.transformer_blocks\.\d+\.attn2\.to_k\.weight", k)]
    proj_in = [k for k in ldm if k.endswith(".proj_in.weight")]

    def depth(block: str) -> int:  # transformer layers of one LDM attention block
        return len({m.group(1) for k in ldm if (m := re.match(rf"{re.escape(block)}transformer_blocks\.(\d+)\.", k))})

    k, depths = 1, []
    for level, layers in enumerate(s.layers):
        depths.append(depth(f"input_blocks.{k}.1.") if s.down_attention[level] else 1)
        k += layers + 1
    if s.mid_attention and not s.down_attention[-1]:
        depths[-1] = depth("middle_block.1.")  # diffusers' mid block takes the last level's depth
    config = {
        "sample_size": sample_size,
        "in_channels": int(shape("input_blocks.0.0.weight")[1]),
        "out_channels": int(shape("out.2.weight")[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in s.up_attention],
        "block_out_channels": block_out_channels,
        "layers_per_block": _level_value(list(s.layers)),
        "transformer_layers_per_block": _level_value(depths),
        "use_linear_projection": bool(_only_value({len(ldm[k].shape) == 2 for k in proj_in}, "proj_in's rank")),
        "attention_head_dim": list(attention_head_dim) if isinstance(attention_head_dim, tuple)
        else attention_head_dim,
    }
    cross = _only_value({int(ldm[k].shape[1]) for k in attn}, "cross_attention_dim")
    if cross is not None:
        config["cross_attention_dim"] = cross
    if not any(k.startswith("middle_block.") for k in ldm):
        config["mid_block_type"] = None
    return _with_options(config, options, "UNet config")


# ------------------------------------------------------------------------------------------------ VAE

def _vae_structure_from_ldm(ldm: Mapping[str, Any], prefix: str) -> _Structure:
    down = _indices(ldm, r"encoder\.down\.(\d+)\.")
    up = _indices(ldm, r"decoder\.up\.(\d+)\.")
    _contiguous(down, 0, prefix, "encoder.down levels")
    _contiguous(up, 0, prefix, "decoder.up levels")
    n = max(len(down), len(up))
    if down and up and len(down) != len(up):
        raise WeightsError(f"{prefix}encoder.down has {len(down)} levels but decoder.up has {len(up)}")
    blocks = _indices(ldm, r"encoder\.down\.0\.block\.(\d+)\.")
    layers = len(blocks) if blocks else max(len(_indices(ldm, r"decoder\.up\.0\.block\.(\d+)\.")) - 1, 0)
    mid_attention = any(re.match(r"(en|de)coder\.mid\.attn_1\.", k) for k in ldm)
    return _Structure((layers,) * n, (False,) * n, (False,) * n, mid_attention)


def vae_from_ldm(sd: Mapping[str, np.ndarray], prefix: str = VAE_PREFIX) -> dict[str, np.ndarray]:
    """The autoencoder's weights of an LDM checkpoint (the keys under `prefix`; the rest is ignored) under
    diffusers' AutoencoderKL names, the mid-block attention's 1x1 convolutions as linears."""
    ldm = _strip(sd, prefix)
    return _rename(ldm, _vae_table(_vae_structure_from_ldm(ldm, prefix)), True, "LDM VAE", prefix)


def vae_to_ldm(state: Mapping[str, np.ndarray], config: Any) -> dict[str, np.ndarray]:
    """A diffusers AutoencoderKL state dict under LDM names (without the `first_stage_model.` prefix), the
    attention's linears as 1x1 convolutions. Reads diffusers' older attention names (query, key, value,
    proj_attn) too."""
    config = _as_dict(config)
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        layers = _only_value(set(layers), "layers_per_block")
    s = _Structure((int(layers),) * n, (False,) * n, (False,) * n, bool(config.get("mid_block_add_attention", True)))
    return _rename(state, _vae_table(s), False, "diffusers VAE")


def vae_config_from_ldm(sd: Mapping[str, np.ndarray], prefix: str = VAE_PREFIX, sample_size: int = 512,
                        scaling_factor: float = 0.18215, **options: Any) -> dict:
    """The diffusers AutoencoderKL config that an LDM checkpoint's autoencoder tensors determine: in/out
    channels, block_out_channels (the encoder levels' convolutions), layers_per_block, latent_channels,
    whether quant_conv/post_quant_conv and the mid-block attention exist. `options` adds entries weights
    cannot show (norm_num_groups, ...); contradicting a value the weights determine is a ValueError."""
    ldm = _strip(sd, prefix)
    s = _vae_structure_from_ldm(ldm, prefix)
    shape = _shape_of(ldm, prefix, "VAE")

    n = len(s.layers)
    config = {
        "sample_size": sample_size,
        "in_channels": int(shape("encoder.conv_in.weight")[1]),
        "out_channels": int(shape("decoder.conv_out.weight")[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [int(shape(f"encoder.down.{i}.block.0.conv1.weight")[0]) for i in range(n)],
        "layers_per_block": s.layers[0] if n else 0,
        "latent_channels": int(shape("decoder.conv_in.weight")[1]),
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in ldm,
        "use_post_quant_conv": "post_quant_conv.weight" in ldm,
        "mid_block_add_attention": s.mid_attention,
    }
    if config["use_quant_conv"] and shape("quant_conv.weight")[0] != 2 * config["latent_channels"]:
        raise WeightsError(f"{prefix}quant_conv.weight: shape {shape('quant_conv.weight')} does not fit "
                           f"{config['latent_channels']} latent channels")
    return _with_options(config, options, "VAE config")

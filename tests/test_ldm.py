"""The CompVis/LDM single-file key layout ↔ diffusers names (pbe_jax.convert.ldm), checked against diffusers'
own single-file converters on tiny random models and on SD-1.x's full-size layout."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

from pbe_jax.convert import ldm
from pbe_jax.convert.weights import WeightsError
from pbe_jax.parity.reference import TINY

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

# diffusers' converter reads one layers_per_block for all levels, so "alt" (1, 2, 1 layers) is checked
# against it in a variant with 2 layers everywhere; the round trips and loading cover "alt" itself.
UNET_CONFIGS = {"sd": TINY["sd"]["unet"], "alt": TINY["alt"]["unet"],
                "alt_uniform": {**TINY["alt"]["unet"], "layers_per_block": 2}}
VAE_CONFIGS = {"sd": TINY["sd"]["vae"], "alt": TINY["alt"]["vae"]}
# Config entries that no weight shows; the tests pass them as options.
UNET_UNSEEN = ("norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift", "sample_size", "attention_head_dim")
OTHER_PARTS = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(3, np.float32),
               "betas": np.linspace(0, 1, 5), "model_ema.decay": np.array(0.999, np.float32)}


def _random(module, seed: int) -> dict[str, np.ndarray]:
    """A module's state dict with every tensor drawn afresh, so no two tensors of one shape are equal and
    a swapped name cannot go unnoticed (default inits repeat ones and zeros)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(tuple(v.shape)).astype(np.float32) for k, v in module.state_dict().items()}


@functools.cache
def unet(name: str):
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**UNET_CONFIGS[name])
    return dict(model.config), _random(model, 1)


@functools.cache
def vae(name: str):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**VAE_CONFIGS[name])
    return dict(model.config), _random(model, 2)


def checkpoint(name: str) -> dict[str, np.ndarray]:
    """A single-file checkpoint as LDM writes it: UNet and VAE under their prefixes, and other parts."""
    ucfg, ustate = unet(name)
    out = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(ustate, ucfg).items()}
    if name in VAE_CONFIGS:
        vcfg, vstate = vae(name)
        out.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(vstate, vcfg).items()})
    return {**out, **OTHER_PARTS}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert np.array_equal(a[k], b[k]), k


def unprefixed(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- against diffusers

@pytest.mark.parametrize("name", ["sd", "alt_uniform"])
def test_unet_matches_diffusers_converter(name):
    config, state = unet(name)
    ckpt = checkpoint(name)
    frozen = dict(config)
    converted = single_file.convert_ldm_unet_checkpoint(dict(ckpt), dict(config))
    assert config == frozen
    assert_same(converted, state)  # our LDM names are the ones diffusers reads
    assert_same(ldm.unet_from_ldm(ckpt), converted)  # and we read them as diffusers does


@pytest.mark.parametrize("name", ["sd", "alt"])
def test_vae_matches_diffusers_converter(name):
    config, state = vae(name)
    ckpt = checkpoint(name)
    converted = single_file.convert_ldm_vae_checkpoint(dict(ckpt), dict(config))
    assert_same(converted, state)
    assert_same(ldm.vae_from_ldm(ckpt), converted)
    if config["mid_block_add_attention"]:
        q = ckpt[ldm.VAE_PREFIX + "encoder.mid.attn_1.q.weight"]
        c = config["block_out_channels"][-1]
        assert q.shape == (c, c, 1, 1)  # LDM's 1x1 convolution, diffusers' linear
        assert state["encoder.mid_block.attentions.0.to_q.weight"].shape == (c, c)


def test_sd_layout_names():
    """The tiny "sd" model in LDM names: two levels of two layers, as SD-1.x's four levels are numbered."""
    ckpt = unprefixed(checkpoint("sd"), ldm.UNET_PREFIX)
    for key in ("input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.2.0.in_layers.2.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "input_blocks.5.0.emb_layers.1.bias",
                "middle_block.1.proj_in.weight", "middle_block.2.out_layers.3.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.3.1.proj_out.weight",
                "output_blocks.5.1.norm.bias", "time_embed.2.weight", "out.0.weight", "out.2.bias"):
        assert key in ckpt, key
    assert "input_blocks.4.1.norm.weight" not in ckpt and "output_blocks.5.2.conv.weight" not in ckpt
    assert ckpt["input_blocks.1.1.proj_in.weight"].ndim == 4  # SD-1.x: convolution projections
    vae_keys = unprefixed(checkpoint("sd"), ldm.VAE_PREFIX)
    for key in ("encoder.down.0.downsample.conv.weight", "encoder.norm_out.bias", "decoder.up.1.upsample.conv.bias",
                "decoder.up.0.block.0.nin_shortcut.weight", "decoder.mid.block_2.conv1.weight", "quant_conv.bias"):
        assert key in vae_keys, key
    assert "decoder.up.0.upsample.conv.weight" not in vae_keys


def test_alt_layout_names():
    """Levels of 1, 2, 1 layers (no diffusers converter reads them): the numbering worked out by hand."""
    ckpt = checkpoint("alt")
    names = {"input_blocks.1.0.in_layers.0.weight": "down_blocks.0.resnets.0.norm1.weight",
             "input_blocks.2.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
             "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight":
                 "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q.weight",
             "input_blocks.5.0.op.bias": "down_blocks.1.downsamplers.0.conv.bias",
             "input_blocks.6.1.proj_in.weight": "down_blocks.2.attentions.0.proj_in.weight",
             "middle_block.1.transformer_blocks.1.ff.net.2.bias":
                 "mid_block.attentions.0.transformer_blocks.1.ff.net.2.bias",
             "output_blocks.1.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
             "output_blocks.4.1.norm.weight": "up_blocks.1.attentions.2.norm.weight",
             "output_blocks.4.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
             "output_blocks.6.0.skip_connection.weight": "up_blocks.2.resnets.1.conv_shortcut.weight"}
    ours = ldm.unet_from_ldm(ckpt)
    for old, new in names.items():
        assert ours[new] is ckpt[ldm.UNET_PREFIX + old], old
    assert not any(k.startswith(ldm.UNET_PREFIX + "output_blocks.7.") for k in ckpt)
    assert ckpt[ldm.UNET_PREFIX + "input_blocks.3.1.proj_in.weight"].ndim == 2  # linear projections
    assert not any("mid.attn_1" in k for k in ckpt)  # mid_block_add_attention=False
    assert ldm.vae_from_ldm(ckpt)["decoder.up_blocks.0.resnets.2.conv2.weight"] is \
        ckpt[ldm.VAE_PREFIX + "decoder.up.2.block.2.conv2.weight"]


def test_sd_full_size_layout():
    """SD-1.x's UNet (4 levels, 2 layers) and VAE at full size, shapes only (meta tensors, zero views):
    686 and 248 tensors, SD-1.x's names and shapes, diffusers' converter gives back every name."""
    from pbe_jax.models import UNetConfig, VAEConfig

    with torch.device("meta"):
        u = diffusers.UNet2DConditionModel(**UNetConfig().to_dict())
        v = diffusers.AutoencoderKL(**VAEConfig().to_dict())
    zero = np.zeros((), np.float32)
    ustate = {k: np.broadcast_to(zero, tuple(t.shape)) for k, t in u.state_dict().items()}
    vstate = {k: np.broadcast_to(zero, tuple(t.shape)) for k, t in v.state_dict().items()}
    ul, vl = ldm.unet_to_ldm(ustate, dict(u.config)), ldm.vae_to_ldm(vstate, dict(v.config))
    assert (len(ul), len(vl)) == (686, 248)
    for key, shape in {"input_blocks.0.0.weight": (320, 9, 3, 3), "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
                       "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
                       "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
                       "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
                       "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                       "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
                       "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
                       "output_blocks.3.0.skip_connection.weight": (1280, 2560, 1, 1)}.items():
        assert ul[key].shape == shape, key
    for key, shape in {"encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "decoder.up.3.upsample.conv.weight":
                       (512, 512, 3, 3), "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                       "quant_conv.weight": (8, 8, 1, 1)}.items():
        assert vl[key].shape == shape, key
    ckpt = {**{ldm.UNET_PREFIX + k: a for k, a in ul.items()}, **{ldm.VAE_PREFIX + k: a for k, a in vl.items()}}
    assert sorted(single_file.convert_ldm_unet_checkpoint(dict(ckpt), dict(u.config))) == sorted(ustate)
    assert sorted(single_file.convert_ldm_vae_checkpoint(dict(ckpt), dict(v.config))) == sorted(vstate)
    assert sorted(ldm.unet_from_ldm(ckpt)) == sorted(ustate) and sorted(ldm.vae_from_ldm(ckpt)) == sorted(vstate)
    assert UNetConfig.from_dict(ldm.unet_config_from_ldm(ckpt)) == UNetConfig()
    assert VAEConfig.from_dict(ldm.vae_config_from_ldm(ckpt)) == VAEConfig()


# ---------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", ["sd", "alt"])
def test_round_trips(name):
    ucfg, ustate = unet(name)
    vcfg, vstate = vae(name)
    assert_same(ldm.unet_from_ldm(ldm.unet_to_ldm(ustate, ucfg), prefix=""), ustate)
    assert_same(ldm.vae_from_ldm(ldm.vae_to_ldm(vstate, vcfg), prefix=""), vstate)
    ckpt = checkpoint(name)
    assert_same(ldm.unet_to_ldm(ldm.unet_from_ldm(ckpt), ucfg), unprefixed(ckpt, ldm.UNET_PREFIX))
    assert_same(ldm.vae_to_ldm(ldm.vae_from_ldm(ckpt), vcfg), unprefixed(ckpt, ldm.VAE_PREFIX))
    # the config read from the shapes drives the way back as well as the model's own
    derived = ldm.unet_config_from_ldm(ckpt)
    assert_same(ldm.unet_to_ldm(ldm.unet_from_ldm(ckpt), derived), unprefixed(ckpt, ldm.UNET_PREFIX))


def test_old_vae_attention_names():
    config, state = vae("sd")
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in state.items():
        for new, before in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{before}.")
        renamed[k] = v
    assert renamed.keys() != state.keys()
    assert_same(ldm.vae_to_ldm(renamed, config), ldm.vae_to_ldm(state, config))


# -------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", ["sd", "alt"])
def test_configs_from_shapes(name):
    from pbe_jax.convert.diffusers import from_state_dict
    from pbe_jax.models import UNetConfig, VAEConfig

    ucfg, ustate = unet(name)
    vcfg, vstate = vae(name)
    ckpt = checkpoint(name)
    plain = ldm.unet_config_from_ldm(ckpt, attention_head_dim=UNET_CONFIGS[name]["attention_head_dim"])
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "up_block_types", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block"):
        assert _per_block(plain[key]) == _per_block(ucfg[key]), key
    options = {k: ucfg[k] for k in UNET_UNSEEN}
    derived = ldm.unet_config_from_ldm(ckpt, **options)
    assert UNetConfig.from_dict(derived) == UNetConfig.from_dict(ucfg)
    torch_model = diffusers.UNet2DConditionModel(**derived)  # diffusers builds the same network from it
    assert {k: tuple(t.shape) for k, t in torch_model.state_dict().items()} == {k: v.shape for k, v in ustate.items()}
    with pytest.raises(ValueError, match="in_channels"):
        ldm.unet_config_from_ldm(ckpt, in_channels=4)

    vderived = ldm.vae_config_from_ldm(ckpt, norm_num_groups=vcfg["norm_num_groups"])
    for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
        assert _per_block(vderived[key]) == _per_block(vcfg[key]), key
    assert vderived["sample_size"] == 512 and vderived["scaling_factor"] == 0.18215
    same = {**vderived, "sample_size": vcfg["sample_size"], "scaling_factor": vcfg["scaling_factor"]}
    assert VAEConfig.from_dict(same) == VAEConfig.from_dict(vcfg)

    # what a loader does with a single file: configs from the shapes, weights renamed, the JAX models built
    unet_jax = from_state_dict("unet", derived, ldm.unet_from_ldm(ckpt), source="ldm")
    vae_jax = from_state_dict("vae", vderived, ldm.vae_from_ldm(ckpt), source="ldm")
    kernel = np.asarray(unet_jax.conv_in.kernel[...])
    assert np.array_equal(kernel, ckpt[ldm.UNET_PREFIX + "input_blocks.0.0.weight"].transpose(2, 3, 1, 0))
    assert np.array_equal(np.asarray(vae_jax.quant_conv.bias[...]), ckpt[ldm.VAE_PREFIX + "quant_conv.bias"])


def _per_block(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def test_configs_against_diffusers_ldm_config():
    """diffusers' config from an LDM yaml (here: the tiny "sd" model's) equals ours from the shapes."""
    ucfg, _ = unet("sd")
    vcfg, _ = vae("sd")
    unet_params = dict(in_channels=9, out_channels=4, model_channels=32, channel_mult=[1, 2],
                       attention_resolutions=[1], num_res_blocks=2, transformer_depth=1, context_dim=24, num_heads=4)
    ddconfig = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, in_channels=3, out_ch=3, z_channels=4)
    original = {"model": {"params": {"unet_config": {"params": unet_params}, "scale_factor": 0.18215,
                                     "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    ckpt = checkpoint("sd")
    with warnings.catch_warnings():  # image_size is deprecated there; the checkpoint cannot tell it
        warnings.simplefilter("ignore")
        theirs = single_file.create_unet_diffusers_config_from_ldm(original, ckpt, image_size=32)
        vtheirs = single_file.create_vae_diffusers_config_from_ldm(original, ckpt, image_size=32)
    ours = ldm.unet_config_from_ldm(ckpt, attention_head_dim=4, sample_size=16)
    for key, value in ours.items():
        assert _per_block(theirs[key]) == _per_block(value), key
    vours = ldm.vae_config_from_ldm(ckpt, sample_size=32)
    for key, value in vtheirs.items():
        assert _per_block(vours[key]) == _per_block(value), key


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", ["label_emb.0.0.weight", "input_blocks.1.0.in_layers.1.weight",
                                 "input_blocks.1.1.transformer_blocks.0.attn3.to_q.weight",
                                 "middle_block.0.emb_layers.1.scale", "out.1.weight"])
def test_unknown_unet_key(bad):
    ckpt = checkpoint("sd")
    ckpt[ldm.UNET_PREFIX + bad] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match=ldm.UNET_PREFIX.replace(".", r"\.") + bad.replace(".", r"\.")):
        ldm.unet_from_ldm(ckpt)
    ldm.vae_from_ldm(ckpt)  # the VAE does not read the UNet's keys


def test_unknown_keys_elsewhere():
    ckpt = checkpoint("sd")
    with pytest.raises(WeightsError, match=r"first_stage_model\.encoder\.down\.0\.attn\.0\.q\.weight"):
        ldm.vae_from_ldm({**ckpt, ldm.VAE_PREFIX + "encoder.down.0.attn.0.q.weight": np.zeros(3)})
    with pytest.raises(WeightsError, match="input_blocks"):  # a stray block number: the layout does not fit
        ldm.unet_from_ldm({**ckpt, ldm.UNET_PREFIX + "input_blocks.9.0.in_layers.0.weight": np.zeros(3)})
    config, state = unet("sd")
    with pytest.raises(WeightsError, match=r"class_embedding\.linear_1\.weight"):
        ldm.unet_to_ldm({**state, "class_embedding.linear_1.weight": np.zeros(3)}, config)
    vconfig, vstate = vae("sd")
    with pytest.raises(WeightsError, match=r"decoder\.up_blocks\.0\.upsamplers\.1\.conv\.weight"):
        ldm.vae_to_ldm({**vstate, "decoder.up_blocks.0.upsamplers.1.conv.weight": np.zeros(3)}, vconfig)

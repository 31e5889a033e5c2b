"""Whole single files in the original release's layout: a diffusers folder → an ldm file written here → loaded
here equals the original weights bit for bit; the same file through diffusers' own converters gives the
diffusers state dicts bit for bit; sampling from it gives the same images; SD v1 files initialise training;
bad files are refused by name."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

from pbe_jax.convert import WeightsError, convert, ldm, load, mapping, single_file
from pbe_jax.convert.__main__ import main as convert_main
from pbe_jax.convert.ldm_file import CONFIGS_KEY, load_sd_v1, load_single_file, save_ldm, schedule_buffers
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.parity import reference

ROOT = Path(__file__).resolve().parents[1]
BUFFERS = set(schedule_buffers(NoiseSchedule()))
POSITION_IDS = single_file.VISION + "embeddings.position_ids"


def assert_same_models(a, b):
    for comp in ("unet", "vae", "image_encoder"):
        pa, pb = mapping.module_params(getattr(a, comp)), mapping.module_params(getattr(b, comp))
        assert pa.keys() == pb.keys(), comp
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), (comp, k)


@pytest.fixture(scope="module")
def exported(tiny_folder, tmp_path_factory):
    """{name: (folder, models, .safetensors file)} for the two tiny configurations."""
    out = {}
    for name in ("sd", "alt"):
        folder = tiny_folder(name)
        models = load(folder)
        out[name] = folder, models, save_ldm(models, tmp_path_factory.mktemp(name) / "model.safetensors")
    return out


@pytest.mark.parametrize("name", ["sd", "alt"])
def test_export_reads_back_bit_for_bit_in_both_file_forms(exported, name, tmp_path):
    folder, models, path = exported[name]
    back = load_single_file(path)
    assert_same_models(models, back)
    assert back.extra_configs == models.extra_configs
    ckpt = save_ldm(models, tmp_path / "model.ckpt")
    raw = torch.load(ckpt, weights_only=True)
    assert set(raw) == {"state_dict", CONFIGS_KEY}  # the original's checkpoints: {"state_dict": …}
    assert set(raw["state_dict"]) == set(safetensors.numpy.load_file(path))
    assert_same_models(models, load_single_file(ckpt))


def test_the_file_is_the_originals_layout_for_diffusers_converters(exported, monkeypatch):
    """diffusers' own converters (independent of this port) turn the file written here into the very state
    dicts of the diffusers folder it came from; the file holds nothing but the original's weights, its
    schedule buffers and the CLIP tower's position_ids."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from diffusers.pipelines.stable_diffusion import convert_from_ckpt
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder, _, path = exported["sd"]
    sd = safetensors.numpy.load_file(path)
    prefixes = (ldm.UNET_PREFIX, ldm.VAE_PREFIX, single_file.VISION, single_file.MAPPER, single_file.FINAL_LN,
                "proj_out.", "learnable_vector")
    assert {k for k in sd if not k.startswith(prefixes)} == BUFFERS
    assert sd[POSITION_IDS].dtype == np.int64

    def diffusers_state(component, file):
        return safetensors.numpy.load_file(folder / component / file)

    def same(ours, theirs):
        assert sorted(ours) == sorted(theirs)
        for k in theirs:
            a = np.asarray(ours[k].numpy() if isinstance(ours[k], torch.Tensor) else ours[k])
            assert a.dtype == theirs[k].dtype and np.array_equal(a, theirs[k]), k

    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    same(convert_ldm_unet_checkpoint(dict(sd), dict(unet_cfg)), diffusers_state("unet", "diffusion_pytorch_model.safetensors"))
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    same(convert_ldm_vae_checkpoint(dict(sd), dict(vae_cfg)), diffusers_state("vae", "diffusion_pytorch_model.safetensors"))

    tiny = CLIPVisionConfig(**reference.TINY["sd"]["image_encoder"])
    checkpoint = {k: torch.from_numpy(v) for k, v in sd.items()}
    if not hasattr(CLIPVisionModel(tiny), "vision_model"):  # transformers 5: no vision_model level, no buffer
        checkpoint = {k.replace(single_file.VISION, "cond_stage_model.transformer."): v
                      for k, v in checkpoint.items() if k != POSITION_IDS}
    monkeypatch.setattr(convert_from_ckpt, "CLIPVisionConfig", types.SimpleNamespace(from_pretrained=lambda *a, **k: tiny))
    encoder = convert_from_ckpt.convert_paint_by_example_checkpoint(dict(checkpoint), local_files_only=True)
    canon = lambda k: "model.vision_model." + k[6:] if k.startswith("model.") and "vision_model" not in k else k  # noqa: E731
    theirs = {canon(k): v.detach().numpy() for k, v in encoder.state_dict().items()}
    same(theirs, {canon(k): v for k, v in diffusers_state("image_encoder", "model.safetensors").items()})
    # The schedule buffers are the original's: its DDPM schedule from SD's betas, accumulated in float64 and
    # stored as float32 (diffusers accumulates in float32: 2e-6 apart at the end of the schedule).
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_array_equal(sd["alphas_cumprod"], np.cumprod(1 - betas).astype(np.float32))
    np.testing.assert_allclose(sd["alphas_cumprod"], NoiseSchedule().alphas_cumprod, rtol=1e-5)


def test_a_model_exported_to_ldm_samples_identical_images(exported, tmp_path):
    from pbe_jax.pipeline import PaintByExample

    _, models, path = exported["sd"]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:20] = 255
    ref = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    kwargs = dict(steps=3, height=32, width=32, seed=3)
    want = PaintByExample(models)(image, mask, ref, **kwargs)
    got = PaintByExample.from_pretrained(path)(image, mask, ref, **kwargs)
    assert want.dtype == np.uint8 and np.array_equal(want, got)


def test_cli_and_sample_take_single_files(exported, tmp_path):
    sys.path.insert(0, str(ROOT))
    import sample

    folder, models, path = exported["sd"]
    assert convert_main([str(folder), str(tmp_path / "model.ckpt"), "--format", "ldm", "--dtype", "float16"]) == 0
    assert convert_main([str(tmp_path / "model.ckpt"), str(tmp_path / "jax")]) == 0  # → this project's checkpoint
    back = load(tmp_path / "jax")
    half = {k: v.astype(np.float16).astype(np.float32) for k, v in mapping.module_params(models.unet).items()}
    assert all(np.array_equal(half[k], v) for k, v in mapping.module_params(back.unet).items())
    assert convert(path, tmp_path / "diffusers", to="diffusers") == "diffusers"
    assert_same_models(models, load(tmp_path / "diffusers"))
    rng = np.random.default_rng(1)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "src.png")
    m = np.zeros((32, 32), np.uint8)
    m[4:20, 6:30] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    edit = ["--image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"), "--reference",
            str(tmp_path / "ref.png"), "--steps", "2", "--size", "32", "--compile-cache", "off"]
    assert sample.main(["--pretrained", str(path), *edit, "--out", str(tmp_path / "a.png")]) == 0
    assert sample.main(["--pretrained", str(folder), *edit, "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def _perturbed(a: np.ndarray) -> np.ndarray:
    return (a + 1).astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else a


def test_ema_weights_are_chosen_unless_told_otherwise(exported, tmp_path):
    _, models, path = exported["sd"]
    sd, meta = single_file.read_file(path)
    key = ldm.UNET_PREFIX + "out.2.weight"  # conv_out
    ema = {**sd, single_file.ema_name(key): _perturbed(sd[key]), "model_ema.num_updates": np.array(7)}
    safetensors.numpy.save_file(ema, tmp_path / "ema.safetensors", metadata=meta)
    conv_out = lambda m: np.asarray(m.unet.conv_out.kernel[...])  # noqa: E731
    assert np.array_equal(conv_out(load(tmp_path / "ema.safetensors")), conv_out(models) + 1)
    assert np.array_equal(conv_out(load(tmp_path / "ema.safetensors", ema=False)), conv_out(models))


def test_sd_v1_files_initialise_training_and_configs_come_from_shapes(tiny_folder, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from pbe_jax.convert.init import from_stable_diffusion
    from pbe_jax.train import config as train_config
    from pbe_jax.train.trainer import models_of

    models = load(tiny_folder("sd"))
    unet_state = mapping.to_torch(models.unet)
    # an SD v1 UNet: 4 input channels (contiguous: safetensors.numpy.save_file writes a strided view wrongly)
    unet_state["conv_in.weight"] = np.ascontiguousarray(unet_state["conv_in.weight"][:, :4])
    unet_cfg = {**models.unet.config.to_dict(), "in_channels": 4}
    sd = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(unet_state, unet_cfg).items()}
    sd.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(mapping.to_torch(models.vae),
                                                                 models.vae.config.to_dict()).items()})
    sd[single_file.TEXT + "embeddings.token_embedding.weight"] = np.zeros((10, 8), np.float32)
    sd[single_file.ema_name(ldm.UNET_PREFIX + "input_blocks.0.0.bias")] = _perturbed(sd[ldm.UNET_PREFIX + "input_blocks.0.0.bias"])
    configs = json.dumps({"unet": unet_cfg, "vae": models.vae.config.to_dict()})
    safetensors.numpy.save_file(sd, tmp_path / "sd-v1.safetensors", metadata={CONFIGS_KEY: configs})
    vision = {k: v for k, v in reference.TINY["sd"]["image_encoder"].items() if k != "projection_dim"}
    CLIPModel(CLIPConfig(vision_config=vision, projection_dim=12, text_config=dict(
        hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1))).save_pretrained(tmp_path / "clip")

    got = from_stable_diffusion(tmp_path / "sd-v1.safetensors", tmp_path / "clip")
    kernel = np.asarray(got.unet.conv_in.kernel[...])  # HWIO: the five new input channels start at zero
    assert kernel.shape[2] == 9 and np.all(kernel[:, :, 4:] == 0)
    np.testing.assert_array_equal(kernel[:, :, :4], np.asarray(models.unet.conv_in.kernel[...])[:, :, :4])
    np.testing.assert_array_equal(np.asarray(got.unet.conv_in.bias[...]), np.asarray(models.unet.conv_in.bias[...]) + 1)
    assert_same_models(types.SimpleNamespace(unet=models.vae, vae=models.vae, image_encoder=models.vae),
                       types.SimpleNamespace(unet=got.vae, vae=got.vae, image_encoder=got.vae))
    cfg = train_config.from_dict({"model": {"init": "sd", "sd_file": str(tmp_path / "sd-v1.safetensors"),
                                            "clip_folder": str(tmp_path / "clip"), "dtype": "float32"}})
    assert np.array_equal(np.asarray(models_of(cfg).unet.conv_in.kernel[...]), kernel)
    both = train_config.from_dict({"model": {"init": "sd", "sd_file": "x.ckpt", "sd_folder": "y"}})
    with pytest.raises(ValueError, match="not both"):
        models_of(both)

    # Configs from the shapes alone (a file without this project's metadata), SD v1's defaults for the rest.
    derived = ldm.unet_config_from_ldm(sd)
    assert derived["in_channels"] == 4 and list(derived["block_out_channels"]) == list(unet_cfg["block_out_channels"])
    assert derived["cross_attention_dim"] == unet_cfg["cross_attention_dim"]


def test_bad_files_are_refused_naming_file_key_and_shapes(exported, tmp_path):
    _, models, path = exported["sd"]
    sd, meta = single_file.read_file(path)

    def write(name, tensors):
        safetensors.numpy.save_file(tensors, tmp_path / name, metadata=meta)
        return tmp_path / name

    key = ldm.UNET_PREFIX + "out.2.weight"
    wrong = write("wrong.safetensors", {**sd, key: np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match=r"wrong\.safetensors") as e:
        load(wrong)
    assert "conv_out.weight" in str(e.value) and "(3, 3, 3, 3)" in str(e.value) and str(tuple(sd[key].shape)) in str(e.value)
    missing = write("missing.safetensors", {k: v for k, v in sd.items() if k != "proj_out.weight"})
    with pytest.raises(WeightsError, match=r"missing\.safetensors.*proj_out"):
        load(missing)
    sdxl = write("sdxl.safetensors", {**sd, "conditioner.embedders.0.model.x": np.zeros(1, np.float32)})
    with pytest.raises(WeightsError, match=r"sdxl\.safetensors: unsupported: this looks like an SDXL"):
        load(sdxl)
    text = {k: v for k, v in sd.items() if not k.startswith(single_file.VISION)}
    inpaint = write("inpaint.safetensors", {**text, single_file.TEXT + "embeddings.token_embedding.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(WeightsError, match=r"inpaint\.safetensors: unsupported: this looks like an SD v1 inpainting"):
        load(inpaint)
    (tmp_path / "cut.ckpt").write_bytes(open(save_ldm(models, tmp_path / "whole.ckpt"), "rb").read()[:5000])
    with pytest.raises(WeightsError, match=r"cut\.ckpt.*truncated"):
        load(tmp_path / "cut.ckpt")
    sd1 = {**text, single_file.TEXT + "embeddings.token_embedding.weight": np.zeros((4, 4), np.float32)}
    sd1[single_file.CONV_IN] = np.ascontiguousarray(sd1[single_file.CONV_IN][:, :4])
    with pytest.raises(WeightsError, match="SD v1 text-to-image checkpoint, not a Paint-by-Example model"):
        load(write("sd1.safetensors", sd1))
    with pytest.raises(WeightsError, match="a Paint-by-Example checkpoint, not SD v1"):
        load_sd_v1(path)
    with pytest.raises(ValueError, match="an ldm file is .safetensors"):
        save_ldm(models, tmp_path / "model.bin")


def test_a_full_size_release_file_derives_sd14_configs():
    """A file without this project's metadata: the configs derived from the shapes of a full-size release
    layout (no memory: zero-strided arrays) are this port's SD-1.4 / ViT-L/14 configs."""
    from pbe_jax.models import (AutoencoderKL, CLIPVisionConfig, PaintByExampleImageEncoder, Policy,
                                UNet2DConditionModel, UNetConfig, VAEConfig)

    def torch_state(cls, config):
        _, flat = mapping.abstract_model(cls, config, Policy())
        return {mapping.torch_name(p): np.broadcast_to(np.float32(0), mapping.torch_shape(p, v.get_value().shape))
                for p, v in flat.items()}

    unet, vae, enc = UNetConfig(), VAEConfig(), CLIPVisionConfig()
    sd = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(torch_state(UNet2DConditionModel, unet),
                                                              unet.to_dict()).items()}
    sd.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(torch_state(AutoencoderKL, vae), vae.to_dict()).items()})
    sd.update(single_file.image_encoder_to_ldm(torch_state(PaintByExampleImageEncoder, enc)))
    assert single_file.detect(sd) == "pbe" and len(sd) == 1390  # UNet 686, VAE 248, encoder and bottleneck 456
    assert UNetConfig.from_dict(ldm.unet_config_from_ldm(sd)) == unet
    assert VAEConfig.from_dict(ldm.vae_config_from_ldm(sd)) == vae
    assert CLIPVisionConfig.from_dict(single_file.image_encoder_config_from_ldm(sd)) == enc

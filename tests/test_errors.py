"""Bad input fails with a message that names the file, the key and the shapes."""
import json
import shutil

import numpy as np
import pytest
import torch

from pbe_jax.convert import WeightsError, load, load_component
from pbe_jax.convert.weights import load_file, save_safetensors
from pbe_jax.models import ConfigError, UNetConfig, VAEConfig


@pytest.fixture
def folder(tiny_folder, tmp_path):
    dst = tmp_path / "pipe"
    shutil.copytree(tiny_folder("sd"), dst)
    return dst


def test_missing_component(folder):
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=r"has no vae/ folder.*model_index.json lists it"):
        load(folder)


def test_missing_weights_file(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no weights in .*unet.*diffusion_pytorch_model.safetensors"):
        load(folder)


def test_truncated_safetensors(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors: cannot read safetensors.*truncated"):
        load(folder)


class NotAWeight:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_that_needs_more_than_weights_is_refused(folder, capsys):
    vae = folder / "vae"
    state = load_file(vae / "diffusion_pytorch_model.safetensors")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    payload = {k: torch.from_numpy(v) for k, v in state.items()}
    payload["extra"] = NotAWeight()
    torch.save(payload, vae / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.bin: refusing to load.*weights_only"):
        load(folder)
    assert "this pickle runs code" not in capsys.readouterr().out


def test_unsupported_block_type_names_key_and_value(folder):
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unet/config.json.*down_block_types.*'SimpleCrossAttnDownBlock2D'"):
        load(folder)


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("resnet_time_scale_shift", "scale_shift"),
                                       ("only_cross_attention", True)])
def test_unsupported_unet_options_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value!r} is not supported"):
        UNetConfig.from_dict({key: value})


def test_unknown_config_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown config keys \['brand_new_option'\]"):
        UNetConfig.from_dict({"brand_new_option": 3})
    with pytest.raises(ConfigError, match=r"up_block_types"):
        VAEConfig.from_dict({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
                             "block_out_channels": [8, 16]})


def test_wrong_shape_names_key_and_both_shapes(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)  # SD's 4 input channels, not 9
    save_safetensors(state, path)
    with pytest.raises(WeightsError, match=r"conv_in.weight: shape \(32, 4, 3, 3\) in the weights, "
                                           r"\(32, 9, 3, 3\) in the model"):
        load_component(folder / "unet", "unet")


def test_missing_and_unexpected_keys_are_listed(folder):
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["decoder.up_blocks.0.resnets.0.conv1.bias_typo"] = state.pop("decoder.up_blocks.0.resnets.0.conv1.bias")
    save_safetensors(state, path)
    with pytest.raises(WeightsError) as e:
        load_component(folder / "vae", "vae")
    msg = str(e.value)
    assert "missing decoder.up_blocks.0.resnets.0.conv1.bias (expected shape (32,))" in msg
    assert "unexpected decoder.up_blocks.0.resnets.0.conv1.bias_typo" in msg
    assert "2 problems" in msg


def test_config_that_does_not_match_weights(folder):
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_linear_projection"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"proj_in.weight: shape \(32, 32, 1, 1\) in the weights, \(32, 32\)"):
        load_component(folder / "unet", "unet")


def test_invalid_json_config(folder):
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"vae/config.json: not valid JSON"):
        load(folder)

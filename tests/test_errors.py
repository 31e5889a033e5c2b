"""Bad input fails with a message that names the file, the key and the shapes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pbe_jax.convert import WeightsError, load, load_component
from pbe_jax.convert.weights import load_file, save_safetensors
from pbe_jax.models import ConfigError, UNetConfig, VAEConfig
from pbe_jax.train import config as config_lib


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


ROOT = Path(__file__).resolve().parents[1]


def run_train_py(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--compile-cache", "off", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("item, sentence", [
    ("steps=abc", "steps=abc: steps takes an integer, not 'abc'"),
    ("steps=1.5", "steps=1.5: steps takes an integer, not '1.5'"),
    ("steps=True", "steps=True: steps takes an integer, not 'True'"),
    ("data.batch_size=abc", "data.batch_size=abc: data.batch_size takes an integer, not 'abc'"),
    ("optim.lr=fast", "optim.lr=fast: optim.lr takes a number, not 'fast'"),
    ("model.remat=yes", "model.remat=yes: model.remat takes True or False, not 'yes'"),
    ("model.lora=3", "model.lora=3: model.lora is a group of settings, set one of them: model.lora.rank, "),
    ("steps.x=1", "config key 'steps.x' goes deeper than a setting: steps is a value"),
])
def test_override_value_of_the_wrong_type_is_refused(item, sentence):
    with pytest.raises(ValueError) as e:
        config_lib.override(config_lib.load("tiny"), [item])
    assert str(e.value).startswith(sentence)


def test_override_values_of_every_kind_parse():
    cfg = config_lib.override(config_lib.load("tiny"), [
        "steps=1e3", "seed=7", "optim.lr=1e-4", "optim.clip_norm=1", "model.remat=True", "model.ema=false",
        "data.path=123", "data.name='coco/2017'", "data.data_dir=None", "data.annotations=a.json",
        "model.lora.train=[conv_in, bottleneck]", "data.extra_colours=pink", "model.trainable=['unet']",
        "model.unet.norm_num_groups=8", "model.vae.block_out_channels=[16, 32]"])
    assert cfg.steps == 1000 and isinstance(cfg.steps, int) and cfg.seed == 7
    assert cfg.optim.lr == 1e-4 and cfg.optim.clip_norm == 1.0 and isinstance(cfg.optim.clip_norm, float)
    assert cfg.model.remat is True and cfg.model.ema is False
    assert cfg.data.path == "123" and cfg.data.name == "coco/2017"
    assert cfg.data.data_dir is None and cfg.data.annotations == "a.json"
    assert cfg.model.lora.train == ("conv_in", "bottleneck") and cfg.data.extra_colours == ("pink",)
    assert cfg.model.trainable == ("unet",)
    assert cfg.model.unet["norm_num_groups"] == 8 and cfg.model.vae["block_out_channels"] == [16, 32]


def test_train_py_bad_value_exits_1_before_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    result = run_train_py("--workdir", str(workdir), "steps=abc")
    assert result.returncode == 1, result.stderr
    assert "error: steps=abc: steps takes an integer, not 'abc'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_train_py_show_config_needs_no_workdir():
    result = run_train_py("--show-config", "steps=10")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 10

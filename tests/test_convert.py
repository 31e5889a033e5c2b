"""Conversion: diffusers folders ↔ JAX, this project's checkpoint, the CLI, and export that diffusers opens."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pbe_jax.convert import convert, is_checkpoint, load, mapping, save
from pbe_jax.parity import compare as cmp, reference

from conftest import TINY_NAMES


def params_of(models):
    return {name: mapping.module_params(m) for name, m in models.components().items()}


def assert_identical(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for path in a[name]:
            x, y = a[name][path], b[name][path]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, path)
            assert np.array_equal(x, y), (name, path)


@pytest.mark.parametrize("name", TINY_NAMES)
def test_roundtrip_through_diffusers_folder_is_bit_identical(tiny_folder, tmp_path, name):
    models = load(tiny_folder(name))
    save(models, tmp_path / "exported", format="diffusers")
    again = load(tmp_path / "exported")
    assert_identical(params_of(models), params_of(again))
    for comp in ("unet", "vae", "image_encoder"):
        assert getattr(again, comp).config == getattr(models, comp).config
    assert again.extra_configs == models.extra_configs


def test_exported_folder_opens_in_diffusers_and_computes_the_same(tiny_folder, tmp_path):
    models = load(tiny_folder("alt"))
    save(models, tmp_path / "exported", format="diffusers")
    torch_modules = reference.load_torch(tmp_path / "exported")
    original = reference.load_torch(tiny_folder("alt"))
    for name in ("unet", "vae", "image_encoder"):
        a, b = torch_modules[name].state_dict(), original[name].state_dict()
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for row in cmp.compare(torch_modules, models):
        assert row["ok"], row


def test_checkpoint_format_loads_without_torch_and_is_identical(tiny_folder, tmp_path):
    src = tiny_folder("sd")
    assert convert(src, tmp_path / "ckpt") == "jax"
    assert is_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "unet").iterdir()) == ["config.json", "params.safetensors"]
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('torch', 'diffusers', 'transformers'): raise ImportError(name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from pbe_jax.convert import load\n"
            f"m = load({str(tmp_path / 'ckpt')!r})\n"
            "print(sorted(m.extra_configs))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "feature_extractor" in out.stdout and "scheduler" in out.stdout
    assert_identical(params_of(load(src)), params_of(load(tmp_path / "ckpt")))


def test_cli_both_directions(tiny_folder, tmp_path):
    src = tiny_folder("sd")
    run = lambda *a: subprocess.run([sys.executable, "-m", "pbe_jax.convert", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run(src, tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    assert "pbe_jax checkpoint" in r.stdout
    r = run(tmp_path / "ckpt", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    assert not is_checkpoint(tmp_path / "back")
    index = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert_identical(params_of(load(src)), params_of(load(tmp_path / "back")))
    r = run(tmp_path / "missing", tmp_path / "x")
    assert r.returncode == 1 and "missing" in r.stderr


def test_pickled_bin_weights_load_like_safetensors(tiny_folder, tmp_path):
    comps = reference.build_tiny("sd")
    for name in ("unet", "vae", "image_encoder"):
        comps[name].save_pretrained(tmp_path / name, safe_serialization=False)
    for name in ("scheduler", "feature_extractor"):
        comps[name].save_pretrained(tmp_path / name)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((tmp_path / "unet").glob("*.safetensors"))
    assert_identical(params_of(load(tiny_folder("sd"))), params_of(load(tmp_path)))


def test_transformers5_encoder_key_layout_loads(tiny_folder, tmp_path):
    """transformers 5 saves the CLIP tower as model.*, released weights as model.vision_model.*."""
    from pbe_jax.convert.weights import load_file, save_safetensors

    folder = tiny_folder("sd")
    sd = load_file(folder / "image_encoder" / "model.safetensors")
    legacy = {("model.vision_model." + k[6:] if k.startswith("model.") else k): v for k, v in sd.items()}
    legacy["model.vision_model.embeddings.position_ids"] = np.arange(17)[None]
    (tmp_path / "image_encoder").mkdir()
    save_safetensors(legacy, tmp_path / "image_encoder" / "model.safetensors")
    (tmp_path / "image_encoder" / "config.json").write_text((folder / "image_encoder" / "config.json").read_text())
    from pbe_jax.convert import load_component

    a = mapping.module_params(load_component(folder / "image_encoder", "image_encoder"))
    b = mapping.module_params(load_component(tmp_path / "image_encoder", "image_encoder"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_safetensors_with_index(tiny_folder, tmp_path):
    import shutil

    from pbe_jax.convert import load_component
    from pbe_jax.convert.weights import load_file, save_safetensors

    src = tiny_folder("sd") / "unet"
    dst = tmp_path / "unet"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(src / "diffusion_pytorch_model.safetensors")
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_safetensors({k: state[k] for k in names}, dst / shard)
    index = {"weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    a = mapping.module_params(load_component(src, "unet"))
    b = mapping.module_params(load_component(dst, "unet"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_compare_cli_on_a_diffusers_folder(tiny_folder, capsys):
    assert cmp.main(["--diffusers", str(tiny_folder("alt")), "--batch", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and [c["component"] for c in result["components"]] == list(cmp.COMPONENTS)


@pytest.mark.parametrize("to", ["jax", "diffusers"])
def test_float16_storage_halves_the_files_and_loads_back_rounded(tiny_folder, tmp_path, to):
    src = tiny_folder("sd")
    convert(src, tmp_path / "full", to=to)
    convert(src, tmp_path / "half", to=to, dtype="float16")
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "full")
    full, half = params_of(load(tmp_path / "full")), params_of(load(tmp_path / "half"))
    for name in full:
        assert full[name].keys() == half[name].keys()
        for k, x in full[name].items():
            assert half[name][k].dtype == x.dtype == np.float32  # stored in half precision, loaded as float32
            np.testing.assert_array_equal(half[name][k], x.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="storage dtype must be one of"):
        convert(src, tmp_path / "bad", to=to, dtype="int8")


def test_variant_weights_fall_back_to_plain_ones_and_both_shard_index_spellings_load(tmp_path):
    from pbe_jax.convert.weights import WeightsError, find_weights, load_file, save_safetensors

    w = np.arange(3, dtype=np.float32)
    save_safetensors({"w": w}, tmp_path / "model.safetensors")
    assert find_weights(tmp_path, "fp16").name == "model.safetensors"  # no fp16 files: the plain ones
    save_safetensors({"w": w.astype(np.float16)}, tmp_path / "model-00001-of-00001.fp16.safetensors")
    index = json.dumps({"weight_map": {"w": "model-00001-of-00001.fp16.safetensors"}})
    (tmp_path / "model.safetensors.index.fp16.json").write_text(index)  # as diffusers/transformers spell it
    found = find_weights(tmp_path, "fp16")
    assert found.name == "model.safetensors.index.fp16.json" and load_file(found)["w"].dtype == np.float16
    assert find_weights(tmp_path).name == "model.safetensors"
    with pytest.raises(WeightsError, match="no weights"):
        find_weights(tmp_path / "nothing", "fp16")


def test_the_convert_package_has_no_import_cycle():
    """Each module of pbe_jax.convert imports only modules below it (formats.py is the one that knows both the
    folder and the single-file readers)."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "pbe_jax" / "convert"
    modules = {p.stem: p for p in folder.glob("*.py")}
    needs = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # module level and inside functions alike
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pbe_jax.convert"):
                parts = node.module.split(".")
                found |= {parts[2]} if len(parts) > 2 else {a.name for a in node.names if a.name in modules}
        needs[name] = found - {name}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in needs.get(start, ()))

    assert not [name for name in needs if reaches(name, name)], needs

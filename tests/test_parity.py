"""The JAX port computes what the PyTorch reference computes, on two different tiny configurations."""
import numpy as np
import pytest
import torch

from pbe_jax.convert import mapping
from pbe_jax.parity import compare as cmp

from conftest import TINY_NAMES


@pytest.mark.parametrize("name", TINY_NAMES)
def test_components_match_pytorch_float32(tiny_pair, name):
    torch_modules, models = tiny_pair(name)
    rows = cmp.compare(torch_modules, models, batch=2, tolerance=1e-4)
    assert [r["component"] for r in rows] == list(cmp.COMPONENTS)
    for r in rows:
        assert r["scale"] > 0.1, r  # the outputs are not trivially small
        assert r["max_abs"] <= 1e-4 * r["scale"], r


@pytest.mark.parametrize("name,size", [("sd", (10, 14)), ("alt", (10, 7))])
def test_unet_non_square_and_odd_sizes(tiny_pair, name, size):
    """Latent sizes that are not multiples of 2^levels take diffusers' upsample-to-skip-size path."""
    torch_modules, models = tiny_pair(name)
    unet_t = torch_modules["unet"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 9, *size), np.float32)
    ctx = rng.standard_normal((3, 1, unet_t.config.cross_attention_dim), np.float32)
    t = np.array([999, 500, 0])
    with torch.no_grad():
        ref = unet_t(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
    ours = cmp.jitted(models.unet, lambda m, *a: m(*a))(x.transpose(0, 2, 3, 1), t, ctx)
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    err = cmp.errors(ours, ref.numpy())
    assert err["max_abs"] <= 1e-4 * err["scale"], err


def test_unet_longer_context_uses_softmax_attention(tiny_pair):
    """A context of several tokens goes through real attention, not the one-token shortcut."""
    torch_modules, models = tiny_pair("sd")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 8, 8), np.float32)
    ctx = rng.standard_normal((2, 5, 24), np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = torch_modules["unet"](torch.from_numpy(x), torch.from_numpy(t),
                                    encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    ours = cmp.jitted(models.unet, lambda m, *a: m(*a))(x.transpose(0, 2, 3, 1), t, ctx)
    ours = np.asarray(ours).transpose(0, 3, 1, 2)
    err = cmp.errors(ours, ref)
    assert err["max_abs"] <= 1e-4 * err["scale"], err


def test_compare_detects_a_wrong_weight(tiny_folder):
    """The harness is able to fail: one perturbed parameter in the port breaks the check."""
    from flax import nnx

    from pbe_jax.convert import load
    from pbe_jax.parity import reference

    folder = tiny_folder("sd")
    torch_modules, models = reference.load_torch(folder), load(folder)
    kernel = models.unet.up_blocks[1].attentions[0].proj_out.kernel
    kernel.set_value(kernel.get_value() * 1.01)
    rows = {r["component"]: r for r in cmp.compare(torch_modules, models)}
    assert not rows["unet"]["ok"]
    assert rows["vae_decode"]["ok"] and rows["image_encoder"]["ok"]
    assert isinstance(models.unet, nnx.Module)


def test_compare_cli_offline_exit_status(capsys):
    assert cmp.main(["--random", "sd", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    for name in cmp.COMPONENTS:
        assert name in out
    assert "PASS" in out


def test_bfloat16_port_is_no_worse_than_pytorch_bfloat16(tiny_pair):
    import jax.numpy as jnp

    from pbe_jax.models import Policy
    from pbe_jax.parity import reference

    torch_modules, _ = tiny_pair("alt")
    models = reference.to_jax(torch_modules, Policy(dtype=jnp.bfloat16))
    assert models.unet.conv_in.kernel.get_value().dtype == jnp.float32  # params stay float32
    rows = cmp.compare(torch_modules, models, dtype="bfloat16")
    for r in rows:
        assert r["ok"], r
        assert r["max_abs"] > 0  # really computed in bf16


def test_flax_and_torch_names_are_inverse():
    path = ("down_blocks", 0, "attentions", 1, "proj_in", "kernel")
    assert mapping.torch_name(path) == "down_blocks.0.attentions.1.proj_in.weight"
    assert mapping.parse_flax_name(mapping.flax_name(path)) == path
    a = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    assert np.array_equal(mapping.to_torch_layout(path, mapping.to_flax_layout(path, a)), a)
    assert mapping.torch_shape(path, mapping.to_flax_layout(path, a).shape) == a.shape


def test_compare_cli_end_to_end(capsys):
    assert cmp.main(["--random", "sd", "--batch", "1", "--end-to-end", "--steps", "4", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    rows = {r["component"]: r for r in result["components"]}
    assert rows["pipeline/plms"]["ok"] and rows["pipeline/ddim"]["ok"]
    assert rows["pipeline/plms"]["max_abs"] <= 2


def test_the_old_command_is_the_parity_cli():
    """`python -m pbe_jax.compare` (the old name) takes what `python -m pbe_jax.parity` takes, and --help imports
    neither JAX nor PyTorch (it is quick)."""
    import subprocess
    import sys

    helps = {}
    for module in ("pbe_jax.parity", "pbe_jax.compare"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        helps[module] = r.stdout.replace("python -m pbe_jax.parity", "P").replace("python -m pbe_jax.compare", "P")
    assert "--train" in helps["pbe_jax.parity"] and "--end-to-end" in helps["pbe_jax.parity"]
    assert helps["pbe_jax.compare"] == helps["pbe_jax.parity"]
    heavy = subprocess.run([sys.executable, "-c", "import sys, pbe_jax.parity.compare; print(sorted({'jax', 'torch', "
                            "'diffusers', 'transformers'} & set(sys.modules)))"], capture_output=True, text=True,
                           timeout=120)
    assert heavy.returncode == 0 and heavy.stdout.strip() == "[]", heavy.stdout + heavy.stderr

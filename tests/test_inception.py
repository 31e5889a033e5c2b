"""The FID Inception port computes what pytorch-fid's own `InceptionV3([3])` computes, on random weights.

pytorch-fid's network is built from torchvision's Inception classes. PyPI's torchvision wheel is built against
the CUDA torch: beside the CPU torch of this project its C extension does not load, its import then fails
(`operator torchvision::nms does not exist`), and installed into the environment it would also change what
transformers' `CLIPImageProcessor` is (transformers picks its torchvision backend whenever torchvision is
installed). So torchvision lives in a folder of its own, `bash tests/install_references.sh` puts it in
.test-deps/ (or $PBE_PYTORCH_FID_DEPS), and only a subprocess that builds the
PyTorch reference puts it on its path, declaring the two operator schemas that torchvision's import registers
fake kernels for when its extension is missing; the model code is pure Python and needs none of its operators.
The reference is pytorch-fid's own `fid_inception_v3()` architecture with its weight download replaced by
nothing, then randomised (seeded), and its Inception3 state dict saved as pt_inception's .pth is laid out
(the classifier and BatchNorm counters included).
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from pbe_jax.convert.inception import inception_to_safetensors, load_fid_inception
from pbe_jax.convert.weights import WeightsError, load_file, save_safetensors
from pbe_jax.models.inception import FEATURES, FIDInceptionV3, fid_features, resize_bilinear

SIZES = {"up": (2, 64, 80), "down": (1, 333, 301)}  # batch, height, width: upsampled and shrunk to 299
RESIZES = [((7, 5), (299, 299)), ((1000, 640), (299, 299)), ((300, 301), (299, 299)), ((40, 33), (17, 64))]
TOLERANCE = 2e-5  # relative to the largest feature; measured ~3e-7 in float32 at highest matmul precision

# pytorch-fid's network with random weights, saved as OUT/pt_inception.pth (`net`: InceptionV3([3]) in eval mode).
BUILD = textwrap.dedent('''
    import sys

    import numpy as np
    import torch


    def import_torchvision():
        """torchvision, also where its C extension does not load (see the test module's docstring)."""
        try:
            import torchvision
        except RuntimeError as e:
            if "torchvision::" not in str(e):
                raise
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            import_torchvision.lib = lib  # kept alive: the schemas go with it
            import torchvision
        return torchvision


    import_torchvision()
    import pytorch_fid.inception as fi

    out = sys.argv[1]
    # pytorch-fid's own construction, minus the download: its load_state_dict call records the Inception3
    # instead of loading anything.
    built = []
    fi.load_state_dict_from_url = lambda *a, **k: None
    load_state_dict = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, *a, **k: built.append(self)
    try:
        net = fi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    finally:
        torch.nn.Module.load_state_dict = load_state_dict
    (inception,) = built
    torch.manual_seed(0)
    with torch.no_grad():  # weights that keep the activations O(1) through the 17 layers, and BN stats that matter
        for m in inception.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.01)
                m.bias.normal_(0, 0.01)
    net.eval()
    torch.save(inception.state_dict(), out + "/pt_inception.pth")
''')

_REFERENCE = BUILD + textwrap.dedent('''
    sizes, resizes = eval(sys.argv[2]), eval(sys.argv[3])
    rng = np.random.default_rng(0)
    arrays = {}
    with torch.no_grad():
        for name, (b, h, w) in sizes.items():
            x = rng.random((b, 3, h, w), dtype=np.float32)
            (features,) = net(torch.from_numpy(x))
            arrays[name + "_images"] = x.transpose(0, 2, 3, 1)
            arrays[name + "_features"] = features.reshape(b, -1).numpy()
        for i, (shape, size) in enumerate(resizes):
            x = rng.random((2, 3, *shape), dtype=np.float32)
            y = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                                align_corners=False)
            arrays[f"resize{i}_in"] = x.transpose(0, 2, 3, 1)
            arrays[f"resize{i}_out"] = y.numpy().transpose(0, 2, 3, 1)
    np.savez(out + "/reference.npz", **arrays)
''')


def _torchvision_path() -> str | None:
    """The folder that holds torchvision for the reference subprocess ("" where the environment has it)."""
    folder = Path(os.environ.get("PBE_PYTORCH_FID_DEPS", Path(__file__).resolve().parents[1] / ".test-deps"))
    if (folder / "torchvision").is_dir():
        return str(folder)
    return "" if importlib.util.find_spec("torchvision") is not None else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(folder with pt_inception.pth, reference arrays): pytorch-fid's network run once in a subprocess."""
    deps = _torchvision_path()
    missing = [what for what, ok in (("pytorch-fid", importlib.util.find_spec("pytorch_fid") is not None),
                                     ("torchvision", deps is not None)) if not ok]
    if missing:
        why = f"{' and '.join(missing)} missing: bash tests/install_references.sh"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("fid_inception")
    (folder / "reference.py").write_text(_REFERENCE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (deps, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(folder / "reference.py"), str(folder), repr(SIZES), repr(RESIZES)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, dict(np.load(folder / "reference.npz"))


@pytest.fixture(scope="module")
def model(reference):
    return load_fid_inception(reference[0] / "pt_inception.pth")


def _jitted(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, x: fid_features(nnx.merge(graphdef, state), x))
    return lambda x: np.asarray(f(state, x))


@pytest.mark.parametrize("size", list(SIZES))
def test_features_match_pytorch_fid(reference, model, size):
    arrays = reference[1]
    want = arrays[f"{size}_features"]
    got = _jitted(model)(arrays[f"{size}_images"])
    assert got.shape == want.shape == (SIZES[size][0], FEATURES) and got.dtype == np.float32
    scale = float(np.abs(want).max())
    assert scale > 0.1 and float(want.std()) > 0.1  # not trivially small or constant
    err = float(np.abs(got - want).max())
    assert err <= TOLERANCE * scale, (err, scale, err / scale)


@pytest.mark.parametrize("case", range(len(RESIZES)))
def test_resize_is_pytorch_interpolate(reference, case):
    """Bilinear, align_corners=False, no antialiasing, the sample positions rounded as PyTorch rounds them
    in float32: equal to F.interpolate to float32 rounding, shrinking, enlarging and odd sizes alike."""
    arrays = reference[1]
    size = RESIZES[case][1]
    got = np.asarray(jax.jit(lambda x: resize_bilinear(x, size))(arrays[f"resize{case}_in"]))
    np.testing.assert_allclose(got, arrays[f"resize{case}_out"], rtol=0, atol=1e-6)


def test_uint8_images_are_divided_by_255(model):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (1, 40, 48, 3), dtype=np.uint8)
    f = _jitted(model)
    want = f(images.astype(np.float32) / 255.0)
    np.testing.assert_allclose(f(images), want, rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        model(np.zeros((1, 3, 40, 48), np.float32))


def test_safetensors_conversion_loads_the_same_model(reference, model, tmp_path):
    pth = reference[0] / "pt_inception.pth"
    out = tmp_path / "pt_inception.safetensors"
    inception_to_safetensors(pth, out)
    tensors, pickled = load_file(out), load_file(pth)
    assert sorted(tensors) == sorted(pickled)  # the same keys, classifier and BN counters included
    assert any(k.startswith("fc.") for k in tensors) and any(k.endswith("num_batches_tracked") for k in tensors)
    for k, v in pickled.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    a, b = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(load_fid_inception(out)))
    assert [p for p, _ in a] == [p for p, _ in b]
    assert len(a) == 94 * 5  # 94 BasicConv2d: conv weight, BN weight, bias, running mean and variance
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), err_msg=str(path))
    # A file that does not fit is refused before anything is written.
    bad = tmp_path / "bad.safetensors"
    save_safetensors({k: v for k, v in pickled.items() if k != "Mixed_7c.branch_pool.bn.running_var"}, bad)
    with pytest.raises(WeightsError, match="missing Mixed_7c.branch_pool.bn.running_var"):
        inception_to_safetensors(bad, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_bad_weights_name_the_file_the_key_and_both_shapes(reference, tmp_path):
    state = load_file(reference[0] / "pt_inception.pth")
    key = "Mixed_6b.branch7x7_2.conv.weight"
    assert state[key].shape == (128, 128, 1, 7)
    wrong = tmp_path / "wrong_shape.safetensors"
    save_safetensors({**state, key: np.zeros((128, 128, 7, 1), np.float32)}, wrong)
    with pytest.raises(WeightsError) as e:
        load_fid_inception(wrong)
    assert str(wrong) in str(e.value)
    assert f"{key}: shape (128, 128, 7, 1) in the weights, (128, 128, 1, 7) in the model" in str(e.value)

    unknown = tmp_path / "unknown_key.safetensors"  # e.g. torchvision's ImageNet Inception, with its AuxLogits
    save_safetensors({**state, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)}, unknown)
    with pytest.raises(WeightsError, match=r"unexpected AuxLogits\.fc\.weight \(1000, 768\)") as e:
        load_fid_inception(unknown)
    assert str(unknown) in str(e.value)


def test_the_module_has_pytorch_fids_parameters():
    """The architecture alone (traced, not allocated): torchvision's Inception3 without AuxLogits and fc has
    21,785,568 parameters; the BatchNorm statistics are batch statistics, not parameters."""
    m = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
    stats = nnx.to_flat_state(nnx.state(m, nnx.BatchStat))
    assert len(stats) == 94 * 2 and all(p[-1] in ("running_mean", "running_var") for p, _ in stats)
    assert sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param))) == 21_785_568

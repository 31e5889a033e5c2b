"""The model that ships in checkpoints/synthetic: a small diffusers-format folder that diffusers opens, and
`python sample.py` with no arguments edits the shipped example with it: the box changes, the rest stays,
and what appears depends on the exemplar and on the seed."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

from pbe_jax import defaults  # noqa: E402
from pbe_jax.eval.metrics import psnr  # noqa: E402


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_shipped_folder_is_small_safetensors_in_diffusers_layout():
    folder = defaults.SHIPPED_MODEL
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    assert {p.parent.name for p in weights} == {"unet", "vae", "image_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) < 10e6
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PaintByExamplePipeline"


def test_shipped_folder_opens_in_diffusers_with_the_same_weights():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from pbe_jax.convert import load, mapping
    from pbe_jax.convert.diffusers import COMPONENTS
    from pbe_jax.parity import reference

    nets = reference.load_torch(defaults.SHIPPED_MODEL)
    ours = load(defaults.SHIPPED_MODEL).components()
    for name, module in nets.items():
        assert isinstance(module, torch.nn.Module)
        # (in the names this port reads: transformers 5 nests the CLIP tower's keys one level deeper)
        theirs = {COMPONENTS[name].normalize_key(k): v.float().numpy() for k, v in module.state_dict().items()}
        mine = mapping.to_torch(ours[name])
        assert set(mine) <= set(theirs), name
        for k in mine:
            np.testing.assert_array_equal(theirs[k], mine[k], err_msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def edits(tmp_path_factory):
    """`python sample.py` as a new user runs it (from another folder, fewer steps to keep the suite short),
    plus the same edit with seeds 1 and 2 and with an exemplar of another colour."""
    out = tmp_path_factory.mktemp("shipped")
    assert sample.main(["--out", str(out / "edit.png"), "--steps", "20", "--samples", "3"]) == 0
    example = defaults.SHIPPED_EXAMPLE
    recoloured = read(example / "reference.png")[..., [2, 0, 1]]  # channels turned: the green star turns blue
    Image.fromarray(np.ascontiguousarray(recoloured)).save(out / "recoloured.png")
    assert sample.main(["--image", str(example / "source.png"), "--mask", str(example / "mask.png"),
                        "--reference", str(out / "recoloured.png"), "--out", str(out / "other.png"),
                        "--steps", "20"]) == 0
    return out


def test_no_argument_run_writes_the_edit_and_a_grid(edits):
    edit, grid = read(edits / "edit.png"), read(edits / "edit_grid.png")
    assert edit.shape == (64, 64, 3)
    assert grid.shape[0] >= defaults.GRID_HEIGHT and grid.shape[1] > 4 * grid.shape[0]


def test_the_edit_changes_the_box_and_keeps_the_rest(edits):
    source = read(defaults.SHIPPED_EXAMPLE / "source.png")
    mask = read(defaults.SHIPPED_EXAMPLE / "mask.png")[..., 0] > 127
    edit = read(edits / "edit.png")
    assert psnr(edit, source, mask) > 20  # outside the box: only the small VAE's reconstruction error
    inside = np.abs(edit[mask].astype(int) - source[mask]).mean()
    outside = np.abs(edit[~mask].astype(int) - source[~mask]).mean()
    assert inside > 3 * outside


def test_the_edit_follows_the_exemplar_and_varies_with_the_seed(edits):
    mask = read(defaults.SHIPPED_EXAMPLE / "mask.png")[..., 0] > 127
    first, second, third = (read(edits / n)[mask].astype(int) for n in ("edit.png", "edit_1.png", "edit_2.png"))
    other = read(edits / "other.png")[mask].astype(int)
    seed_change = np.abs(first - second).mean()
    assert seed_change > 2 and np.abs(second - third).mean() > 2
    # Another exemplar changes the box far more than another seed does.
    assert np.abs(first - other).mean() > seed_change
    # The box takes the exemplar's colour: its mean is nearer the reference object's colour than the masked
    # object's (the example: a white square masked, a green star as the exemplar).
    from pbe_jax.data.synthetic import COLOURS

    label = json.loads((defaults.SHIPPED_EXAMPLE / "label.json").read_text())
    wanted, before = (np.asarray(COLOURS[label[k]["colour"]]) for k in ("reference", "original"))
    for edit in (first, second, third):
        mean = edit.mean(0)
        assert np.linalg.norm(mean - wanted) < 0.5 * np.linalg.norm(mean - before), mean

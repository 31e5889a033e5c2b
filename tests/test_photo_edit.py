"""A photo edited at its own size (issue 32): the crop around the mask pasted back exactly, the feathered mask,
strength, several exemplars in one batch; through the API, sample.py and batch manifests."""
import json

import numpy as np
import pytest
from PIL import Image

import sample
from pbe_jax import defaults, images, memory, regions
from pbe_jax.pipeline import PaintByExample

MODEL = defaults.SHIPPED_MODEL  # the shipped model: 64² native, factor 4, working sizes in multiples of 16
# sample.py's sampler and few steps everywhere, one photo size: the tests share a handful of compiled programs
# (through the session's persistent compilation cache, across workers too).
FAST = dict(steps=3, sampler="dpmpp_2m")


@pytest.fixture(scope="module")
def pipe():
    return PaintByExample.from_pretrained(MODEL)


def photo(h=150, w=260, seed=0):
    """A smooth non-square scene with a small masked object, and an exemplar."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    mask = np.zeros((h, w), np.uint8)
    mask[h // 3: h // 3 + h // 5, w // 2: w // 2 + w // 8] = 255
    ref = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    return rgb, mask, ref


def test_crop_edit_is_the_photos_size_and_exact_outside_the_mask(pipe):
    rgb, mask, ref = photo()
    out = pipe(rgb, mask, ref, **FAST, padding_mask_crop=8)
    assert out.shape == (1, *rgb.shape)
    np.testing.assert_array_equal(out[0][mask == 0], rgb[mask == 0])
    assert np.abs(out[0][mask > 0].astype(int) - rgb[mask > 0]).mean() > 5  # the region was edited
    (edit,) = pipe.prepare(rgb, mask, ref, padding_mask_crop=8)
    x0, y0, x1, y1 = edit.placement.box  # the model worked on the region around the mask, at its full size
    assert (x1 - x0) < rgb.shape[1] / 2 and edit.placement.size[0] * edit.placement.size[1] <= 64 * 64


def test_feathered_mask_blends_and_leaves_the_rest(pipe):
    rgb, mask, ref = photo(seed=1)
    out = pipe(rgb, mask, ref, **FAST, padding_mask_crop=8, mask_blur=4)[0]
    feathered = regions.blur(mask, 4)
    np.testing.assert_array_equal(out[feathered == 0], rgb[feathered == 0])
    ring = (feathered > 0) & (feathered < 255) & (mask == 0)  # outside the painted mask, inside its feather
    assert ring.any() and (out[ring] != rgb[ring]).any()


def test_exif_rotated_file_comes_back_upright_at_its_size(pipe, tmp_path):
    rgb, mask, ref = photo(seed=2)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))  # as a camera stores a portrait shot
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6  # "rotate 90° clockwise to view"
    stored.save(tmp_path / "photo.png", exif=exif)
    np.testing.assert_array_equal(images.to_rgb(tmp_path / "photo.png"), rgb)
    np.testing.assert_array_equal(images.to_rgb(images.load_image(tmp_path / "photo.png")), rgb)  # turned once
    out = pipe(tmp_path / "photo.png", mask, ref, **FAST, padding_mask_crop=8)[0]
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(out[mask == 0], rgb[mask == 0])


def test_without_a_crop_the_photo_keeps_its_aspect_ratio_and_size(pipe):
    rgb, mask, ref = photo(seed=3)
    (edit,) = pipe.prepare(rgb, mask, ref)
    h, w = edit.placement.size
    assert (h, w) == regions.working_size(260 / 150, 64, 16) and w / h > 1.4  # not squashed to 64²
    out = pipe(rgb, mask, ref, **FAST)
    assert out.shape == (1, *rgb.shape)
    kept = pipe(rgb, mask, ref, **FAST, keep_unmasked=True)[0]
    np.testing.assert_array_equal(kept[mask == 0], rgb[mask == 0])
    given = pipe(rgb, mask, ref, **FAST, height=64, width=64)  # a given working size: still the photo's size
    assert given.shape == (1, *rgb.shape)


def test_several_exemplars_are_one_batch_with_a_seed_per_output(pipe, monkeypatch):
    rgb, mask, ref = photo(seed=4)
    refs = [ref, np.ascontiguousarray(ref[:, ::-1])]
    calls = []
    generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda x, **kw: calls.append(len(x.image)) or generate(x, **kw))
    out = pipe(rgb, mask, refs, **FAST, seed=10, padding_mask_crop=8)
    assert calls == [2] and out.shape == (2, *rgb.shape)
    for k in range(2):
        alone = pipe(rgb, mask, refs[k], **FAST, seed=10 + k, padding_mask_crop=8)[0]
        assert np.abs(alone.astype(int) - out[k]).max() <= 1  # the same edit (XLA's batch shapes: last bit)
    assert not np.array_equal(out[0], out[1])


def test_strength_keeps_the_old_region_closer(pipe):
    rgb, mask, ref = photo(seed=5)
    n = dict(num_images_per_reference=2, padding_mask_crop=8, seed=3)  # two seeds: the manifest test's shape
    full = pipe(rgb, mask, ref, **FAST, **n)
    light = pipe(rgb, mask, ref, **FAST, **n, strength=0.34)  # the last of the 3 steps only
    err = lambda out: np.abs(out[:, mask > 0].astype(int) - rgb[mask > 0]).mean()  # noqa: E731
    assert err(light) < err(full) / 2
    with pytest.raises(ValueError, match="strength 0.05 of 10 steps leaves no step to run"):
        pipe(rgb, mask, ref, steps=10, strength=0.05)


def test_sample_cli_edits_a_photo_with_the_new_options(tmp_path, capsys):
    rgb, mask, ref = photo(seed=6)
    for name, a in (("src.png", rgb), ("mask.png", mask), ("ref.png", ref), ("ref2.png", ref[::-1])):
        Image.fromarray(a).save(tmp_path / name)
    out = tmp_path / "out" / "e.png"
    assert sample.main(["--image", str(tmp_path / "src.png"), "--mask", str(tmp_path / "mask.png"),
                        "--reference", str(tmp_path / "ref.png"), str(tmp_path / "ref2.png"), "--steps", "3",
                        "--padding-mask-crop", "8", "--mask-blur", "2", "--out", str(out)]) == 0
    feathered = regions.blur(mask, 2)
    for path in (out, out.with_name("e_1.png")):
        result = np.asarray(Image.open(path))
        assert result.shape == rgb.shape
        np.testing.assert_array_equal(result[feathered == 0], rgb[feathered == 0])
    grid = np.asarray(Image.open(out.with_name("e_grid.png")))
    assert grid.shape[0] == rgb.shape[0] * 2  # enlarged to at least sample.GRID_HEIGHT, whole pixels
    with pytest.raises(SystemExit):
        sample.main(["--strength", "1.5"])
    assert "--strength must be in (0, 1]" in capsys.readouterr().err


def test_manifest_rows_list_exemplars_and_set_options(tmp_path):
    rgb, mask, ref = photo(seed=7)
    for name, a in (("src.png", rgb), ("mask.png", mask), ("a.png", ref), ("b.png", ref[::-1])):
        Image.fromarray(a).save(tmp_path / name)
    rows = [{"id": "two", "source": "src.png", "mask": "mask.png", "reference": ["a.png", "b.png"],
             "padding_mask_crop": 8},
            {"id": "light", "source": "src.png", "mask": "mask.png", "reference": "a.png", "strength": 0.34,
             "padding_mask_crop": 8}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert sample.main(["--batch", str(tmp_path / "jobs.jsonl"), "--out", str(out), "--steps", "3",
                        "--batch-size", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["light.png", "two_0.png", "two_1.png"]
    for name in ("two_0.png", "two_1.png", "light.png"):
        result = np.asarray(Image.open(out / name))
        np.testing.assert_array_equal(result[mask == 0], rgb[mask == 0])
    err = lambda name: np.abs(np.asarray(Image.open(out / name))[mask > 0].astype(int) - rgb[mask > 0]).mean()  # noqa
    assert err("light.png") < err("two_0.png") / 2  # its own strength, in its own batch
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[1], "strength": 2}) + "\n")
    from pbe_jax import batch

    with pytest.raises(ValueError, match=r"bad.jsonl:1: strength must be a number in \(0, 1\], not 2"):
        batch.read_manifest(tmp_path / "bad.jsonl")


def test_a_size_whose_attention_does_not_fit_is_a_sentence(tmp_path, monkeypatch, capsys):
    """The report: the 64²-trained model asked for 512² was killed by the OOM killer. Now: refused, exit 1."""
    monkeypatch.setattr(memory, "available_bytes", lambda *a, **k: 8 * 2 ** 30)
    assert sample.main(["--size", "512", "--steps", "2", "--out", str(tmp_path / "e.png")]) == 1
    err = capsys.readouterr().err
    assert "error: sampling 512×512 with 1 image per batch" in err and "more than the 8.6 GB available" in err
    assert not (tmp_path / "e.png").exists()

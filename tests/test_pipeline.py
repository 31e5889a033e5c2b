"""The JAX pipeline against diffusers' PaintByExamplePipeline, from the same initial latents."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pbe_jax import images
from pbe_jax.parity import reference
from pbe_jax.pipeline import PaintByExample


@pytest.fixture(scope="module")
def pipes(tiny_folder):
    cache = {}

    def get(name, sampler="plms"):
        if (name, sampler) not in cache:
            cache[name, sampler] = (PaintByExample.from_pretrained(tiny_folder(name)),
                                    reference.torch_pipeline(tiny_folder(name), sampler))
        return cache[name, sampler]

    return get


def inputs(batch, height, width, seed=0):
    rng = np.random.default_rng(seed)
    img = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(batch)]
    masks = []
    for i in range(batch):
        m = np.zeros((height, width), np.uint8)
        m[height // 4: height // 4 + height // 2, i + 2: width // 2 + i + 2] = 255
        masks.append(m)
    refs = [rng.integers(0, 256, (37 + 5 * i, 29 + 3 * i, 3), dtype=np.uint8) for i in range(batch)]
    return img, masks, refs


@pytest.mark.parametrize("name,sampler,batch,size,scale", [
    ("sd", "plms", 2, (32, 32), 5.0),
    ("sd", "ddim", 3, (32, 48), 5.0),
    ("alt", "plms", 2, (48, 32), 5.0),
    ("alt", "ddim", 1, (48, 48), 1.0),
    ("sd", "dpmpp_2m", 2, (32, 48), 5.0),
    ("alt", "dpmpp_2m", 1, (48, 48), 1.0),
    ("sd", "unipc", 1, (32, 32), 1.0),
    ("alt", "unipc", 2, (48, 32), 5.0),
])
def test_pipeline_matches_diffusers(pipes, name, sampler, batch, size, scale):
    ours, theirs = pipes(name, sampler)
    h, w = size
    img, masks, refs = inputs(batch, h, w)
    f = ours.vae_factor
    latents = np.random.default_rng(3).standard_normal((batch, 4, h // f, w // f)).astype(np.float32)
    ref = reference.run_torch_pipeline(theirs, img, masks, refs, latents, steps=6, guidance_scale=scale)
    out = ours(img, masks, refs, steps=6, guidance_scale=scale, latents=latents, sampler=sampler, height=h,
               width=w, sample_posterior=False)
    assert out.dtype == np.uint8 and out.shape == (batch, h, w, 3)
    assert ref.std() > 10  # a real image, not a constant
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 2


def test_seed_changes_the_edit_and_is_reproducible(pipes):
    ours, _ = pipes("sd")
    img, masks, refs = inputs(1, 32, 32)
    a = ours(img, masks, refs, steps=3, seed=0, height=32, width=32)
    b = ours(img, masks, refs, steps=3, seed=0, height=32, width=32)
    c = ours(img, masks, refs, steps=3, seed=1, height=32, width=32)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 5


def test_progress_per_step_changes_nothing(pipes):
    """`on_step(done, total)` reports every denoising step once, in order (PLMS's warm-up makes one row more than
    its steps), from a program that computes the same edit bit for bit. The hook is the call's: calls from
    several threads at once (the web app's workers) each hear their own steps only, from the one program
    compiled for every call with a hook; a call without one runs a program without the callback. (The inputs of
    test_seed_changes_the_edit_and_is_reproducible: its program is reused.)"""
    ours, _ = pipes("sd")
    img, masks, refs = inputs(1, 32, 32)
    run = lambda **kw: ours(img, masks, refs, steps=3, seed=0, height=32, width=32, **kw)  # noqa: E731
    seen = []
    with_progress = run(on_step=lambda done, n: seen.append((done, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    plain = run()
    np.testing.assert_array_equal(with_progress, plain)
    programs = ours._jitted_edit._cache_size()
    heard = {"a": [], "b": [], "c": []}
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(run, on_step=lambda done, n, k=k: heard[k].append(done)) for k in heard]
        calls.append(pool.submit(run))
        for call in calls:
            np.testing.assert_array_equal(call.result(), plain)
    assert heard == {k: [1, 2, 3, 4] for k in heard}
    assert ours._jitted_edit._cache_size() == programs  # a new hook, no new program
    assert "callback" not in ours.lower(1, 32, 32, steps=3).as_text()  # what a call without a hook runs


def test_scale_zero_ignores_the_exemplar(pipes):
    """Scale 0 conditions on the uncond vector alone: the reference no longer matters; at scale 1 it does."""
    ours, _ = pipes("sd")
    img, masks, refs = inputs(1, 32, 32)
    other = [255 - refs[0]]
    run = lambda r, s: ours(img, masks, r, steps=3, height=32, width=32, guidance_scale=s)  # noqa: E731
    np.testing.assert_array_equal(run(refs, 0.0), run(other, 0.0))
    assert not np.array_equal(run(refs, 1.0), run(other, 1.0))
    assert not np.array_equal(run(refs, 0.0), run(refs, 1.0))
    with pytest.raises(ValueError, match="guidance_scale must be ≥ 0"):
        run(refs, -1.0)


def test_images_per_reference_are_consecutive_and_differ(pipes):
    ours, _ = pipes("sd")
    img, masks, refs = inputs(2, 32, 32)
    out = ours(img, masks, refs, steps=3, height=32, width=32, num_images_per_reference=2)
    assert out.shape == (4, 32, 32, 3)
    assert not np.array_equal(out[0], out[1])
    first = ours(img[:1], masks[:1], refs[:1], steps=3, height=32, width=32, num_images_per_reference=2,
                 latents=None)
    assert first.shape == (2, 32, 32, 3)


def test_keep_unmasked_keeps_source_pixels_exactly(pipes):
    ours, _ = pipes("sd")
    img, masks, refs = inputs(2, 32, 32)
    out = ours(img, masks, refs, steps=3, height=32, width=32, keep_unmasked=True)
    plain = ours(img, masks, refs, steps=3, height=32, width=32)
    for o, p, s, m in zip(out, plain, img, masks):
        outside = m < 128
        np.testing.assert_array_equal(o[outside], s[outside])
        assert not np.array_equal(p[outside], s[outside])  # without it, the VAE changes them
        inside = ~outside
        # inside, the edit dominates: the paste-back only feathers the border
        assert np.abs(o[inside].astype(int) - p[inside]).mean() < np.abs(o[inside].astype(int) - s[inside]).mean()


def test_paste_back_feathers_only_inside_the_mask():
    rng = np.random.default_rng(0)
    src, res = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    edit = np.zeros((64, 64), np.float32)
    edit[8:56, 8:56] = 1
    out = images.paste_back(src, res, edit, feather=2.0)
    np.testing.assert_array_equal(out[edit == 0], src[edit == 0])
    np.testing.assert_array_equal(out[20:44, 20:44], res[20:44, 20:44])  # ≥ 6σ inside: the result as is
    edge = out[8, 30].astype(int)
    assert np.abs(edge - src[8, 30]).max() <= np.abs(edge - res[8, 30]).max()  # at the edge: near the source


def test_input_modes_and_sizes(pipes, tmp_path):
    ours, _ = pipes("sd")
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
    m = np.zeros((64, 64), np.uint8)
    m[20:40, 20:40] = 255
    Image.fromarray(np.stack([m] * 3, -1)).save(tmp_path / "mask_rgb.png")
    assert images.load_image(tmp_path / "deep.png").mode == "L"
    with pytest.warns(UserWarning, match=r"mask\[2\]: 64×64, resized to its source image's 32×32"):
        x = ours.preprocess([tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "deep.png"],
                            tmp_path / "mask_rgb.png", rgb, height=32, width=32)
    assert x.image.shape == (3, 32, 32, 3) and x.keep.shape == (3, 32, 32, 1)
    assert set(np.unique(x.keep)) == {0.0, 1.0} and x.keep[0, 15, 15, 0] == 0.0 and x.keep[0, 2, 2, 0] == 1.0
    np.testing.assert_array_equal(x.image[0, ..., 0], x.image[0, ..., 1])  # grayscale repeated
    assert x.reference.shape == (3, 28, 28, 3)
    with pytest.raises(images.ImageError, match="notes.txt: cannot read image"):
        (tmp_path / "notes.txt").write_text("hello")
        ours.preprocess(tmp_path / "notes.txt", m, rgb)
    with pytest.raises(images.ImageError, match=r"mask: 2 given for 3 source images"):
        ours.preprocess([rgb] * 3, [m, m], rgb, height=32, width=32)
    with pytest.raises(images.ImageError, match=r"mask: 64×48 has another aspect ratio than its source image "
                                                 r"\(32×32\); give a mask of the source's size"):
        ours.preprocess(rgb, m[:48], rgb, height=32, width=32)
    wide = rng.integers(0, 256, (750, 1000, 3), dtype=np.uint8)  # a mask of its aspect, rounded: resized
    with pytest.warns(UserWarning, match=r"mask: 333×250, resized to its source image's 1000×750"):
        assert ours.preprocess(wide, np.ones((250, 333), np.float32), rgb, height=32, width=32).keep.max() == 0
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.preprocess(rgb, m, rgb, height=31, width=32)
    with pytest.raises(ValueError, match="NCHW shape"):
        ours(rgb, m, rgb, height=32, width=32, steps=2, latents=np.zeros((1, 16, 16, 4), np.float32))


def test_reference_processor_matches_transformers(tiny_folder):
    from transformers import CLIPImageProcessor

    folder = tiny_folder("alt")
    theirs = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    import json

    ours = images.ReferenceProcessor.from_config(json.loads((folder / "feature_extractor" /
                                                             "preprocessor_config.json").read_text()))
    rng = np.random.default_rng(0)
    for shape in [(50, 70, 3), (91, 40, 3), (30, 30, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        ref = theirs(images=Image.fromarray(rgb), return_tensors="np").pixel_values[0].transpose(1, 2, 0)
        np.testing.assert_allclose(ours(rgb), ref, atol=1e-5)


def test_missing_pretrained_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        PaintByExample.from_pretrained(tmp_path / "nothing-here")


def test_half_precision_kernels_are_stored_in_it_with_the_same_edit(tiny_folder):
    """A bf16 pipeline keeps its Linear and Conv kernels in bf16 (each use casts them to it anyway): every kernel
    of a half-precision layer is bf16, everything else float32, and the edit is the same bit for bit as with
    float32 kernels cast at each use."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pbe_jax.convert import load
    from pbe_jax.models import Policy

    stored = PaintByExample.from_pretrained(tiny_folder("sd"), dtype="bfloat16")
    cast_at_use = PaintByExample(load(tiny_folder("sd"), policy=Policy(dtype=jnp.bfloat16)))
    kinds = {}
    for net in stored.models.components().values():
        for path, module in nnx.iter_graph(net):
            if isinstance(module, nnx.Variable):
                kernel = path[-1] == "kernel"
                kinds.setdefault((kernel, str(module.get_value().dtype)), 0)
                kinds[kernel, str(module.get_value().dtype)] += 1
    assert {k for k in kinds if k[0]} == {(True, "bfloat16")} and (False, "float32") in kinds, kinds
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(cast_at_use.models.unet)))
    img, masks, refs = inputs(2, 32, 32)
    a, b = (np.asarray(p(img, masks, refs, steps=3, seed=1, height=32, width=32)) for p in (stored, cast_at_use))
    np.testing.assert_array_equal(a, b)

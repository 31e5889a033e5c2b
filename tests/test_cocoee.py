"""The original release's CLIP-score pixels: the region box from raster order (end-exclusive), PyTorch's
(float32) bilinear resize without antialiasing, PIL's default resize for the reference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pbe_jax.eval import cocoee
from pbe_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def test_region_box_is_first_and_last_white_pixel_in_raster_order_end_exclusive():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:6, 3:9] = 255  # rows 2..5, columns 3..8
    assert cocoee.region_box(mask) == (2, 3, 5, 8)
    result = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    np.testing.assert_array_equal(cocoee.crop_region(result, mask), result[2:5, 3:8])  # last row/column left out
    # Not the bounding box when the shape is not a rectangle: raster order decides.
    mask = np.zeros((10, 12), np.uint8)
    mask[1, 9] = mask[4, 2] = mask[7, 5] = 255
    assert cocoee.region_box(mask) == (1, 9, 7, 5)
    assert cocoee.crop_region(result, mask).shape == (6, 0, 3)
    mask[1, 9] = 254  # only 255 counts
    assert cocoee.region_box(mask) == (4, 2, 7, 5)
    rgb = np.repeat(mask[..., None], 3, axis=2)
    assert cocoee.region_box(rgb) == (4, 2, 7, 5)
    with pytest.raises(ValueError, match="no white"):
        cocoee.region_box(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize("shape,size", [((37, 53), (224, 224)), ((300, 260), (224, 224)), ((5, 400), (24, 31)),
                                        ((1000, 640), (224, 224))])
def test_resize_is_torch_bilinear_without_antialiasing(shape, size):
    """Against PyTorch's float32 kernel (what the original ran): sample positions in float32 as it computes
    them, so never farther from it than PyTorch's own float64 kernel is (measured: 1e-7 to 1.3e-5, where the
    float64 kernel is 4e-6 to 8e-5 away)."""
    image = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)

    def torch_resize(dtype):
        x = torch.from_numpy(image).to(dtype).permute(2, 0, 1)[None]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                             antialias=False)[0].permute(1, 2, 0).numpy()

    ours, exact, rounded = cocoee.resize_bilinear(image, size), torch_resize(torch.float64), torch_resize(torch.float32)
    assert ours.dtype == np.float32
    assert np.abs(ours - rounded).max() <= np.abs(exact - rounded).max()
    np.testing.assert_allclose(ours, rounded, rtol=0, atol=2e-5)


def test_region_and_reference_pixels():
    rng = np.random.default_rng(1)
    result = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), np.uint8)
    mask[10:50, 5:70] = 255
    crop = torch.from_numpy(result[10:49, 5:69].astype(np.float32) / 255).permute(2, 0, 1)[None]
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    want32, want64 = (((F.interpolate(crop.to(d), size=(224, 224), mode="bilinear", align_corners=False)[0] - mean)
                       / std).permute(1, 2, 0).numpy() for d in (torch.float32, torch.float64))
    ours = cocoee.region_pixels(result, mask)  # no farther from PyTorch's float32 result than its float64 one is
    assert ours.shape == (224, 224, 3) and np.abs(ours - want32).max() <= np.abs(want64 - want32).max()
    ref = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(ref).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
    want = (pil - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    np.testing.assert_allclose(cocoee.reference_pixels(ref), want, atol=1e-6)
    np.testing.assert_allclose(cocoee.reference_pixels(Image.fromarray(ref)), want, atol=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        cocoee.crop_region(result, mask[:32])

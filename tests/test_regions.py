"""The crop, resizes, overlay and blur against diffusers' own `VaeImageProcessor` functions, on random masks of
many shapes and sizes; the working sizes and placements."""
import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from pbe_jax import regions

WORKING = [(512, 512), (640, 384), (384, 640), (64, 64), (80, 48), (48, 128)]  # (width, height)


def random_mask(rng, h, w) -> np.ndarray:
    """Rectangles, blobs, strokes, a single pixel, the border, everything: white = edit."""
    m = np.zeros((h, w), np.uint8)
    kind = rng.integers(6)
    if kind == 0:  # a rectangle
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0:rng.integers(y0 + 1, h + 1), x0:rng.integers(x0 + 1, w + 1)] = 255
    elif kind == 1:  # an ellipse
        yy, xx = np.mgrid[:h, :w]
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, h / 2), rng.uniform(1, w / 2)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 255
    elif kind == 2:  # scattered pixels of any grey
        m[rng.random((h, w)) < 0.01] = rng.integers(1, 256)
    elif kind == 3:  # one pixel
        m[rng.integers(h), rng.integers(w)] = 255
    elif kind == 4:  # touching the borders
        m[: rng.integers(1, h + 1), -rng.integers(1, w + 1):] = 255
    else:
        m[:] = 255
    if not m.any():
        m[h // 2, w // 2] = 255
    return m


def test_crop_region_is_diffusers_get_crop_region():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 260, 2))
        mask = random_mask(rng, h, w)
        width, height = WORKING[rng.integers(len(WORKING))]
        pad = int(rng.choice([0, 1, 3, 32, 500]))
        expected = VaeImageProcessor.get_crop_region(Image.fromarray(mask, "L"), width, height, pad=pad)
        assert regions.crop_region(mask, width, height, pad) == tuple(expected), (h, w, width, height, pad)


def test_blur_is_diffusers_blur():
    rng = np.random.default_rng(1)
    for radius in (0.5, 2, 4, 33):
        mask = random_mask(rng, 90, 130)
        expected = np.asarray(VaeImageProcessor.blur(Image.fromarray(mask, "L"), radius))
        np.testing.assert_array_equal(regions.blur(mask, radius), expected)
    np.testing.assert_array_equal(regions.blur(mask, 0), mask)


def test_cut_is_diffusers_preprocess_of_the_crop_with_fill():
    """The working-size image and binarised mask are what the inpainting pipeline's image and mask processors
    make of the photo with `crops_coords` and resize_mode "fill"."""
    rng = np.random.default_rng(2)
    images = VaeImageProcessor()
    masks = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(20, 300, 2))
        photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = random_mask(rng, h, w)
        width, height = WORKING[rng.integers(len(WORKING))]
        box = regions.crop_region(mask, width, height, int(rng.integers(0, 40)))
        place = regions.Placement(box, (height, width), True)
        theirs = images.preprocess(Image.fromarray(photo), height=height, width=width, crops_coords=box,
                                   resize_mode="fill")
        theirs = np.round((theirs[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        np.testing.assert_array_equal(place.cut(photo), theirs)
        theirs_mask = masks.preprocess(Image.fromarray(mask, "L"), height=height, width=width, crops_coords=box,
                                       resize_mode="fill")[0, 0].numpy()
        np.testing.assert_array_equal(place.cut(mask) >= 128, theirs_mask == 1)


@pytest.mark.parametrize("feather", [0, 3, 12])
def test_overlay_is_diffusers_apply_overlay(feather):
    """Pasting a working-size result back into the photo through the (feathered) mask, bit for bit, with and
    without a crop box; where the mask is 0 the photo is untouched."""
    rng = np.random.default_rng(3 + feather)
    processor = VaeImageProcessor()
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(20, 300, 2))
        photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = regions.blur(random_mask(rng, h, w), feather)
        if not mask.any():  # a few scattered grey pixels blurred away
            continue
        width, height = WORKING[rng.integers(len(WORKING))]
        result = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        box = regions.crop_region(mask, width, height, int(rng.integers(0, 40)))
        theirs = processor.apply_overlay(Image.fromarray(mask, "L"), Image.fromarray(photo), Image.fromarray(result),
                                         box)
        ours = regions.overlay(mask, photo, result, box)
        np.testing.assert_array_equal(ours, np.asarray(theirs))
        np.testing.assert_array_equal(ours[mask == 0], photo[mask == 0])
        same_size = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # no crop: a result of the photo's size
        theirs = processor.apply_overlay(Image.fromarray(mask, "L"), Image.fromarray(photo), Image.fromarray(same_size))
        np.testing.assert_array_equal(regions.overlay(mask, photo, same_size), np.asarray(theirs))


def test_working_sizes_follow_the_aspect_ratio_at_the_native_pixel_count():
    assert regions.working_size(1.0, 512, 64) == (512, 512)
    assert regions.working_size(4 / 3, 512, 64) == (448, 576)
    assert regions.working_size(3 / 4, 512, 64) == (576, 448)
    assert regions.working_size(16 / 9, 512, 64) == (384, 640)
    assert regions.working_size(100.0, 512, 64) == (256, 1024)  # at most 4:1 (each side from native/2 to 2·native)
    for aspect in np.exp(np.linspace(-1.4, 1.4, 30)):
        h, w = regions.working_size(aspect, 512, 64)
        assert h % 64 == 0 and w % 64 == 0 and w * h <= 512 * 512
        assert w * h >= 0.8 * 512 * 512


def test_placement_without_a_crop_keeps_the_aspect_ratio_and_returns_the_photo_size():
    rng = np.random.default_rng(4)
    photo = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    mask[100:150, 200:260] = 255
    place = regions.plan(mask, height=None, width=None, padding_mask_crop=None, native=512, multiple=64)
    assert place.box == (0, 0, 400, 300) and place.size == (448, 576) and not place.crop
    x0, y0, x1, y1 = place.inner()
    assert (x1 - x0) / (y1 - y0) == pytest.approx(4 / 3, rel=0.01) and (x0, x1) == (0, 576)
    view = place.cut(photo)
    assert view.shape == (448, 576, 3)
    back = place.place(view, photo, mask)  # the identity, up to the two resizes
    assert back.shape == photo.shape and np.abs(back.astype(int) - photo).mean() < 40
    smooth = np.asarray(Image.fromarray(photo).resize((40, 30)).resize((400, 300), Image.BICUBIC))
    assert np.abs(place.place(place.cut(smooth), smooth, mask).astype(int) - smooth).max() <= 3


def test_placement_with_a_crop_follows_the_masks_box():
    mask = np.zeros((3024, 4032), np.uint8)
    mask[1000:1200, 2000:2400] = 255  # 400 × 200: a wide box
    place = regions.plan(mask, height=None, width=None, padding_mask_crop=32, native=512, multiple=64)
    assert place.crop and place.size == (384, 640)
    x0, y0, x1, y1 = place.box
    assert (x1 - x0) / (y1 - y0) == pytest.approx(640 / 384, rel=0.01)
    assert x0 <= 2000 - 32 and x1 >= 2400 + 32 and y0 <= 1000 - 32 and y1 >= 1200 + 32
    given = regions.plan(mask, height=512, width=512, padding_mask_crop=32, native=512, multiple=64)
    assert given.size == (512, 512) and given.box == regions.crop_region(mask, 512, 512, 32)
    with pytest.raises(ValueError, match="the mask is empty"):
        regions.plan(np.zeros((10, 10), np.uint8), height=None, width=None, padding_mask_crop=4, native=512,
                     multiple=64)

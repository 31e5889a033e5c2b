"""On-device augmentation: the reference's flip, rotation, blur, elastic deformation and normalisation, and
the rectangle / Bezier training masks. Probabilities are passed as floats so that one compiled function
per shape serves every setting."""
import ast
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pbe_jax.data import augment
from pbe_jax.data.augment import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, augment_reference, augment_references,
                                  shape_mask, shape_masks)

SIZE = 33  # odd, so that the centre of rotation is a pixel centre
B = 8
AUG = jax.jit(augment_references, static_argnames=("size", "elastic_sigma"))
MASKS = jax.jit(shape_masks, static_argnames=("size", "points_per_curve"))
OFF = dict(p_flip=0.0, p_rotate=0.0, p_blur=0.0, p_elastic=0.0)
MEAN, STD = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)


def normalise(x):
    return (np.asarray(x, np.float32) / 255.0 - MEAN) / STD


def pixels(y):
    """Normalised output back to 0..255."""
    return (np.asarray(y) * STD + MEAN) * 255.0


def plain(images, size=SIZE):
    """What the reference becomes with every augmentation off: bilinear resize and normalisation."""
    resized = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), size, size, 3), "bilinear")
    return normalise(resized)


def batch(image, n=B):
    return np.repeat(np.asarray(image, np.float32)[None], n, axis=0)


def random_images(seed=0, shape=(B, 40, 52, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_module_needs_only_jax_numpy_and_the_clip_constants():
    tree = ast.parse(inspect.getsource(augment))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n.split(".")[0] for n in names} <= {"__future__", "functools", "jax", "numpy", "pbe_jax"}
    assert {n for n in names if n.startswith("pbe_jax")} == {"pbe_jax.images"}  # the CLIP mean and std


def test_reference_shape_dtype_and_normalised_range():
    x = random_images()
    x[0] = 0
    x[1] = 255
    y = AUG(jax.random.key(0), x, size=SIZE, p_blur=1.0, p_elastic=1.0, p_rotate=1.0)
    assert y.shape == (B, SIZE, SIZE, 3) and y.dtype == jnp.float32
    lo, hi = -MEAN / STD, (1 - MEAN) / STD
    assert np.all(np.asarray(y) >= lo - 1e-5) and np.all(np.asarray(y) <= hi + 1e-5)
    np.testing.assert_allclose(y[0], np.broadcast_to(lo, y[0].shape), atol=1e-5)
    np.testing.assert_allclose(y[1], np.broadcast_to(hi, y[1].shape), atol=1e-5)
    # uint8 and float input are the same image
    np.testing.assert_array_equal(y, AUG(jax.random.key(0), x.astype(np.float32), size=SIZE, p_blur=1.0,
                                         p_elastic=1.0, p_rotate=1.0))


def test_reference_is_deterministic_per_key_and_varies_across_keys():
    x = batch(random_images(1)[0])
    y = np.asarray(AUG(jax.random.key(3), x, size=SIZE))
    np.testing.assert_array_equal(y, AUG(jax.random.key(3), x, size=SIZE))
    assert not np.allclose(y, AUG(jax.random.key(4), x, size=SIZE))
    distinct = {y[i].round(3).tobytes() for i in range(B)}
    assert len(distinct) >= B - 2  # the same image under B keys: all augmentations off has p ≈ 0.12


def test_all_off_is_plain_resize_and_normalisation():
    x = random_images(2)
    np.testing.assert_allclose(AUG(jax.random.key(0), x, size=SIZE, **OFF), plain(x), atol=1e-5)


@pytest.mark.parametrize("on", ["p_flip", "p_rotate", "p_blur", "p_elastic"])
def test_each_augmentation_alone_changes_every_image(on):
    x = random_images(3)
    y = np.asarray(AUG(jax.random.key(5), x, size=SIZE, **{**OFF, on: 1.0}))
    change = np.abs(y - plain(x)).max(axis=(1, 2, 3))
    assert np.all(change > 0.05), change


def test_flip_is_the_mirror_image():
    x = random_images(4)
    y = AUG(jax.random.key(6), x, size=SIZE, **{**OFF, "p_flip": 1.0})
    np.testing.assert_allclose(y, plain(x[:, :, ::-1]), atol=1e-5)


def angular_image(size=SIZE):
    """cos φ and sin φ of the angle about the centre in two channels: rotation adds to φ."""
    r, c = np.mgrid[:size, :size] - (size - 1) / 2
    phi = np.arctan2(r, c)
    return np.stack([127.5 + 100 * np.cos(phi), 127.5 + 100 * np.sin(phi), np.full_like(phi, 127.5)], -1), phi


@pytest.mark.parametrize("max_rotation", [20.0, 5.0])
def test_rotation_is_uniform_within_the_limit_about_the_centre(max_rotation):
    image, phi = angular_image()
    x = batch(image, 16)
    y = pixels(AUG(jax.random.key(7), x, size=SIZE, max_rotation=max_rotation, **{**OFF, "p_rotate": 1.0}))
    rho = np.hypot(*(np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2))
    ring = (rho >= 5) & (rho <= 15)  # inside the inscribed circle: no border involved
    turned = np.angle(np.exp(1j * (np.arctan2(y[..., 1] - 127.5, y[..., 0] - 127.5) - phi)))[:, ring]
    angles = np.degrees(np.median(turned, axis=1))
    # one rigid rotation per image, by at most max_rotation, of both signs and spread over the range
    assert np.all(np.degrees(turned.max(1) - turned.min(1)) < 2.0)
    assert np.all(np.abs(angles) <= max_rotation + 0.5), angles
    assert angles.min() < -0.3 * max_rotation and angles.max() > 0.3 * max_rotation, angles
    centre = SIZE // 2
    np.testing.assert_allclose(y[:, centre, centre], x[:, centre, centre], atol=1e-3)
    # borders are reflected: the corners keep the image's range instead of turning black
    assert y.min() > image.min() - 0.5 and y.max() < image.max() + 0.5


def checkerboard(size=SIZE, amplitude=100.0):
    r, c = np.mgrid[:size, :size]
    return np.repeat((127.5 + amplitude * (-1.0) ** (r + c))[..., None], 3, axis=-1)


def high_frequency_energy(y):
    return np.mean(np.diff(y, axis=1) ** 2) + np.mean(np.diff(y, axis=2) ** 2)


def test_blur_is_a_box_filter_of_size_3_5_or_7():
    x = batch(checkerboard())
    y = pixels(AUG(jax.random.key(8), x, size=SIZE, **{**OFF, "p_blur": 1.0}))
    assert high_frequency_energy(y) < 0.05 * high_frequency_energy(x)
    # a k×k mean of a ±100 checkerboard is ±100 / k², everywhere when borders are reflected (101)
    amplitude = np.abs(y - 127.5).reshape(B, -1)
    np.testing.assert_allclose(amplitude.min(1), amplitude.max(1), atol=1e-3)
    kernels = np.sqrt(100 / amplitude[:, 0]).round(3)
    assert set(kernels) <= {3.0, 5.0, 7.0} and len(set(kernels)) > 1, kernels


def test_elastic_deforms_smoothly_and_keeps_the_mean():
    r, c = np.mgrid[:SIZE, :SIZE]
    image = 127.5 + 80 * np.sin(2 * np.pi * c / 11) * np.cos(2 * np.pi * r / 13)
    x = batch(np.repeat(image[..., None], 3, axis=-1))
    y = pixels(AUG(jax.random.key(9), x, size=SIZE, **{**OFF, "p_elastic": 1.0}))
    change = np.abs(y - x).mean(axis=(1, 2, 3))
    assert np.all(change > 3.0), change  # visible
    assert np.all([np.corrcoef(y[i].ravel(), x[i].ravel())[0, 1] > 0.3 for i in range(B)])  # moderate
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), x.mean(), atol=3.0)
    assert y.min() > x.min() - 0.5 and y.max() < x.max() + 0.5  # bilinear, reflected: no new values


def test_batched_reference_is_the_per_image_function():
    x = random_images(5)
    key = jax.random.key(10)
    ys = AUG(key, x, size=SIZE)
    one = jax.jit(augment_reference, static_argnames=("size", "elastic_sigma"))
    for i, k in enumerate(jax.random.split(key, B)):
        np.testing.assert_allclose(ys[i], one(k, x[i], size=SIZE), atol=1e-5)


def rect(box, size):
    x0, y0, x1, y1 = box
    centres = np.arange(size) + 0.5
    inside_x = (centres >= x0) & (centres < x1)
    inside_y = (centres >= y0) & (centres < y1)
    return (inside_y[:, None] & inside_x[None, :]).astype(np.float32)


def test_rectangle_mask_is_the_extended_box():
    boxes = np.array([[10, 12, 20, 30], [0, 0, 64, 64], [30, 5, 31, 6], [8.3, 9.6, 40.5, 41.2]], np.float32)
    ext = boxes + np.array([-3, -2, 4, 1], np.float32)
    m = np.asarray(MASKS(jax.random.key(0), boxes, ext, size=64, p_bezier=0.0))
    assert m.dtype == np.float32 and m.shape == (4, 64, 64)
    for i in range(4):
        np.testing.assert_array_equal(m[i], rect(ext[i], 64))
    np.testing.assert_array_equal(m[0], np.pad(np.ones((21, 17)), ((10, 33), (7, 40))))


BOXES_512 = np.array([[150, 150, 350, 300], [40, 60, 120, 460], [200, 200, 260, 250], [100, 100, 400, 400]],
                     np.float32)
EXT_512 = np.array([[100, 80, 450, 400], [10, 20, 300, 500], [150, 120, 330, 300], [100, 100, 400, 400]],
                   np.float32)


def test_bezier_masks_at_512_stay_in_the_extended_box():
    m = np.asarray(MASKS(jax.random.key(1), BOXES_512, EXT_512, size=512, p_bezier=1.0))
    assert m.shape == (4, 512, 512) and set(np.unique(m)) <= {0.0, 1.0}
    for i, (box, ext) in enumerate(zip(BOXES_512, EXT_512)):
        assert np.all(m[i] <= rect(ext, 512))
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        assert m[i, int(cy), int(cx)] == 1
        box_area = (box[2] - box[0]) * (box[3] - box[1])
        ext_area = (ext[2] - ext[0]) * (ext[3] - ext[1])
        assert 0.7 * box_area < m[i].sum() <= ext_area
        if not np.array_equal(box, ext):
            assert m[i].sum() < ext_area - 0.1 * (ext_area - box_area)  # not the rectangle
            assert (m[i] * (1 - rect(box, 512))).sum() > 0.1 * box_area  # bulges into the free space
    again = MASKS(jax.random.key(1), BOXES_512, EXT_512, size=512, p_bezier=1.0)
    np.testing.assert_array_equal(m, again)
    assert not np.array_equal(m, MASKS(jax.random.key(2), BOXES_512, EXT_512, size=512, p_bezier=1.0))


def bezier_vertices(box, ext, n=19):
    """The un-jittered polygon, written out curve by curve."""
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = ext
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    curves = [((x0, y0), (xm, ey0), (x1, y0)), ((x1, y0), (ex1, ym), (x1, y1)),
              ((x1, y1), (xm, ey1), (x0, y1)), ((x0, y1), (ex0, ym), (x0, y0))]
    points = []
    for p0, c, p1 in curves:
        for i in range(1, n + 1):
            t = i / (n + 1)
            points.append(tuple((1 - t) ** 2 * np.array(p0) + 2 * t * (1 - t) * np.array(c) + t ** 2 * np.array(p1)))
    return points


def test_bezier_polygon_without_jitter_is_the_filled_curves():
    m = np.asarray(MASKS(jax.random.key(3), BOXES_512, EXT_512, size=512, p_bezier=1.0, jitter=0.0))
    for i, (box, ext) in enumerate(zip(BOXES_512, EXT_512)):
        v = np.array(bezier_vertices(box, ext))
        x, y = v.T
        area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        perimeter = np.hypot(*(np.roll(v, -1, axis=0) - v).T).sum()
        assert abs(m[i].sum() - area) < 0.05 * perimeter, (i, m[i].sum(), area)
        canvas = Image.new("L", (512, 512))
        # PIL's pixel (c, r) is centred on the integer point (c, r), ours on (c + 0.5, r + 0.5); PIL also
        # fills the pixels its outline touches, about half a perimeter more
        ImageDraw.Draw(canvas).polygon([tuple(p) for p in v - 0.5], fill=1)
        pil = np.asarray(canvas, np.float32)
        assert (m[i] > pil).sum() < 0.1 * perimeter and (pil > m[i]).sum() < 0.7 * perimeter


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_bezier_fraction_is_p_bezier(p):
    n = 200
    box, ext = np.array([8, 8, 20, 22], np.float32), np.array([2, 3, 30, 29], np.float32)
    m = np.asarray(MASKS(jax.random.key(4), np.tile(box, (n, 1)), np.tile(ext, (n, 1)), size=32, p_bezier=p))
    is_rect = np.all(m == rect(ext, 32), axis=(1, 2))
    assert abs((1 - is_rect.mean()) - p) < 0.1, is_rect.mean()


def test_batched_masks_are_the_per_example_function():
    key = jax.random.key(5)
    ms = MASKS(key, BOXES_512 / 8, EXT_512 / 8, size=64)
    one = jax.jit(shape_mask, static_argnames=("size", "points_per_curve"))
    for i, k in enumerate(jax.random.split(key, 4)):
        np.testing.assert_array_equal(ms[i], one(k, BOXES_512[i] / 8, EXT_512[i] / 8, size=64))

"""Training augmentation on the device: the reference's augmentation (the released code's Resize 224,
HorizontalFlip, Rotate ±20°, Blur, ElasticTransform, then CLIP normalisation) and the arbitrary-shape
masks of the released code (a quadratic Bezier curve per box edge, jittered, filled as a polygon).

Pure functions of an explicit `jax.random` key: the same key gives the same output. Every random choice
is drawn, both outcomes are computed and one is selected, so a function traces once and vmaps over a
batch (`augment_references`, `shape_masks` split one key per example). Images are float32 HWC with
pixel values 0..255 in; sizes and `elastic_sigma` are static under `jax.jit`, probabilities may be traced.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from pbe_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


_MAX_BLUR = 7  # albumentations' Blur(blur_limit=7): a k×k mean filter, k uniform in {3, 5, 7}


def augment_reference(key: jax.Array, reference: jax.Array, *, size: int = 224, p_flip: float = 0.5,
                      p_rotate: float = 0.5, max_rotation: float = 20.0, p_blur: float = 0.3,
                      p_elastic: float = 0.3, elastic_alpha: float = 1000.0, elastic_sigma: float = 50.0,
                      mean: tuple = OPENAI_CLIP_MEAN, std: tuple = OPENAI_CLIP_STD) -> jax.Array:
    """One reference image (H, W, 3), uint8 or float with values 0..255, to the CLIP encoder's float32
    (size, size, 3) input: bilinear resize (the identity at the same size), then with their probabilities
    a box blur (a k×k mean, k uniform in {3, 5, 7}), a horizontal flip, a rotation by an angle uniform in
    ±`max_rotation` degrees about the centre (counter-clockwise when positive) and an elastic deformation
    (per-pixel displacements uniform in [-1, 1], smoothed by a Gaussian of `elastic_sigma`, times
    `elastic_alpha`; both given for a 224 image and scaled with `size`); then clip to 0..255, scale to 0..1
    and normalise with `mean`/`std`. Flip, rotation and deformation are one sampling grid, so the resized image
    is resampled once, with reflected borders (reflect-101: no black corners). With every probability 0 the
    output is exactly the plain resize + normalisation. The defaults against the released code's
    albumentations, and why: docs/data.md#the-references-augmentation."""
    k_flip, k_rotate, k_angle, k_blur, k_kernel, k_elastic, k_field = jax.random.split(key, 7)
    x = jax.image.resize(jnp.asarray(reference, jnp.float32), (size, size, 3), "bilinear")

    kernel = 3 + 2 * jax.random.randint(k_kernel, (), 0, 3)
    x = jnp.where(_draw(k_blur, p_blur), _box_blur(x, kernel), x)

    scale = size / 224
    field = _smooth_noise(k_field, size, elastic_sigma * scale) * (elastic_alpha * scale ** 2)
    field = jnp.where(_draw(k_elastic, p_elastic), field, 0.0)
    angle = jax.random.uniform(k_angle, (), jnp.float32, -max_rotation, max_rotation)
    angle = jnp.where(_draw(k_rotate, p_rotate), jnp.deg2rad(angle), 0.0)
    rows, cols = _source_grid(size, _draw(k_flip, p_flip), angle, field)
    x = jax.vmap(lambda ch: map_coordinates(ch, (rows, cols), order=1, mode="mirror"), 2, 2)(x)

    x = jnp.clip(x, 0.0, 255.0) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# augment_reference's probabilities for no augmentation: the plain resize and normalisation.
NO_AUGMENTATION = {"p_flip": 0, "p_rotate": 0, "p_blur": 0, "p_elastic": 0}


def augment_references(key: jax.Array, references: jax.Array, **kwargs) -> jax.Array:
    """`augment_reference` over a batch (B, H, W, 3), one key split per image; keyword arguments as there."""
    keys = jax.random.split(key, references.shape[0])
    return jax.vmap(functools.partial(augment_reference, **kwargs))(keys, references)


def _draw(key: jax.Array, p: float | jax.Array) -> jax.Array:
    """True with probability p (0 never, 1 always); p may be a Python int such as 0 or 1."""
    return jax.random.bernoulli(key, jnp.asarray(p, jnp.float32))


def _box_blur(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Mean over a kernel×kernel window (kernel odd, at most 7, may be traced), reflect-101 borders. The
    7 taps are always summed; those outside the window weigh 0, so one graph serves every kernel size."""
    r = _MAX_BLUR // 2
    weights = jnp.where(jnp.abs(jnp.arange(-r, r + 1)) <= kernel // 2, 1.0 / kernel, 0.0)
    h, w = x.shape[:2]
    padded = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")  # numpy's "reflect" is reflect-101
    rows = sum(weights[i] * padded[i:i + h] for i in range(_MAX_BLUR))
    return sum(weights[i] * rows[:, i:i + w] for i in range(_MAX_BLUR))


@functools.lru_cache(maxsize=16)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """G (n, n) with G @ f = f filtered along its first axis by a Gaussian truncated at 4σ, reflect-101
    borders. A matrix rather than a convolution because the kernel (σ = 50 at 224) is wider than the
    image and folds over it several times."""
    radius = int(np.ceil(4 * sigma))
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    period = max(2 * n - 2, 1)
    src = np.mod(np.arange(n)[:, None] + offsets, period)
    src = np.where(src >= n, period - src, src)
    g = np.zeros((n, n), np.float32)
    np.add.at(g, (np.repeat(np.arange(n), offsets.size), src.ravel()), np.tile(taps / taps.sum(), n))
    return g


def _smooth_noise(key: jax.Array, size: int, sigma: float) -> jax.Array:
    """Two (size, size) fields, (row, column) displacements: uniform [-1, 1] noise smoothed by σ."""
    g = jnp.asarray(_gaussian_matrix(size, float(sigma)))
    noise = jax.random.uniform(key, (2, size, size), jnp.float32, -1.0, 1.0)
    return jnp.einsum("ij,cjk,lk->cil", g, noise, g)


def _source_grid(size: int, flip: jax.Array, angle: jax.Array, field: jax.Array):
    """The (row, column) of the resized image that each output pixel reads. The image is flipped, then
    rotated, then deformed, so a pixel p reads flip(rotate⁻¹(p + field(p))). With no flip, angle 0 and
    field 0 every coordinate is an integer and bilinear sampling returns the image unchanged."""
    rows, cols = jnp.meshgrid(*(jnp.arange(size, dtype=jnp.float32),) * 2, indexing="ij")
    centre = (size - 1) / 2
    dr, dc = rows + field[0] - centre, cols + field[1] - centre
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rows, cols = centre + cos * dr + sin * dc, centre + cos * dc - sin * dr
    return rows, jnp.where(flip, size - 1 - cols, cols)


def shape_mask(key: jax.Array, box: jax.Array, box_ext: jax.Array, *, size: int = 512,
               p_bezier: float = 0.5, jitter: float = 5.0, points_per_curve: int = 19) -> jax.Array:
    """The training mask, float32 (size, size), 1 = the region to edit. `box` ⊆ `box_ext` are (x0, y0, x1,
    y1) in pixels of the size×size image; a pixel (r, c) is covered by a region when its centre
    (c + 0.5, r + 0.5) is in it, so an integer box covers exactly mask[y0:y1, x0:x1].

    With probability 1 − `p_bezier` the mask is the extended box. Otherwise it is the released code's
    arbitrary shape: one quadratic Bezier curve per edge of `box`, from corner to corner clockwise, its
    control point at the middle of the same side of `box_ext`, so that the shape bulges into the free
    space that the extension added; `points_per_curve` points at t = i / (points_per_curve + 1), each
    coordinate jittered uniformly by ±`jitter` px and clipped to `box_ext`, filled as a polygon
    (even-odd rule), so it never leaves the extended box."""
    k_shape, k_jitter = jax.random.split(key)
    box, box_ext = jnp.asarray(box, jnp.float32), jnp.asarray(box_ext, jnp.float32)
    centres = jnp.arange(size, dtype=jnp.float32) + 0.5
    ys, xs = centres[:, None], centres[None, :]
    x0, y0, x1, y1 = box_ext
    rect = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    vertices = _bezier_polygon(k_jitter, box, box_ext, jitter, points_per_curve)
    shape = _fill_polygon(vertices, ys, xs)
    return jnp.where(_draw(k_shape, p_bezier), shape, rect).astype(jnp.float32)


def shape_masks(key: jax.Array, boxes: jax.Array, boxes_ext: jax.Array, **kwargs) -> jax.Array:
    """`shape_mask` over a batch of boxes (B, 4), one key split per mask: (B, size, size)."""
    keys = jax.random.split(key, boxes.shape[0])
    return jax.vmap(functools.partial(shape_mask, **kwargs))(keys, boxes, boxes_ext)


def _bezier_polygon(key: jax.Array, box: jax.Array, box_ext: jax.Array, jitter: float,
                    points_per_curve: int) -> jax.Array:
    """The (4 · points_per_curve, 2) x, y vertices: top, right, bottom, left curve in turn."""
    x0, y0, x1, y1 = box
    ex0, ey0, ex1, ey1 = box_ext
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    corners = jnp.stack([jnp.stack([x0, y0]), jnp.stack([x1, y0]), jnp.stack([x1, y1]), jnp.stack([x0, y1])])
    controls = jnp.stack([jnp.stack([xm, ey0]), jnp.stack([ex1, ym]), jnp.stack([xm, ey1]),
                          jnp.stack([ex0, ym])])
    t = (jnp.arange(points_per_curve, dtype=jnp.float32) + 1) / (points_per_curve + 1)
    t = t[None, :, None]
    points = ((1 - t) ** 2 * corners[:, None] + 2 * t * (1 - t) * controls[:, None]
              + t ** 2 * jnp.roll(corners, -1, axis=0)[:, None]).reshape(-1, 2)
    points = points + jax.random.uniform(key, points.shape, jnp.float32, -jitter, jitter)
    return jnp.clip(points, jnp.stack([ex0, ey0]), jnp.stack([ex1, ey1]))


def _fill_polygon(vertices: jax.Array, ys: jax.Array, xs: jax.Array) -> jax.Array:
    """Even-odd fill: a pixel centre is inside when an odd number of edges cross the ray to its right. A
    scan over the edges keeps one (H, W) parity image live, not the (H, W, edges) crossings (20 M per
    512² mask)."""
    def cross(inside, edge):
        (ax, ay), (bx, by) = edge
        straddles = (ay > ys) != (by > ys)  # half-open, so a vertex on the ray counts once
        x_at = ax + (ys - ay) * (bx - ax) / jnp.where(straddles, by - ay, 1.0)
        return inside ^ (straddles & (xs < x_at)), None

    edges = jnp.stack([vertices, jnp.roll(vertices, -1, axis=0)], axis=1)
    inside, _ = jax.lax.scan(cross, jnp.zeros((ys.shape[0], xs.shape[1]), bool), edges)
    return inside

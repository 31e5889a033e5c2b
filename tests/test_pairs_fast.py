"""`pairs.make_pair` cuts its crops with PIL; these check that its pairs are those of the plain numpy way (slice,
zero-pad, resize each crop on its own), bit for bit, wherever the square lands."""
import numpy as np
from PIL import Image

from pbe_jax.data import pairs


def resize(rgb, size):
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC)) if rgb.shape[0] != size else rgb


def reference_pair(item, rng, config):
    """The pair drawn with make_pair's geometry, its pixels cut from the numpy array."""
    image = item["image"]
    h, w = image.shape[:2]
    boxes, _ = pairs.valid_boxes(item["boxes"], h, w, config.min_box_fraction * h * w)
    box = boxes[rng.integers(len(boxes))]
    x0, y0, x1, y1 = pixel_box = pairs._pixel_box(box)
    p = config.pad
    padded = image[max(y0 - p, 0):min(y1 + p, h), max(x0 - p, 0):min(x1 + p, w)]
    reference = np.asarray(Image.fromarray(padded).resize((config.reference_size,) * 2, Image.BICUBIC))
    ext = pairs._fit_extension(pairs._extend(pixel_box, h, w, config.extend_max, rng), pixel_box, min(h, w))
    x, y, side = pairs._square(ext, h, w, config.shrink_max, rng)
    square = np.zeros((side, side, 3), np.uint8)
    cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + side, w), min(y + side, h)
    square[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = image[cy0:cy1, cx0:cx1]
    scale = config.image_size / side
    origin = np.asarray([x, y, x, y], np.float64)
    return {"image": resize(square, config.image_size), "reference": reference,
            "box": np.clip((box - origin) * scale, 0, config.image_size).astype(np.float32),
            "box_ext": np.clip((ext - origin) * scale, 0, config.image_size).astype(np.float32),
            "side": side, "padded": (cx1 - cx0, cy1 - cy0) != (side, side)}


def random_item(rng):
    """A noisy image (every pixel differs, so a one-pixel shift shows) of random aspect, with 1-3 boxes of
    which some are longer than the short side or reach past the image."""
    w, h = (int(v) for v in rng.integers(24, 160, 2))
    if rng.random() < 0.3:  # a strip: boxes across it are longer than its short side
        w, h = (w * 3, max(h // 3, 12)) if rng.random() < 0.5 else (max(w // 3, 12), h * 3)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = []
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = rng.uniform(-0.2 * w, 0.8 * w), rng.uniform(-0.2 * h, 0.8 * h)
        boxes.append([x0, y0, x0 + rng.uniform(0.2, 1.2) * w, y0 + rng.uniform(0.2, 1.2) * h])
    return {"image": image, "boxes": np.asarray(boxes, np.float32), "id": "random"}


def test_make_pair_matches_numpy_crops_bit_for_bit():
    rng = np.random.default_rng(0)
    configs = [pairs.PairConfig(image_size=64, reference_size=32), pairs.PairConfig(image_size=48, reference_size=40),
               pairs.PairConfig(image_size=512, reference_size=224)]
    padded = upsampled = downsampled = 0
    for trial in range(400):
        item, config = random_item(rng), configs[trial % len(configs)]
        try:
            got = pairs.make_pair(item, np.random.default_rng(trial), config)
        except pairs.NoValidBox:
            continue
        want = reference_pair(item, np.random.default_rng(trial), config)
        for k in ("image", "reference", "box", "box_ext"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"trial {trial}: {k}")
        padded += want["padded"]
        upsampled += want["side"] < config.image_size
        downsampled += want["side"] > config.image_size
    # Squares leaving the image (zero padding) and both resampling directions were all compared.
    assert padded >= 20 and upsampled >= 50 and downsampled >= 50, (padded, upsampled, downsampled)

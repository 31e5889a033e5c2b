"""The attribute classifier: did the edit put the reference's object in the box? A small CNN trained on the
synthetic world's own labels (shape, colour, pattern of `pbe_jax.data.synthetic`) reads a crop of the
generated region; its agreement with the reference's attributes is the benchmark's attribute score.

Training crops are objects of scenes from the generator's `render_scene` (only objects at least 90 % in
view: an edit puts its object on top), cut at their box grown by up to 30 % of its size on each side (the
benchmark's box is the mask's, somewhat larger than the object; much looser boxes leave too few pixels at
this resolution to tell a hexagon from a circle), with neighbours as the scene has them. Mild blur,
brightness changes and noise stand in for what a diffusion model changes. Every crop is resized to
`image_size`² in the same way for training and scoring (`resize_crops`).

Saved as a folder: `config.json` (architecture, and how it was trained and how well it scored) and
`params.safetensors` (Flax names and layouts).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageFilter

from pbe_jax import storage
from pbe_jax.convert import mapping
from pbe_jax.convert.weights import load_file, save_safetensors
from pbe_jax.data.synthetic import COLOURS, PATTERNS, SHAPES, colour_names, palette, render_scene
from pbe_jax.eval.metrics import crop
from pbe_jax.models import ConfigError, Policy
from pbe_jax.models.layers import conv, group_norm, linear
from pbe_jax.storage import Path, PathLike

ATTRIBUTES = ("shape", "colour", "pattern")
CONFIG_FILE, PARAMS_FILE = "config.json", "params.safetensors"
FORMAT = "pbe_jax.attribute_classifier"
# Training scenes: small, with objects 14–29 px in radius, large enough that their patterns have the
# proportions the benchmark's larger scenes give them (a pattern's period is a fraction of the object's size,
# but never under 4 px).
SCENE_SIZE, RADIUS = 128, (0.11, 0.22)
TRAIN_STEPS, SHAPE_WEIGHT, MARGIN = 3000, 5.0, 0.3


def classes_of(extra_colours: Sequence[str] = ()) -> tuple[int, int, int]:
    """How many shapes, colours and patterns the synthetic world with `extra_colours` has."""
    return len(SHAPES), len(colour_names(extra_colours)), len(PATTERNS)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)  # one stage (3×3 conv, GroupNorm, ReLU, 2× max-pool) per entry
    classes: tuple[int, int, int] = (len(SHAPES), len(COLOURS), len(PATTERNS))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "widths": list(self.widths), "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "ClassifierConfig":
        try:
            return cls(image_size=int(d["image_size"]), widths=tuple(int(w) for w in d["widths"]),
                       classes=tuple(int(c) for c in d["classes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not an attribute classifier config (needs image_size, widths, "
                              f"classes): {type(e).__name__}: {e}") from e


class AttributeClassifier(nnx.Module):
    """Pixel values 0–255 (B, S, S, 3) → logits for shape, colour and pattern."""

    def __init__(self, config: ClassifierConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        self.config = config
        chans = (3,) + config.widths
        self.convs = nnx.List([conv(i, o, 3, policy, rngs) for i, o in zip(chans, config.widths)])
        self.norms = nnx.List([group_norm(w, 8, 1e-5, policy, rngs) for w in config.widths])
        # The heads read the whole last feature map, not a pooled vector: a shape is an arrangement of edges.
        side = config.image_size // 2 ** len(config.widths)
        features = side * side * config.widths[-1]
        self.shape, self.colour, self.pattern = (linear(features, n, True, policy, rngs) for n in config.classes)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = pixels / 127.5 - 1.0
        for layer, norm in zip(self.convs, self.norms):
            x = nnx.max_pool(jax.nn.relu(norm(layer(x))), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.shape(x), self.colour(x), self.pattern(x)


def resize_crops(crops: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 crops of any sizes → uint8 (N, size, size, 3); bilinear with PIL's antialiasing when shrinking."""
    out = np.empty((len(crops), size, size, 3), np.uint8)
    for i, c in enumerate(crops):
        c = np.asarray(c)
        if c.ndim != 3 or c.shape[-1] != 3 or c.shape[0] < 1 or c.shape[1] < 1:
            raise ValueError(f"crop {i}: expected a non-empty (H, W, 3) image, got shape {c.shape}")
        out[i] = np.asarray(Image.fromarray(c.astype(np.uint8)).resize((size, size), Image.BILINEAR))
    return out


def render_crops(n: int, rng: np.random.Generator, size: int = 32, colours: Sequence = COLOURS
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`n` labelled crops of objects in generated scenes (colours from `colours`, a world's palette), blurred
    a little 30 % of the time (generated images are softer than rendered ones): uint8 (n, size, size, 3) and
    int32 (n, 3) labels in ATTRIBUTES order. Objects less than 90 % in view are passed over: an edit puts its
    object on top."""
    crops, labels = [], []
    while len(crops) < n:
        scene = render_scene(rng, SCENE_SIZE, max_objects=3, radius=RADIUS, colours=colours)
        for obj in scene.objects:
            if len(crops) == n or obj["visible"] < 0.9:
                continue
            x0, y0, x1, y1 = obj["box"]
            grow = rng.uniform(0, MARGIN, 4) * [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
            im = Image.fromarray(crop(scene.image, (x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3])))
            if rng.random() < 0.3:
                im = im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
            crops.append(np.asarray(im.resize((size, size), Image.BILINEAR)))
            labels.append([obj[a] for a in ATTRIBUTES])
    return np.stack(crops), np.asarray(labels, np.int32)


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """A random symmetry of the square (none changes a shape, colour or pattern class), then brightness
    × 0.85–1.15 and Gaussian noise of σ up to 6 levels, per image: float32 (B, S, S, 3) in 0–255."""
    b = x.shape[0]
    k_sym, k_gain, k_sigma, k_noise = jax.random.split(key, 4)
    flips = jax.random.bernoulli(k_sym, 0.5, (3, b, 1, 1, 1))
    x = jnp.where(flips[0], jnp.swapaxes(x, 1, 2), x)
    x = jnp.where(flips[1], x[:, ::-1], x)
    x = jnp.where(flips[2], x[:, :, ::-1], x)
    x = x * jax.random.uniform(k_gain, (b, 1, 1, 1), minval=0.85, maxval=1.15)
    x = x + jax.random.normal(k_noise, x.shape) * jax.random.uniform(k_sigma, (b, 1, 1, 1), maxval=6.0)
    return jnp.clip(x, 0, 255)


def _loss(model: AttributeClassifier, x: jax.Array, y: jax.Array) -> jax.Array:
    # Shape is learnt last (colour and pattern are read off almost at once): weighting it keeps the short
    # training spent where the errors are.
    weights = (SHAPE_WEIGHT, 1.0, 1.0)
    return sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y[:, i]).mean()
               for i, (w, logits) in enumerate(zip(weights, model(x))))


@jax.jit
def _logits(graphdef, params, x):
    return nnx.merge(graphdef, params)(x)


def predict(classifier: AttributeClassifier, crops: Sequence[np.ndarray], batch_size: int = 256) -> np.ndarray:
    """Predicted (shape, colour, pattern) indices, int (N, 3), for uint8 crops of any sizes."""
    x = resize_crops(crops, classifier.config.image_size)
    graphdef, params = nnx.split(classifier)
    out = []
    for i in range(0, len(x), batch_size):
        chunk = x[i:i + batch_size]
        pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.uint8)  # one shape, one compile
        logits = _logits(graphdef, params, np.concatenate([chunk, pad]).astype(np.float32))
        out.append(np.stack([np.asarray(z).argmax(-1) for z in logits], -1)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def attribute_score(classifier: AttributeClassifier, crops: Sequence[np.ndarray], labels) -> dict:
    """Accuracy of the classifier's reading of `crops` against `labels` ((N, 3) indices in ATTRIBUTES order)
    per attribute, and the fraction with all three right."""
    labels = np.asarray(labels).reshape(-1, 3)
    if len(labels) != len(crops):
        raise ValueError(f"{len(crops)} crops but {len(labels)} labels")
    if not len(crops):
        raise ValueError("attribute_score needs at least one crop")
    return accuracy(predict(classifier, crops), labels)


def accuracy(predicted, labels) -> dict:
    """Per-attribute accuracy of (N, 3) predicted indices against (N, 3) labels, and all three right."""
    correct = np.asarray(predicted).reshape(-1, 3) == np.asarray(labels).reshape(-1, 3)
    return {**{a: float(correct[:, i].mean()) for i, a in enumerate(ATTRIBUTES)},
            "all": float(correct.all(-1).mean()), "n": len(correct)}


def train_classifier(steps: int = TRAIN_STEPS, seed: int = 0, *, batch_size: int = 32, lr: float = 1e-2,
                     pool: int = 8192, config: ClassifierConfig = ClassifierConfig(), held_out: int = 1024,
                     log_every: int = 0, extra_colours: Sequence[str] = ()) -> tuple[AttributeClassifier, dict]:
    """Train with AdamW (warm-up, then cosine decay) on batches drawn from `pool` rendered crops, each drawn
    batch under a fresh `augment`; return the classifier and its `attribute_score` on `held_out` crops from
    scenes the training never saw. The world is the one with `extra_colours` (its colour head as wide). The loss goes to stderr every `log_every` steps. (Rendering a crop costs
    about as much as training on it, so crops are rendered once and reused under the square's eight
    symmetries rather than drawn anew for every step.)"""
    t0 = time.perf_counter()
    colours = palette(extra_colours)
    config = dataclasses.replace(config, classes=classes_of(extra_colours))
    pool_x, pool_y = render_crops(pool, np.random.default_rng([seed, 0]), config.image_size, colours)
    pool_x, pool_y = jnp.asarray(pool_x), jnp.asarray(pool_y)
    model = AttributeClassifier(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), max(steps, 1))
    tx = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key, pool_x, pool_y):
        k_pick, k_aug = jax.random.split(key)
        pick = jax.random.randint(k_pick, (batch_size,), 0, pool_x.shape[0])
        x, y = augment(k_aug, pool_x[pick].astype(jnp.float32)), pool_y[pick]
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(seed)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(key, i), pool_x, pool_y)
        if log_every and (i + 1) % log_every == 0:
            print(f"attribute classifier: step {i + 1}/{steps} loss {float(loss):.3f}", file=sys.stderr,
                  flush=True)
    model = nnx.merge(graphdef, params)
    x, y = render_crops(held_out, np.random.default_rng([seed, 1]), config.image_size, colours)
    score = attribute_score(model, list(x), y)
    score["train_seconds"] = round(time.perf_counter() - t0, 1)
    return model, score


def save(classifier: AttributeClassifier, folder: PathLike, info: dict | None = None) -> Path:
    """Write `folder/config.json` (with `info`, e.g. the training score) and `folder/params.safetensors`."""
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = {mapping.flax_name(p): a for p, a in mapping.module_params(classifier).items()}
    save_safetensors(params, folder / PARAMS_FILE, {"format": FORMAT})
    config = {"format": FORMAT, **classifier.config.to_dict(), "attributes": list(ATTRIBUTES),
              "info": dict(info or {})}
    storage.write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def load(folder: PathLike, extra_colours: Sequence[str] = ()) -> AttributeClassifier:
    """A saved classifier, checked to read the world with `extra_colours`."""
    folder = storage.path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a saved attribute classifier")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if d.get("format") != FORMAT:
        raise ConfigError(f"{path}: format is {d.get('format')!r}, expected {FORMAT!r}")
    config = ClassifierConfig.from_dict(d, str(path))
    if config.classes != classes_of(extra_colours):
        raise ConfigError(f"{path}: classes {list(config.classes)} do not match the synthetic world's "
                          f"{list(classes_of(extra_colours))} (shapes, colours, patterns)")
    params = {mapping.parse_flax_name(k): v for k, v in load_file(folder / PARAMS_FILE).items()}
    return mapping.materialize(AttributeClassifier, config, Policy(), params, str(folder / PARAMS_FILE))


__all__ = ["ATTRIBUTES", "AttributeClassifier", "ClassifierConfig", "accuracy", "classes_of", "attribute_score", "augment", "load",
           "predict", "render_crops", "resize_crops", "save", "train_classifier"]

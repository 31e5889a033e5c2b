"""Training the small frozen networks of the offline model on the synthetic world: the autoencoder
(reconstruction + KL, as SD's VAE) and the CLIP-architecture vision tower, supervised on the generator's
object attributes (shape, colour, pattern) through linear heads on its pooled output, so that the pooled
token carries what an exemplar should transfer. Each writes a component folder that
`model.init="components"` starts Paint-by-Example training from."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pbe_jax import storage
from pbe_jax.convert import mapping, save_component
from pbe_jax.convert.init import BOTTLENECK, random_module, random_params
from pbe_jax.data import synthetic
from pbe_jax.models import (AutoencoderKL, CLIPVisionConfig, CLIPVisionModel, PaintByExampleImageEncoder, Policy,
                            VAEConfig)
from pbe_jax.models.layers import linear
from pbe_jax.storage import Path
from pbe_jax.train.config import TrainConfig

Log = Callable[[int, dict], None]
SHAPE_WEIGHT = 3.0  # the tower's shape loss counts this much more: colour and pattern are learnt in a few hundred steps


def fit(loss_fn, module: nnx.Module, batches: Iterator, steps: int, lr: float, log: Log, every: int = 50,
        warmup: int = 0):
    """AdamW with linear warmup over `warmup` steps then cosine decay to the end, on every parameter of
    `module`, one jitted step; returns the trained module and the last logged metrics.
    `loss_fn(module, batch, key) -> (loss, aux dict)`."""
    graphdef, params = nnx.split(module)
    warmup = min(warmup, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, 0.05 * lr) if warmup else \
        optax.cosine_decay_schedule(lr, steps, 0.05)
    opt = optax.adamw(schedule, weight_decay=1e-4)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p), batch, key)

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value, **aux}

    t0, metrics, key = time.perf_counter(), {}, jax.random.key(0)
    for i in range(steps):
        params, opt_state, m = step(params, opt_state, next(batches), jax.random.fold_in(key, i))
        if (i + 1) % every == 0 or i + 1 == steps:
            metrics = {k: float(v) for k, v in m.items()}
            log(i + 1, {**metrics, "steps_per_s": (i + 1) / (time.perf_counter() - t0)})
    return nnx.merge(graphdef, params), metrics


def scene_batches(size: int, scene_size: int, batch: int, seed: int, count: int) -> Iterator[jax.Array]:
    """Endless batches of random square crops (side between `size` and `scene_size`) of synthetic scenes,
    resized to `size`: the zoom range the Paint-by-Example pairs show. Float NHWC in [-1, 1]."""
    from PIL import Image

    source = synthetic.SyntheticSource(count, seed=seed, image_size=scene_size)
    rng = np.random.default_rng(seed)
    while True:
        images = []
        for i in rng.integers(0, len(source), batch):
            side = int(rng.integers(size, scene_size + 1))
            y, x = rng.integers(0, scene_size - side + 1, 2)
            crop = source[int(i)]["image"][y:y + side, x:x + side]
            images.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC)))
        yield jnp.asarray(np.stack(images).astype(np.float32) / 127.5 - 1.0)


def vae_loss(vae: AutoencoderKL, x: jax.Array, key: jax.Array, beta: float = 1e-6):
    posterior = vae.encode(x)
    rec = vae.decode(posterior.sample(key))
    l1, l2 = jnp.mean(jnp.abs(rec - x)), jnp.mean(jnp.square(rec - x))
    kl = 0.5 * jnp.mean(jnp.sum(jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1 - posterior.logvar, -1))
    return l1 + l2 + beta * kl, {"l1": l1, "kl": kl}


def latent_scaling_factor(vae: AutoencoderKL, batches: Iterator[jax.Array], count: int = 16) -> float:
    """1 / the standard deviation of the posterior means over `count` batches, Stable Diffusion's rule
    (its 0.18215): the diffusion model then sees latents of unit variance, which its noise schedule assumes."""
    encode = jax.jit(lambda x: vae.encode(x).mean)
    means = np.concatenate([np.asarray(encode(next(batches))).ravel() for _ in range(count)])
    return float(1.0 / means.std())


def train_vae(cfg: TrainConfig, workdir: Path, log: Log) -> Path:
    """The autoencoder on scenes at data.image_size; writes workdir/export/vae (this project's format)."""
    vae = random_module(AutoencoderKL, VAEConfig.from_dict(cfg.model.vae, "model.vae"), Policy(), cfg.seed)
    d = cfg.data
    batches = scene_batches(d.image_size, d.scene_size or d.image_size, d.batch_size, cfg.seed, d.size)
    vae, _ = fit(vae_loss, vae, batches, cfg.steps, cfg.optim.lr, log, cfg.log_every, cfg.optim.warmup_steps)
    # Measured on the stream's first batches again (a new iterator, same seed): any scenes of the world do.
    first = scene_batches(d.image_size, d.scene_size or d.image_size, d.batch_size, cfg.seed, d.size)
    vae.config = dataclasses.replace(vae.config, scaling_factor=latent_scaling_factor(vae, first))
    out = storage.path(workdir) / "export" / "vae"
    save_component(vae, out, "vae", format="jax")
    return out


def sincos_positions(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embeddings (as MAE's), (1 + grid², dim), the class token's row zero: half
    the channels code the row, half the column, at geometrically spaced frequencies."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    angles = [pos.reshape(-1, 1) * freqs for pos in (rows, cols)]
    table = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], 1)
    table = np.pad(table, ((0, 0), (0, dim - table.shape[1])))
    return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


class TowerClassifier(nnx.Module):
    """The vision tower with one linear head per attribute on its pooled output. Its position embeddings
    start from a 2-D sine-cosine table rather than noise: trained from scratch, a ViT with random positions
    learns colour and pattern (a bag of patches tells those) long before shape (where the patches are)."""

    def __init__(self, config: CLIPVisionConfig, *, policy: Policy = Policy(), rngs: nnx.Rngs):
        self.tower = CLIPVisionModel(config, policy=policy, rngs=rngs)
        table = self.tower.vision_model.embeddings.position_embedding.embedding
        table[...] = jnp.asarray(sincos_positions(config.image_size // config.patch_size, config.hidden_size),
                                 table[...].dtype)
        d = config.hidden_size
        self.heads = nnx.List([linear(d, n, True, policy, rngs) for n in
                               (len(synthetic.SHAPES), len(synthetic.COLOURS), len(synthetic.PATTERNS))])

    def __call__(self, pixels: jax.Array) -> list[jax.Array]:
        _, pooled = self.tower(pixels)
        return [head(pooled) for head in self.heads]


def object_crop(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One object of random attributes, pose and scale on a random background, as a reference crop would
    show it (a few pixels of context around the object), with its (shape, colour, pattern) labels."""
    from PIL import Image

    labels = (int(rng.integers(len(synthetic.SHAPES))), int(rng.integers(len(synthetic.COLOURS))),
              int(rng.integers(len(synthetic.PATTERNS))))
    canvas = Image.fromarray(synthetic.SyntheticSource(1, seed=int(rng.integers(2**31)), image_size=size,
                                                       min_objects=0, max_objects=0)[0]["image"])
    radius = rng.uniform(0.3, 0.48) * size
    centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    synthetic.render_object(canvas, *labels, centre=centre, radius=radius, rotation=rng.uniform(0, 2 * np.pi),
                            rng=rng)
    return np.asarray(canvas), labels


def crop_batches(size: int, batch: int, seed: int) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Endless batches of CLIP-normalised object crops and their (shape, colour, pattern) labels."""
    from pbe_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    rng = np.random.default_rng(seed)
    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    while True:
        crops, labels = zip(*(object_crop(rng, size) for _ in range(batch)))
        x = (np.stack(crops).astype(np.float32) / 255.0 - mean) / std
        yield jnp.asarray(x), jnp.asarray(np.asarray(labels, np.int32))


def tower_loss(model: TowerClassifier, batch, key):
    x, labels = batch
    logits = model(x)
    losses = [optax.softmax_cross_entropy_with_integer_labels(l, labels[:, i]).mean() for i, l in enumerate(logits)]
    accuracy = [jnp.mean(jnp.argmax(l, -1) == labels[:, i]) for i, l in enumerate(logits)]
    metrics = {"acc_shape": accuracy[0], "acc_colour": accuracy[1], "acc_pattern": accuracy[2]}
    return SHAPE_WEIGHT * losses[0] + losses[1] + losses[2], metrics


def train_tower(cfg: TrainConfig, workdir: Path, log: Log) -> Path:
    """The vision tower on attribute classification of object crops at its image size; writes an
    image_encoder component (tower trained, bottleneck and uncond vector fresh) to workdir/export/."""
    ccfg = CLIPVisionConfig.from_dict(cfg.model.image_encoder, "model.image_encoder")
    model = TowerClassifier(ccfg, rngs=nnx.Rngs(cfg.seed))
    model, _ = fit(tower_loss, model, crop_batches(ccfg.image_size, cfg.data.batch_size, cfg.seed), cfg.steps,
                   cfg.optim.lr, log, cfg.log_every, cfg.optim.warmup_steps)
    tower = {("model",) + p: a for p, a in mapping.module_params(model.tower).items()}
    fresh = random_params(PaintByExampleImageEncoder, ccfg, Policy(), cfg.seed, only=BOTTLENECK)
    encoder = mapping.materialize(PaintByExampleImageEncoder, ccfg, Policy(), {**tower, **fresh}, "trained tower")
    out = storage.path(workdir) / "export" / "image_encoder"
    save_component(encoder, out, "image_encoder", format="jax")
    return out

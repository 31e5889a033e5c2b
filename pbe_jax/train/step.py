"""The training step (Paint by Example's recipe): masks and reference augmentation made on device, frozen
VAE and CLIP tower, condition dropped to the uncond vector with probability p, ε-prediction MSE, AdamW."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pbe_jax import parallel
from pbe_jax.data import augment
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step reads of TrainConfig, under the same names (`from_train_config`)."""

    cond_drop: float = 0.2
    cond_drop_per_batch: bool = False
    ema_decay: float = 0.0
    bezier_mask_p: float = 0.5
    reference_augment: bool = True
    dtype: str = "float32"  # the UNet's compute dtype (model.dtype)

    @classmethod
    def from_train_config(cls, cfg) -> "StepConfig":
        return cls(**{f.name: getattr(cfg.model if f.name == "dtype" else cfg, f.name) for f in dataclasses.fields(cls)})


def _unet_matrix(path: str, x) -> bool:
    """The UNet's kernels (convolutions, linear layers): every one is used by a layer that computes in the
    model's dtype, so casting it before it is gathered is the cast the layer would make."""
    return path.startswith("unet.") and x.ndim >= 2


def prepare(nets, batch: dict, key: jax.Array, schedule: NoiseSchedule, cfg: StepConfig):
    """Batch (uint8 images and references, boxes) → UNet input, timesteps, condition, target noise."""
    k_mask, k_ref, k_drop, k_t, k_noise, k_z, k_zm = jax.random.split(key, 7)
    image = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    b, s = image.shape[0], image.shape[1]
    edit = augment.shape_masks(k_mask, batch["box"], batch["box_ext"], size=s, p_bezier=cfg.bezier_mask_p)
    keep = (1.0 - edit)[..., None]  # the model's convention: 1 = keep
    vae, encoder = nets.vae, nets.image_encoder
    reference = augment.augment_references(k_ref, batch["reference"], size=encoder.config.image_size,
                                           **({} if cfg.reference_augment else augment.NO_AUGMENTATION))
    z = vae.scale(vae.encode(image).sample(k_z)).astype(jnp.float32)
    z_masked = vae.scale(vae.encode(image * keep).sample(k_zm)).astype(jnp.float32)
    z, z_masked = jax.lax.stop_gradient(z), jax.lax.stop_gradient(z_masked)
    f = s // z.shape[1]
    keep_latent = keep[:, ::f, ::f]

    _, pooled = encoder.model(reference)
    cond = encoder.bottleneck(jax.lax.stop_gradient(pooled))
    uncond = encoder.uncond(b)
    drop = jax.random.bernoulli(k_drop, cfg.cond_drop, (1,) if cfg.cond_drop_per_batch else (b,))
    cond = jnp.where(drop[:, None, None], uncond, cond)

    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    z_t = schedule.add_noise(z, noise, t)
    x = jnp.concatenate([z_t, z_masked, keep_latent], axis=-1)
    return x, t, cond, noise


def loss_fn(params, frozen, graphdef, batch, key, schedule: NoiseSchedule, cfg: StepConfig):
    params = parallel.gather_params(params, jnp.dtype(cfg.dtype), _unet_matrix)
    nets = nnx.merge(graphdef, params, parallel.gather_params(frozen))
    x, t, cond, noise = prepare(nets, batch, key, schedule, cfg)
    eps = nets.unet(x, t, cond).astype(jnp.float32)
    return jnp.mean(jnp.square(eps - noise))


def train_step(state: TrainState, batch: dict, *, graphdef, optimizer: optax.GradientTransformation,
               schedule: NoiseSchedule, cfg: StepConfig) -> tuple[TrainState, dict[str, Any]]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen, graphdef, batch, key, schedule, cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

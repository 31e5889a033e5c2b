"""The training step (Paint by Example's recipe): masks and reference augmentation made on device, frozen
VAE and CLIP tower, condition dropped to the uncond vector with probability p, ε-prediction MSE, AdamW."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pbe_jax import lora, parallel
from pbe_jax.data import augment
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step reads of TrainConfig, under the same names (`from_train_config`)."""

    cond_drop: float = 0.2
    cond_drop_group: int = 4
    ema_decay: float = 0.0
    bezier_mask_p: float = 0.5
    reference_augment: bool = True
    dtype: str = "float32"  # the UNet's compute dtype (model.dtype)
    lora_scale: float = 0.0  # with a LoRA adapter (model.lora.rank): alpha / rank, merged into the UNet

    @classmethod
    def from_train_config(cls, cfg) -> "StepConfig":
        lora = cfg.model.lora
        scale = lora.config().scale if lora.rank else 0.0
        return cls(**{f.name: getattr(cfg.model if f.name == "dtype" else cfg, f.name)
                      for f in dataclasses.fields(cls) if f.name != "lora_scale"}, lora_scale=scale)


def _unet_matrix(path: str, x) -> bool:
    """The UNet's kernels (convolutions, linear layers): every one is used by a layer that computes in the
    model's dtype, so casting it before it is gathered is the cast the layer would make."""
    return path.startswith("unet.") and x.ndim >= 2


def latent_mask(keep: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The keep mask (B, H, W, 1) at latent size as the original's `get_input` makes it: torchvision's
    `Resize` on a tensor (bilinear, half-pixel centres, no antialiasing in the torchvision 0.12 it trained
    with), so that a mask edge inside an 8-pixel cell gives a fractional value, not the cell's first pixel."""
    b, c = keep.shape[0], keep.shape[-1]
    return jax.image.resize(keep, (b, *size, c), method="linear", antialias=False)


def draw(nets, batch: dict, key: jax.Array, schedule: NoiseSchedule, cfg: StepConfig) -> dict[str, jax.Array]:
    """Every random choice of one step, from `key`: the edit masks (B, H, W; 1 = replace), the augmented
    references, the posterior noise of the image's and the masked image's latents, which rows take the uncond
    vector, the timesteps and the target noise. `inputs` computes the rest deterministically, so that a
    reference implementation given the same draws computes the same step (`pbe_jax.compare --train`)."""
    k_mask, k_ref, k_drop, k_t, k_noise, k_z, k_zm = jax.random.split(key, 7)
    b, s = batch["image"].shape[0], batch["image"].shape[1]
    vae, encoder = nets.vae, nets.image_encoder
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (b, s // f, s // f, vae.config.latent_channels)
    groups = -(-b // cfg.cond_drop_group)
    drop = jnp.repeat(jax.random.bernoulli(k_drop, cfg.cond_drop, (groups,)), cfg.cond_drop_group)[:b]
    return {
        "edit": augment.shape_masks(k_mask, batch["box"], batch["box_ext"], size=s, p_bezier=cfg.bezier_mask_p),
        "reference": augment.augment_references(k_ref, batch["reference"], size=encoder.config.image_size,
                                                **({} if cfg.reference_augment else augment.NO_AUGMENTATION)),
        "posterior_noise": jax.random.normal(k_z, latent, jnp.float32),
        "masked_posterior_noise": jax.random.normal(k_zm, latent, jnp.float32),
        "drop": drop,
        "t": jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps),
        "noise": jax.random.normal(k_noise, latent, jnp.float32),
    }


def _latent(vae, x: jax.Array, noise: jax.Array) -> jax.Array:
    """The scaled posterior sample, mean + std · noise (the original's `get_first_stage_encoding`)."""
    z = vae.encode(x).sample_with(noise)
    return jax.lax.stop_gradient(vae.scale(z).astype(jnp.float32))


def inputs(nets, image: jax.Array, d: dict[str, jax.Array], schedule: NoiseSchedule):
    """Images in [-1, 1] (B, H, W, 3) and one step's draws → UNet input (z_t | masked-image latent | keep
    mask), timesteps, condition, target noise."""
    keep = (1.0 - d["edit"])[..., None]  # the model's convention: 1 = keep
    z = _latent(nets.vae, image, d["posterior_noise"])
    z_masked = _latent(nets.vae, image * keep, d["masked_posterior_noise"])
    keep_latent = latent_mask(keep, z.shape[1:3])
    encoder = nets.image_encoder
    _, pooled = encoder.model(d["reference"])
    cond = encoder.bottleneck(jax.lax.stop_gradient(pooled))
    cond = jnp.where(d["drop"][:, None, None], encoder.uncond(image.shape[0]), cond)
    z_t = schedule.q_sample(z, d["noise"], d["t"])
    return jnp.concatenate([z_t, z_masked, keep_latent], axis=-1), d["t"], cond, d["noise"]


def prepare(nets, batch: dict, key: jax.Array, schedule: NoiseSchedule, cfg: StepConfig):
    """Batch (uint8 images and references, boxes) → UNet input, timesteps, condition, target noise."""
    image = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return inputs(nets, image, draw(nets, batch, key, schedule, cfg), schedule)


def loss_given(params, frozen, graphdef, image: jax.Array, draws: dict, schedule: NoiseSchedule,
               cfg: StepConfig) -> jax.Array:
    """ε-MSE of one step given its draws (the original's `p_losses` with the simple L2 loss: the mean over
    every latent element; its logvar is 0 and its ELBO weight 0, so nothing else enters)."""
    params = parallel.gather_params(params, jnp.dtype(cfg.dtype), _unet_matrix)
    frozen = parallel.gather_params(frozen)
    if cfg.lora_scale:  # the adapter's B·A into the frozen UNet's weights (at step 0, B = 0: the base exactly)
        frozen = lora.merge_state(frozen, params, cfg.lora_scale)
    # Variables of this trace level: the frozen state comes in from the jit's, outside the gradient's, and
    # nnx.remat (model.remat) writes back into every variable of the modules it wraps, the frozen UNet's
    # under LoRA included, which nnx allows only at the level the variable was made at.
    frozen = jax.tree.map(lambda x: x, frozen)
    nets = nnx.merge(graphdef, params, frozen)
    x, t, cond, noise = inputs(nets, image, draws, schedule)
    eps = nets.unet(x, t, cond).astype(jnp.float32)
    return jnp.mean(jnp.square(eps - noise))


def loss_fn(params, frozen, graphdef, batch, key, schedule: NoiseSchedule, cfg: StepConfig):
    image = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    draws = draw(nnx.merge(graphdef, params, frozen), batch, key, schedule, cfg)
    return loss_given(params, frozen, graphdef, image, draws, schedule, cfg)


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

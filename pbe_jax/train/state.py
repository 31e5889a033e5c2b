"""The train state: the networks split once into a graph and parameter trees (trainable by label, frozen),
the optimiser, EMA, step and RNG — one pytree that jit shards, donates and orbax checkpoints."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pbe_jax import parallel
from pbe_jax.convert import PaintByExampleModels
from pbe_jax.lora import Factors
from pbe_jax.train.config import OptimConfig


class Nets(nnx.Module):
    """The three networks under one root, so parameter paths read unet.…, vae.…, image_encoder.…, and a LoRA
    adapter of the UNet (lora.factors.…) when one trains."""

    def __init__(self, models: PaintByExampleModels, adapter=None):
        self.unet, self.vae, self.image_encoder = models.unet, models.vae, models.image_encoder
        if adapter is not None:
            self.lora = Factors(adapter)


def trainable_filter(prefixes: tuple[str, ...]):
    """An nnx filter: parameters whose dotted path starts with one of `prefixes` train (the label), the rest
    is frozen."""
    def is_trainable(path, _value) -> bool:
        dotted = ".".join(str(p) for p in path)
        return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)

    return is_trainable


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any  # trainable nnx.State, float32
    frozen: Any  # frozen nnx.State (VAE, CLIP tower), float32 or bfloat16
    opt_state: Any
    ema: Any  # EMA of params, or None
    rng: jax.Array  # uint32 key data; each step uses fold_in(key, step)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with a linear warm-up from warmup_start × lr to lr
    over warmup_steps, then constant (the original's LambdaLinearScheduler); optional global-norm clipping."""
    schedule = (optax.linear_schedule(cfg.warmup_start * cfg.lr, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps > 0
                else optax.constant_schedule(cfg.lr))
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm > 0 else adamw


def split(models: PaintByExampleModels, trainable: tuple[str, ...], adapter=None):
    """graphdef, trainable params, frozen params (as stored in the models; the trainer casts them to
    model.frozen_dtype). Raises if a prefix selects nothing (a typo would silently freeze the model otherwise).
    With a LoRA `adapter` (pbe_jax.lora), it joins the networks as `lora`."""
    nets = Nets(models, adapter)
    graphdef, params, frozen = nnx.split(nets, trainable_filter(trainable), ...)
    flat = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    for prefix in trainable:
        if not any(name == prefix or name.startswith(prefix + ".") for name in flat):
            raise ValueError(f"trainable prefix {prefix!r} matches no parameter")
    return graphdef, params, frozen


def create(params, frozen, optimizer: optax.GradientTransformation, *, ema: bool, seed: int) -> TrainState:
    """The state at step 0: AdamW's moments at zero, the EMA a copy of the params, the RNG from `seed`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=optimizer.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)))


def create_on_mesh(params, frozen, create_fn: Callable[[Any, Any], TrainState], shardings: TrainState, *,
                   frozen_dtype) -> TrainState:
    """The state made where it lives: the trainable params placed on their shards; the frozen towers placed as
    they are cast to `frozen_dtype`, one array at a time; the optimiser state, EMA, step and RNG made from the
    placed params by `create_fn(params, None)` jitted with their shardings as its outputs. No process holds
    more than its shards of the state beyond the weights as given. (The params do not pass through the jit:
    their output would be a copy, or, donated, would delete a caller's arrays that placing did not copy.)"""
    params = parallel.place(params, shardings.params)
    frozen = parallel.place(frozen, shardings.frozen, dtype=frozen_dtype)
    rest = dataclasses.replace(shardings, params=None, frozen=None)
    born = jax.jit(lambda p: dataclasses.replace(create_fn(p, None), params=None), out_shardings=rest)(params)
    return dataclasses.replace(born, params=params, frozen=frozen)

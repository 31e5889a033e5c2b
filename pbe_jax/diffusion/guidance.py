"""Classifier-free guidance as a pure function over the unconditional vector and the condition."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (x_t, t, context) -> ε: the UNet with the masked-image latents and mask already bound. With guidance the
# batch holds each sample's rows next to each other (see `guided`): bind per-sample inputs with `per_row`.
ContextEpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def per_row(a: jax.Array, rows: int) -> jax.Array:
    """Per-sample inputs (B, …) for a network batch of `rows` rows per sample, (B · rows, …), in `guided`'s
    order."""
    return jnp.repeat(a, rows, axis=0)


def guided(eps_fn: ContextEpsFn, cond: jax.Array, uncond: jax.Array, scale: float | jax.Array,
           use_guidance: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """ε̂(x, t) = ε_u + s (ε_c − ε_u), from one network call on the doubled batch. Its rows are grouped per
    sample, [u₀, c₀, u₁, c₁, …], not [uncond; cond] as the reference pipeline stacks them: a batch split over
    devices then keeps both rows of a sample on the sample's device, where [uncond; cond] would move half the
    batch between devices twice per step (all-to-alls and collective-permutes inside the sampler's loop, as
    the TPU compiler showed). Rows are independent, so the results are the same. Without guidance
    (`use_guidance` False, as for s ≤ 1) only the conditional half runs. `use_guidance` is static: it changes
    the batch the network sees."""
    if not use_guidance:
        return lambda x, t: eps_fn(x, t, cond)
    context = jnp.stack([uncond, cond], axis=1).reshape(-1, *cond.shape[1:])

    def eps(x, t):
        e = eps_fn(per_row(x, 2), t, context).reshape(x.shape[0], 2, *x.shape[1:])
        e_u, e_c = e[:, 0], e[:, 1]
        return e_u + scale * (e_c - e_u)

    return eps

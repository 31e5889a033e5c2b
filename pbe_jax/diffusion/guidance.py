"""Classifier-free guidance as a pure function over the unconditional vector and the condition."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (x_t, t, context) -> ε: the UNet with the masked-image latents and mask already bound.
ContextEpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided(eps_fn: ContextEpsFn, cond: jax.Array, uncond: jax.Array, scale: float | jax.Array,
           use_guidance: bool) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """ε̂(x, t) = ε_u + s (ε_c − ε_u), from one network call on the batch [uncond; cond] (the reference
    pipeline's order). Without guidance (`use_guidance` False, as for s ≤ 1) only the conditional half
    runs. `use_guidance` is static: it changes the batch the network sees."""
    if not use_guidance:
        return lambda x, t: eps_fn(x, t, cond)
    context = jnp.concatenate([uncond, cond])

    def eps(x, t):
        e_u, e_c = jnp.split(eps_fn(jnp.concatenate([x, x]), t, context), 2)
        return e_u + scale * (e_c - e_u)

    return eps

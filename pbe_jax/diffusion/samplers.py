"""Samplers as pure functions: per-step tables computed on the host, then the whole denoising loop in one
`lax.scan` over them. A sampler never sees a network, only `eps_fn(x, t) -> ε`.

PLMS is diffusers' `PNDMScheduler(skip_prk_steps=True)`: N steps take N + 1 ε evaluations (timesteps
981, 961, 961, 941, … for 50), the second redoing the first step with the average of two ε. DDIM is
`DDIMScheduler` with η ≥ 0. Latents may have any layout: the update is elementwise.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pbe_jax.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> ε; t is a scalar int32


class Tables(NamedTuple):
    """One row per ε evaluation. x_next = a·x_from + b·ε̂ + c·noise, where x_from is x, or the saved x of
    PLMS's first step when `restart`, and ε̂ = w_new·ε + Σ_k w_hist[k]·history[k] (history[3] the newest,
    `push` says whether ε enters the history). DDIM uses w_new = 1 and no history."""

    timestep: np.ndarray  # (S,) int32, what the network is asked at
    push: np.ndarray  # (S,) bool
    restart: np.ndarray  # (S,) bool
    w_new: np.ndarray  # (S,)
    w_hist: np.ndarray  # (S, 4)
    a: np.ndarray  # (S,)
    b: np.ndarray  # (S,)
    c: np.ndarray  # (S,)
    alpha: np.ndarray  # (S,) ᾱ at the step's timestep, for clip_x0
    clip_x0: np.ndarray  # (S,) bool: DDIM's clip_sample, x̂_0 clipped to [-1, 1] (ε unchanged)


def _alpha(schedule: NoiseSchedule, t: int) -> float:
    return float(schedule.alphas_cumprod[t]) if t >= 0 else schedule.final_alpha_cumprod


def plms_tables(schedule: NoiseSchedule, steps: int) -> Tables:
    ts = schedule.inference_timesteps(steps)[::-1]  # ascending, as diffusers builds them
    plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
    ratio = schedule.num_train_timesteps // steps
    rows = []
    n_hist = 0
    for counter, t in enumerate(plms):
        t, prev = int(t), int(t) - ratio
        push = counter != 1
        if not push:  # the repeated first step: from the saved sample, between the first step's timesteps
            prev, t = t, t + ratio
        n_hist = min(n_hist + push, 4)
        w_new, hist = 0.0, np.zeros(4)
        if counter == 1:
            w_new, hist[3] = 0.5, 0.5
        elif n_hist == 1:
            hist[3] = 1.0
        elif n_hist == 2:
            hist[2:] = (-1 / 2, 3 / 2)
        elif n_hist == 3:
            hist[1:] = (5 / 12, -16 / 12, 23 / 12)
        else:
            hist[:] = (-9 / 24, 37 / 24, -59 / 24, 55 / 24)
        a_t, a_prev = _alpha(schedule, t), _alpha(schedule, prev)
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        rows.append((int(plms[counter]), push, counter == 1, w_new, hist, (a_prev / a_t) ** 0.5,
                     -(a_prev - a_t) / denom, 0.0, a_t, False))
    return _stack(rows)


def ddim_tables(schedule: NoiseSchedule, steps: int, eta: float = 0.0) -> Tables:
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, not {eta}")
    ratio = schedule.num_train_timesteps // steps
    rows = []
    for t in schedule.inference_timesteps(steps):
        t = int(t)
        a_t, a_prev = _alpha(schedule, t), _alpha(schedule, t - ratio)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z, with x̂_0 = (x − √(1 − ᾱ_t) ε) / √ᾱ_t
        a = (a_prev / a_t) ** 0.5
        b = (1 - a_prev - std ** 2) ** 0.5 - a * (1 - a_t) ** 0.5
        rows.append((t, False, False, 1.0, np.zeros(4), a, b, std, a_t, schedule.clip_sample))
    return _stack(rows)


def _stack(rows) -> Tables:
    cols = list(zip(*rows))
    return Tables(np.asarray(cols[0], np.int32), np.asarray(cols[1], bool), np.asarray(cols[2], bool),
                  *(np.asarray(c, np.float32) for c in cols[3:9]), np.asarray(cols[9], bool))


def make_tables(schedule: NoiseSchedule, sampler: str, steps: int, eta: float = 0.0) -> Tables:
    if sampler == "plms":
        return plms_tables(schedule, steps)
    if sampler == "ddim":
        return ddim_tables(schedule, steps, eta)
    raise ValueError(f"sampler must be 'plms' or 'ddim', not {sampler!r}")


def sample(eps_fn: EpsFn, x: jax.Array, tables: Tables, key: jax.Array | None = None) -> jax.Array:
    """Run the whole reverse process from x_T (any shape) inside one `lax.scan` over `tables` (which may be
    traced: one compiled loop serves every guidance scale and η). `key` draws DDIM's η-noise: one key for
    the whole array, or one per row of x (shape (B,)) so that each row's noise is its own."""
    key = jax.random.key(0) if key is None else key

    def draw(i):
        if key.ndim == 0:
            return jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(key)

    def step(carry, row):
        x, saved, hist = carry
        i, r = row
        eps = eps_fn(x, r.timestep).astype(jnp.float32)
        hist = jnp.where(r.push, jnp.concatenate([hist[1:], eps[None]]), hist)
        eps_hat = r.w_new * eps + jnp.tensordot(r.w_hist, hist, axes=1)
        saved = jnp.where(i == 0, x, saved)
        x_from = jnp.where(r.restart, saved, x)
        x0 = jnp.clip((x_from - jnp.sqrt(1 - r.alpha) * eps_hat) / jnp.sqrt(r.alpha), -1, 1)
        x_from = jnp.where(r.clip_x0, jnp.sqrt(r.alpha) * x0 + jnp.sqrt(1 - r.alpha) * eps_hat, x_from)
        x_next = r.a * x_from + r.b * eps_hat + r.c * draw(i)
        return (x_next, saved, hist), None

    x32 = x.astype(jnp.float32)
    hist = jnp.zeros((4,) + x.shape, jnp.float32)
    rows = jax.tree.map(jnp.asarray, tables)
    (x_out, _, _), _ = jax.lax.scan(step, (x32, x32, hist), (jnp.arange(tables.timestep.shape[0]), rows))
    return x_out

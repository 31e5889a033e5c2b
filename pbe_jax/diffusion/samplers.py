"""Samplers as pure functions: per-step tables computed on the host, then the whole denoising loop in one
`lax.scan` over them. A sampler never sees a network, only `eps_fn(x, t) -> ε`.

Each one equals the diffusers scheduler of the same name step for step:
- "plms": `PNDMScheduler(skip_prk_steps=True)`; N steps take N + 1 ε evaluations (timesteps 981, 961, 961,
  941, … for 50), the second redoing the first step with the average of two ε.
- "ddim": `DDIMScheduler`, η ≥ 0.
- "dpmpp_2m": `DPMSolverMultistepScheduler` with its defaults (DPM-Solver++, data prediction, order 2,
  midpoint, lower order at the final step, final sigma zero).
- "unipc": `UniPCMultistepScheduler` with its defaults (bh2, order 2, x₀ prediction): the corrector of step i
  uses the network output of step i + 1, so it costs no extra evaluation; the last step is not corrected.
All four are one linear multistep update (`Tables`); only the tables differ. Latents may have any layout.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pbe_jax.defaults import SAMPLERS  # the names, held once (the CLIs read them there without importing JAX)
from pbe_jax.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t) -> ε; t is a scalar int32
HISTORY = 4  # network outputs kept (PLMS's fourth-order Adams–Bashforth needs four)


class Tables(NamedTuple):
    """One row per network evaluation, for the update every sampler here is an instance of:

        m      = mx·x + me·ε                        the output in the solver's terms (ε, or x̂₀ = (x − σε)/α)
        hist   ← m pushed in (newest last)          when `push`
        y      = cx·x + cl·last + Σₖ ch[k]·hist[k]  the sample the step starts from
        x_next = a·y + w_new·m + Σₖ w[k]·hist[k] + c·z,  z ~ N(0, I) (DDIM's η)
        last   = y

    `y` is UniPC's corrected sample and PLMS's restart from the first step's sample; for the others y = x.
    `clip_x0`: DDIM's clip_sample (x̂₀ clipped to [−1, 1], with ᾱ `alpha`)."""

    timestep: np.ndarray  # (S,) int32, what the network is asked at
    mx: np.ndarray  # (S,)
    me: np.ndarray  # (S,)
    push: np.ndarray  # (S,) bool
    cx: np.ndarray  # (S,)
    cl: np.ndarray  # (S,)
    ch: np.ndarray  # (S, HISTORY)
    a: np.ndarray  # (S,)
    w_new: np.ndarray  # (S,)
    w: np.ndarray  # (S, HISTORY)
    c: np.ndarray  # (S,)
    alpha: np.ndarray  # (S,)
    clip_x0: np.ndarray  # (S,) bool


def _row(timestep, *, mx=0.0, me=1.0, push=True, cx=1.0, cl=0.0, ch=None, a=1.0, w_new=0.0, w=None, c=0.0,
         alpha=1.0, clip_x0=False) -> tuple:
    zeros = np.zeros(HISTORY)
    return (int(timestep), mx, me, push, cx, cl, zeros if ch is None else ch, a, w_new, zeros if w is None else w,
            c, alpha, clip_x0)


def _stack(rows) -> Tables:
    cols = [np.asarray(c) for c in zip(*rows)]
    kinds = (np.int32, np.float32, np.float32, bool, np.float32, np.float32, np.float32, np.float32, np.float32,
             np.float32, np.float32, np.float32, bool)
    return Tables(*(c.astype(k) for c, k in zip(cols, kinds)))


def _alpha(schedule: NoiseSchedule, t: int) -> float:
    return float(schedule.alphas_cumprod[t]) if t >= 0 else schedule.final_alpha_cumprod


def _leading_only(schedule: NoiseSchedule, sampler: str) -> None:
    if schedule.timestep_spacing not in (None, "leading"):
        raise ValueError(f"sampler {sampler!r} supports timestep_spacing 'leading' only (the scheduler config "
                         f"says {schedule.timestep_spacing!r})")


def plms_tables(schedule: NoiseSchedule, steps: int, start: int = 0) -> Tables:
    """`start`: the first of the schedule's timesteps to run (see `first_step`): the list is sliced and the
    method starts over on what is left, as PNDM does after diffusers' `get_timesteps`."""
    _leading_only(schedule, "plms")
    ts = schedule.inference_timesteps(steps)[::-1]  # ascending, as diffusers builds them
    plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1][start:]
    ratio = schedule.num_train_timesteps // steps
    rows = []
    n_hist = 0
    for counter, t in enumerate(plms):
        t, prev = int(t), int(t) - ratio
        push = counter != 1
        if not push:  # the repeated first step: from the saved sample, between the first step's timesteps
            prev, t = t, t + ratio
        n_hist = min(n_hist + push, 4)
        w_new, hist = 0.0, np.zeros(HISTORY)
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
        b = -(a_prev - a_t) / (a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5)
        restart = counter == 1
        rows.append(_row(plms[counter], push=push, cx=0.0 if restart else 1.0, cl=1.0 if restart else 0.0,
                         a=(a_prev / a_t) ** 0.5, w_new=b * w_new, w=b * hist))
    return _stack(rows)


def ddim_tables(schedule: NoiseSchedule, steps: int, eta: float = 0.0, start: int = 0) -> Tables:
    if eta < 0:
        raise ValueError(f"eta must be ≥ 0, not {eta}")
    _leading_only(schedule, "ddim")
    ratio = schedule.num_train_timesteps // steps
    rows = []
    for t in schedule.inference_timesteps(steps)[start:]:
        t = int(t)
        a_t, a_prev = _alpha(schedule, t), _alpha(schedule, t - ratio)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε + σ z, with x̂_0 = (x − √(1 − ᾱ_t) ε) / √ᾱ_t
        a = (a_prev / a_t) ** 0.5
        b = (1 - a_prev - std ** 2) ** 0.5 - a * (1 - a_t) ** 0.5
        rows.append(_row(t, a=a, w=np.array([0, 0, 0, b]), c=std, alpha=a_t, clip_x0=schedule.clip_sample))
    return _stack(rows)


class _Sigmas(NamedTuple):
    """The multistep schedulers' noise levels, as diffusers sets them: σ_j = √((1 − ᾱ)/ᾱ) at the timesteps
    (float32), then σ = 0 after the last; α_j = 1/√(σ_j² + 1), s_j = σ_j α_j, λ_j = log α_j − log s_j."""

    timesteps: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    lam: np.ndarray
    sigma_raw: np.ndarray  # σ_j as the scheduler stores them (float32)


def _multistep_sigmas(schedule: NoiseSchedule, steps: int) -> _Sigmas:
    ts = schedule.multistep_timesteps(steps)
    full = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod) ** 0.5  # float32, as diffusers'
    raw = np.concatenate([full[ts], [0.0]]).astype(np.float32)
    sig = raw.astype(np.float64)
    alpha = 1 / np.sqrt(sig ** 2 + 1)
    sigma = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf after the last step (σ = 0)
    return _Sigmas(ts, alpha, sigma, lam, raw)


def _x0_row(s: _Sigmas, i: int) -> dict:
    """m = x̂₀ = (x − s_i ε) / α_i: data prediction from ε."""
    return {"mx": 1 / s.alpha[i], "me": -s.sigma[i] / s.alpha[i]}


def dpmpp_2m_tables(schedule: NoiseSchedule, steps: int, start: int = 0) -> Tables:
    """From step `start` (diffusers' `set_begin_index`): first order there, as at a fresh start."""
    s = _multistep_sigmas(schedule, steps)
    rows = []
    for i in range(start, steps):
        with np.errstate(over="ignore"):
            h = s.lam[i + 1] - s.lam[i]
            b = -s.alpha[i + 1] * np.expm1(-h)  # -α_t (e^{-h} - 1)
        w = np.zeros(HISTORY)
        if i == start or i == steps - 1:  # first order: at the start, and at the final step (final sigma zero)
            w[3] = b
        else:  # midpoint: D = m0 + (m0 - m1) / (2 r0)
            r0 = (s.lam[i] - s.lam[i - 1]) / h
            w[3], w[2] = b * (1 + 0.5 / r0), -b * 0.5 / r0
        rows.append(_row(s.timesteps[i], **_x0_row(s, i), a=s.sigma[i + 1] / s.sigma[i], w=w))
    return _stack(rows)


def _unipc_corrector_rhos(h: float, order: int, rk: float | None) -> np.ndarray:
    """UniPC's corrector coefficients (bh2, x₀ prediction) for a step of size h in λ: [0.5] at order 1; at
    order 2 the solution of R ρ = b, R = [r^0; r^1] over r = (rk, 1), b_k = k! φ_k(−h)·(−h)^… / B(h) as
    diffusers builds them."""
    if order == 1:
        return np.array([0.5])
    hh = -h
    h_phi_k, factorial, b = np.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / np.expm1(hh))
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    rks = np.array([rk, 1.0])
    return np.linalg.solve(np.stack([rks ** (k - 1) for k in range(1, order + 1)]), np.array(b))


def unipc_tables(schedule: NoiseSchedule, steps: int, start: int = 0) -> Tables:
    """From step `start` (diffusers' `set_begin_index`): the warm-up counts from there."""
    s = _multistep_sigmas(schedule, steps)

    def order(i):  # lower order at the start (warm-up) and at the end (lower_order_final)
        return min(2, steps - i, min(i - start, 2) + 1)

    rows = []
    for i in range(start, steps):
        # Corrector of this step's start sample, with this step's output (hist: m_i at 3, m_{i-1} at 2, ...).
        cx, cl, ch = 1.0, 0.0, np.zeros(HISTORY)
        if i > start:
            k = order(i - 1)
            h = s.lam[i] - s.lam[i - 1]
            rk = (s.lam[i - 2] - s.lam[i - 1]) / h if k == 2 else None
            rhos = _unipc_corrector_rhos(h, k, rk)
            ab = s.alpha[i] * np.expm1(-h)  # α·B(h); with bh2, B(h) = h·φ₁(−h) = e^{−h} − 1
            rho_t = rhos[-1]
            d1 = rhos[0] / rk if k == 2 else 0.0
            cx, cl = 0.0, s.sigma[i] / s.sigma[i - 1]
            ch[3] = -ab * rho_t
            ch[2] = ab * (d1 + rho_t - 1)
            ch[1] = -ab * d1
        # Predictor from the corrected sample.
        p = order(i)
        with np.errstate(over="ignore", invalid="ignore"):
            h = s.lam[i + 1] - s.lam[i]
            ab = s.alpha[i + 1] * np.expm1(-h)
        w = np.zeros(HISTORY)
        w[3] = -ab
        if p == 2:
            half = 0.5 * ab / ((s.lam[i - 1] - s.lam[i]) / h)  # α B(h) ρ / r_k, ρ = 0.5
            w[3] += half
            w[2] = -half
        rows.append(_row(s.timesteps[i], **_x0_row(s, i), cx=cx, cl=cl, ch=ch, a=s.sigma[i + 1] / s.sigma[i], w=w))
    return _stack(rows)


def first_step(steps: int, strength: float) -> int:
    """Where a run of strength `strength` starts in a `steps`-step schedule: diffusers' `get_timesteps` of the
    image-to-image and inpainting pipelines (the last int(steps · strength) steps are run)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], not {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run (int(steps · strength) = 0); "
                         f"give more steps or a larger strength")
    return steps - run


def make_tables(schedule: NoiseSchedule, sampler: str, steps: int, eta: float = 0.0,
                strength: float = 1.0) -> Tables:
    """The rows of `sampler` over `steps` steps; with `strength` < 1, those of the steps that are run (the
    timesteps diffusers' `get_timesteps` leaves, every scheduler here having order 1)."""
    start = first_step(steps, strength) if strength != 1.0 else 0
    if sampler == "plms":
        return plms_tables(schedule, steps, start)
    if sampler == "ddim":
        return ddim_tables(schedule, steps, eta, start)
    if sampler == "dpmpp_2m":
        return dpmpp_2m_tables(schedule, steps, start)
    if sampler == "unipc":
        return unipc_tables(schedule, steps, start)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")


def start_noise(schedule: NoiseSchedule, sampler: str, steps: int, strength: float) -> tuple[float, float]:
    """(a, s) such that a run of strength < 1 starts from x = a · x₀ + s · ε: the scheduler's `add_noise` at
    the first timestep run, in float32 as diffusers computes it (√ᾱ_t and √(1 − ᾱ_t) for PNDM and DDIM; for
    the multistep solvers α = 1/√(σ² + 1) and σ·α from their σ at the begin index)."""
    start = first_step(steps, strength)
    if sampler in ("plms", "ddim"):
        t = int(make_tables(schedule, sampler, steps, strength=strength).timestep[0])
        ac = np.float32(schedule.alphas_cumprod[t])
        return float(np.sqrt(ac)), float(np.sqrt(np.float32(1) - ac))  # torch's x ** 0.5: a rounded sqrt
    if sampler in ("dpmpp_2m", "unipc"):
        sigma = np.float32(_multistep_sigmas(schedule, steps).sigma_raw[start])
        alpha = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        return float(alpha), float(sigma * alpha)
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")


def sample(eps_fn: EpsFn, x: jax.Array, tables: Tables, key: jax.Array | None = None,
           trajectory: bool = False, on_step: Callable[[jax.Array, jax.Array], None] | None = None) -> jax.Array:
    """Run the whole reverse process from x_T (any shape) inside one `lax.scan` over `tables` (which may be
    traced: one compiled loop serves every guidance scale and η). `key` draws DDIM's η-noise: one key for
    the whole array, or one per row of x (shape (B,)) so that each row's noise is its own. `trajectory`
    returns the sample after every row, stacked, instead of the last. `on_step(i, value)`, if given, is called
    on the host (`jax.debug.callback`) once row i's update is computed (`value`: one element of it, which
    ties the call to the step's end); under a mesh it may be called once per device for the same i."""
    key = jax.random.key(0) if key is None else key

    def draw(i):
        if key.ndim == 0:
            return jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(key)

    def step(carry, row):
        x, last, hist = carry
        i, r = row
        eps = eps_fn(x, r.timestep).astype(jnp.float32)
        m = r.mx * x + r.me * eps
        hist = jnp.where(r.push, jnp.concatenate([hist[1:], m[None]]), hist)
        y = r.cx * x + r.cl * last + jnp.tensordot(r.ch, hist, axes=1)
        x0 = jnp.clip((y - jnp.sqrt(1 - r.alpha) * eps) / jnp.sqrt(r.alpha), -1, 1)
        y = jnp.where(r.clip_x0, jnp.sqrt(r.alpha) * x0 + jnp.sqrt(1 - r.alpha) * eps, y)
        x_next = r.a * y + r.w_new * m + jnp.tensordot(r.w, hist, axes=1) + r.c * draw(i)
        if on_step is not None:
            jax.debug.callback(on_step, i, x_next[(0,) * x_next.ndim])
        return (x_next, y, hist), (x_next if trajectory else None)

    x32 = x.astype(jnp.float32)
    hist = jnp.zeros((HISTORY,) + x.shape, jnp.float32)
    rows = jax.tree.map(jnp.asarray, tables)
    (x_out, _, _), xs = jax.lax.scan(step, (x32, x32, hist), (jnp.arange(tables.timestep.shape[0]), rows))
    return xs if trajectory else x_out

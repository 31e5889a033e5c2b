"""The DDPM noise schedule (betas → ᾱ_t), read from a diffusers `scheduler_config.json` or given directly."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

_SUPPORTED = {"beta_schedule": ("scaled_linear", "linear"), "prediction_type": ("epsilon",),
              "timestep_spacing": ("leading", "linspace", "trailing"), "trained_betas": (None,)}


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """ε-prediction DDPM schedule. Defaults are Stable Diffusion's (scaled-linear 0.00085 → 0.012, 1000 steps)
    and the Paint-by-Example scheduler's (`steps_offset=1`, `set_alpha_to_one=False`)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    # As the config says; None when it does not (PNDM and DDIM space "leading"; the multistep solvers,
    # swapped in with diffusers' `from_config`, then use their own default, "linspace").
    timestep_spacing: str | None = None

    def __post_init__(self):
        if self.beta_schedule not in _SUPPORTED["beta_schedule"]:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is not supported "
                             f"(supported: {', '.join(_SUPPORTED['beta_schedule'])})")

    @classmethod
    def from_config(cls, d: Mapping[str, Any] | None, source: str = "scheduler config") -> "NoiseSchedule":
        """From a diffusers scheduler config (PNDM or DDIM): the keys that define the schedule are read,
        options that would change the sampler's arithmetic are refused."""
        d = dict(d or {})
        for key, ok in _SUPPORTED.items():
            if key in d and d[key] not in ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (supported: {ok})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_config(self) -> dict[str, Any]:
        """The fields as a diffusers scheduler config; an unset `timestep_spacing` is left out (diffusers reads
        an explicit null as a spacing and refuses it)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float32) ** 2
        return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t in float32, accumulated as diffusers does (cumprod of float32 1 − β)."""
        return np.cumprod(1.0 - self.betas, dtype=np.float32)

    @property
    def final_alpha_cumprod(self) -> float:
        """ᾱ used after the last step (diffusers' `set_alpha_to_one`)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def inference_timesteps(self, steps: int) -> np.ndarray:
        """diffusers' "leading" spacing, descending: e.g. 981, 961, …, 1 for 50 steps."""
        if not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be between 1 and {self.num_train_timesteps}, not {steps}")
        ratio = self.num_train_timesteps // steps
        return (np.arange(steps) * ratio + self.steps_offset)[::-1].astype(np.int32)

    def multistep_timesteps(self, steps: int) -> np.ndarray:
        """The timesteps of diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler made from this
        config with `from_config`, descending: "linspace" (their default) from 999, "leading" with
        num_train_timesteps // (steps + 1) and `steps_offset`, or "trailing" ending at … − 1."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be between 1 and {n}, not {steps}")
        spacing = self.timestep_spacing or "linspace"
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(0, steps + 1) * (n // (steps + 1))).round()[::-1][:-1] + self.steps_offset
        else:
            ts = np.arange(n, 0, -n / steps).round() - 1
        return ts.astype(np.int64)

    def q_sample(self, x0, noise, t):
        """q(x_t | x_0) for training as the original's LatentDiffusion computes it: β and ᾱ in float64
        (`make_beta_schedule`, `np.cumprod`), √ᾱ_t and √(1 − ᾱ_t) taken in float64 and stored in float32. (The
        sampler's ᾱ follow diffusers' float32 arithmetic instead; the two differ by ~1e-6 relative at t = 999.)"""
        import jax.numpy as jnp

        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = jnp.asarray(np.sqrt(ac).astype(np.float32))[t].reshape(shape)
        b = jnp.asarray(np.sqrt(1.0 - ac).astype(np.float32))[t].reshape(shape)
        return a * x0 + b * noise

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0): √ᾱ_t x_0 + √(1 − ᾱ_t) ε, for training. `t` has one entry per batch row."""
        import jax.numpy as jnp

        a = jnp.asarray(self.alphas_cumprod)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise

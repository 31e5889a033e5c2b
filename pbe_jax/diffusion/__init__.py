"""Noise schedules, samplers (PLMS, DDIM) and classifier-free guidance as pure functions; no networks."""
from pbe_jax.diffusion.guidance import guided
from pbe_jax.diffusion.samplers import Tables, ddim_tables, make_tables, plms_tables, sample
from pbe_jax.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "Tables", "ddim_tables", "guided", "make_tables", "plms_tables", "sample"]

"""Noise schedules, samplers (PLMS, DDIM, DPM-Solver++ 2M, UniPC) and classifier-free guidance as pure
functions; no networks."""
from pbe_jax.diffusion.guidance import guided, per_row
from pbe_jax.diffusion.samplers import (SAMPLERS, Tables, ddim_tables, dpmpp_2m_tables, first_step, make_tables,
                                        plms_tables, sample, start_noise, unipc_tables)
from pbe_jax.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "SAMPLERS", "Tables", "ddim_tables", "dpmpp_2m_tables", "first_step", "guided", "make_tables",
           "per_row", "plms_tables", "sample", "start_noise", "unipc_tables"]

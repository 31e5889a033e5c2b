"""Samplers against diffusers' schedulers, driven by the same deterministic ε function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

from pbe_jax.diffusion import NoiseSchedule, guided, make_tables, per_row, sample

CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
              set_alpha_to_one=False, steps_offset=1)


def fake_eps(x, t):
    """Depends on the sample and the timestep, like a network, but cheap and identical in both frameworks."""
    lib = torch if isinstance(x, torch.Tensor) else jnp
    t = t.float() if isinstance(t, torch.Tensor) else jnp.asarray(t, jnp.float32)
    return 0.3 * lib.tanh(x) + 0.05 * lib.cos(t / 100.0 + x)


def run_diffusers(scheduler, x, steps):
    scheduler.set_timesteps(steps)
    calls = []
    x = torch.from_numpy(x)
    for t in scheduler.timesteps:
        calls.append(int(t))
        x = scheduler.step(fake_eps(x, t), t, x).prev_sample
    return x.numpy(), calls


@pytest.mark.parametrize("steps", [1, 2, 5, 50])
def test_plms_matches_pndm_skip_prk(steps):
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32)
    ref, calls = run_diffusers(PNDMScheduler(**CONFIG, skip_prk_steps=True), x, steps)
    tables = make_tables(NoiseSchedule(), "plms", steps)
    assert list(tables.timestep) == calls
    assert len(calls) == steps + 1 if steps > 1 else 1
    ours = np.asarray(jax.jit(lambda x: sample(fake_eps, x, tables))(x))
    np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())


def test_plms_50_steps_timesteps_are_the_reference_pipelines():
    t = make_tables(NoiseSchedule(), "plms", 50).timestep
    assert len(t) == 51 and list(t[:4]) == [981, 961, 961, 941] and t[-1] == 1


@pytest.mark.parametrize("steps,clip", [(4, False), (25, False), (10, True)])
def test_ddim_eta0_matches_diffusers(steps, clip):
    x = 3 * np.random.default_rng(1).standard_normal((1, 4, 5, 5)).astype(np.float32)
    ref, calls = run_diffusers(DDIMScheduler(**CONFIG, clip_sample=clip), x, steps)
    schedule = NoiseSchedule(clip_sample=clip)
    tables = make_tables(schedule, "ddim", steps)
    assert list(tables.timestep) == calls
    ours = np.asarray(jax.jit(lambda x: sample(fake_eps, x, tables))(x))
    np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())


def test_ddim_eta_noise_is_keyed_and_has_the_reference_variance():
    schedule = NoiseSchedule()
    t0, t1 = make_tables(schedule, "ddim", 10, eta=0.0), make_tables(schedule, "ddim", 10, eta=1.0)
    assert np.all(t0.c == 0) and np.all(t1.c[:-1] > 0) and not t0.clip_x0.any()
    # σ_t² = η² (1 − ᾱ_prev)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_prev), diffusers' _get_variance
    ref = DDIMScheduler(**CONFIG)
    ref.set_timesteps(10)
    for i, t in enumerate(ref.timesteps):
        var = float(ref._get_variance(int(t), int(t) - 100))
        assert t1.c[i] == pytest.approx(var ** 0.5, rel=1e-5)
    x = jnp.ones((1, 8, 8, 4))
    f = jax.jit(lambda x, k: sample(fake_eps, x, t1, k))
    a, b, c = f(x, jax.random.key(0)), f(x, jax.random.key(0)), f(x, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_schedule_matches_diffusers_alphas():
    ref = PNDMScheduler(**CONFIG, skip_prk_steps=True)
    # torch.linspace and np.linspace round the float32 betas differently in the last bit
    np.testing.assert_allclose(NoiseSchedule().alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=3e-6)
    assert NoiseSchedule().final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod))


def test_schedule_from_config_refuses_what_it_cannot_do():
    assert NoiseSchedule.from_config({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == NoiseSchedule()
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="sampler must be"):
        make_tables(NoiseSchedule(), "euler", 10)


def test_guidance_one_call_on_the_doubled_batch_grouped_per_sample():
    calls = []
    extra = jnp.array([10.0, 20.0]).reshape(2, 1, 1, 1)

    def eps_fn(x, t, ctx):
        calls.append(x.shape[0])
        return (x + per_row(extra, x.shape[0] // 2)) * ctx[:, :, :1].reshape(-1, 1, 1, 1)

    x = jnp.arange(2.0).reshape(2, 1, 1, 1) * jnp.ones((2, 3, 3, 4))
    cond = jnp.array([2.0, 3.0]).reshape(2, 1, 1) * jnp.ones((2, 1, 5))
    uncond = jnp.full((2, 1, 5), 0.5)
    out = guided(eps_fn, cond, uncond, 5.0, True)(x, 10)
    assert calls == [4]
    for i in range(2):  # each sample sees its own latents, its own extra inputs and its own condition
        base = float(x[i, 0, 0, 0] + extra[i, 0, 0, 0])
        np.testing.assert_allclose(out[i], base * (0.5 + 5.0 * (float(cond[i, 0, 0]) - 0.5)))
    x = jnp.ones((2, 3, 3, 4))
    cond, uncond = jnp.full((2, 1, 5), 2.0), jnp.full((2, 1, 5), 0.5)
    calls.clear()
    out = guided(eps_fn, cond, uncond, 1.0, False)(x, 10)
    assert calls == [2]
    np.testing.assert_allclose(out[:, 0, 0, 0], [(1 + 10) * 2.0, (1 + 20) * 2.0])


MULTISTEP = {"dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


@pytest.mark.parametrize("sampler", sorted(MULTISTEP))
@pytest.mark.parametrize("spacing,all_steps", [(None, (1, 2, 3, 10, 20, 25)), ("leading", (10, 20, 25)),
                                               ("trailing", (10,))])
def test_multistep_solvers_match_diffusers_step_for_step(sampler, spacing, all_steps):
    """DPM-Solver++ 2M and UniPC with diffusers' defaults, made from the pipeline's scheduler config as diffusers'
    `from_config` does (a config without timestep_spacing gets the solver's own default, linspace): the
    timesteps asked, and the sample after every step, over 10, 20 and 25 steps (and the short edge cases)."""
    config = dict(CONFIG, **({"timestep_spacing": spacing} if spacing else {}))
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32)
    for steps in all_steps:
        scheduler = MULTISTEP[sampler].from_config(config)
        scheduler.set_timesteps(steps)
        xt, calls, ref = torch.from_numpy(x), [], []
        for t in scheduler.timesteps:
            calls.append(int(t))
            xt = scheduler.step(fake_eps(xt, t), t, xt).prev_sample
            ref.append(xt.numpy())
        tables = make_tables(NoiseSchedule.from_config(config), sampler, steps)
        assert list(tables.timestep) == calls
        ours = np.asarray(jax.jit(lambda x: sample(fake_eps, x, tables, trajectory=True))(x))
        assert ours.shape == (steps,) + x.shape
        for k, (o, r) in enumerate(zip(ours, ref)):
            err = np.abs(o - r).max() / np.abs(r).max()
            assert err <= 1e-5, (steps, k, err)


def test_samplers_refuse_what_they_do_not_implement():
    with pytest.raises(ValueError, match="sampler must be one of plms, ddim, dpmpp_2m, unipc, not 'euler'"):
        make_tables(NoiseSchedule(), "euler", 10)
    with pytest.raises(ValueError, match="supports timestep_spacing 'leading' only"):
        make_tables(NoiseSchedule(timestep_spacing="trailing"), "plms", 10)


@pytest.mark.parametrize("spacing", [None, "trailing"])
def test_a_written_schedule_config_is_one_diffusers_reads_back(spacing):
    """What train.py exports as scheduler_config.json: every diffusers scheduler used here takes it with
    `from_config` and asks for the timesteps our tables use (an unset spacing is left out, not written as null)."""
    schedule = NoiseSchedule(timestep_spacing=spacing)
    config = schedule.to_config()
    assert ("timestep_spacing" in config) == (spacing is not None)
    assert NoiseSchedule.from_config(config) == schedule
    for sampler, cls in MULTISTEP.items():
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(10)
        assert list(scheduler.timesteps) == list(make_tables(schedule, sampler, 10).timestep)
    if spacing is None:
        pndm = PNDMScheduler.from_config(dict(config, skip_prk_steps=True))
        pndm.set_timesteps(10)
        assert list(pndm.timesteps) == list(make_tables(schedule, "plms", 10).timestep)


SCHEDULERS = {"plms": lambda: PNDMScheduler(**CONFIG, skip_prk_steps=True), "ddim": lambda: DDIMScheduler(**CONFIG, clip_sample=False),
              "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(CONFIG),
              "unipc": lambda: UniPCMultistepScheduler.from_config(CONFIG)}


@pytest.mark.parametrize("sampler", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps,strength", [(10, 0.5), (50, 0.8), (4, 0.25)])
def test_strength_matches_the_inpaint_pipelines_get_timesteps_and_prepare_latents(sampler, steps, strength):
    """strength < 1: the timesteps run are those diffusers' StableDiffusionInpaintPipeline.get_timesteps leaves
    (called on the real scheduler), the first sample is the scheduler's add_noise of the clean latents at the
    first of them (prepare_latents), and every step after it equals the scheduler's."""
    from diffusers import StableDiffusionInpaintPipeline

    from pbe_jax.diffusion import start_noise

    scheduler = SCHEDULERS[sampler]()
    scheduler.set_timesteps(steps)
    holder = type("Holder", (), {"scheduler": scheduler})()
    timesteps, n = StableDiffusionInpaintPipeline.get_timesteps(holder, steps, strength, "cpu")
    tables = make_tables(NoiseSchedule.from_config(CONFIG), sampler, steps, strength=strength)
    assert list(tables.timestep) == [int(t) for t in timesteps]
    assert n == min(int(steps * strength), steps)

    rng = np.random.default_rng(steps)
    x0, noise = (rng.standard_normal((2, 4, 6, 5)).astype(np.float32) for _ in range(2))
    t0 = timesteps[:1].repeat(2)
    ref = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t0)
    a, s = start_noise(NoiseSchedule.from_config(CONFIG), sampler, steps, strength)
    # The scheduler's own coefficients, to the ᾱ's last bits (torch.linspace rounds the betas differently, see
    # test_schedule_matches_diffusers_alphas, and torch's x ** 0.5 is not a rounded sqrt).
    one, zero = torch.ones(2, 1), torch.zeros(2, 1)
    ref_a, ref_s = (scheduler.add_noise(*xz, t0)[0, 0].item() for xz in ((one, zero), (zero, one)))
    np.testing.assert_allclose([a, s], [ref_a, ref_s], rtol=3e-6)
    start = np.float32(a) * x0 + np.float32(s) * noise
    np.testing.assert_allclose(start, ref.numpy(), rtol=0, atol=3e-6 * np.abs(start).max())

    xt, expected = ref, []
    for t in timesteps:
        xt = scheduler.step(fake_eps(xt, t), t, xt).prev_sample
        expected.append(xt.numpy())
    ours = np.asarray(jax.jit(lambda x: sample(fake_eps, x, tables, trajectory=True))(start))
    assert ours.shape[0] == len(expected)
    for k, (o, r) in enumerate(zip(ours, expected)):
        err = np.abs(o - r).max() / np.abs(r).max()
        assert err <= 1e-5, (k, err)


def test_strength_that_leaves_no_step_is_a_sentence():
    from pbe_jax.diffusion import first_step

    with pytest.raises(ValueError, match=r"strength 0.05 of 10 steps leaves no step to run"):
        make_tables(NoiseSchedule(), "ddim", 10, strength=0.05)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            first_step(10, bad)

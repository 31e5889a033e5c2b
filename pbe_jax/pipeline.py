"""`PaintByExample`: source image + mask + exemplar → edited image, the whole generation in one `jit`.

Preprocessing reproduces diffusers' `PaintByExamplePipeline`: source to [-1, 1]; mask binarised at 0.5
(white = edit) and turned into the model's convention here, once: `keep` = 1 outside the edit region;
masked source encoded by the VAE (a posterior sample, as the reference does); `keep` resized to latent size
by nearest neighbour; exemplar through the CLIP processor settings of the folder.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import images
from pbe_jax.convert import PaintByExampleModels, load
from pbe_jax.diffusion import NoiseSchedule, guided, make_tables, sample
from pbe_jax.models import Policy


def default_dtype():
    """bfloat16 on accelerators, float32 on CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def resolve_pretrained(path_or_repo: str | os.PathLike) -> Path:
    """A local folder, or a Hub repository id downloaded with huggingface_hub (when the network allows)."""
    path = Path(path_or_repo)
    if path.exists():
        return path
    name = str(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such folder (and not a Hub repository id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise FileNotFoundError(f"{name}: no such folder; downloading it as a Hub repository needs "
                                f"huggingface_hub (pip install huggingface_hub)") from e
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown repository, no access: say which and why
        raise FileNotFoundError(f"{name}: no such folder, and downloading it from the Hub failed "
                                f"({type(e).__name__}: {e})") from e


def _batch(x: Any, n: int | None, convert, what: str) -> list:
    """One input or a list/batch of them, converted; broadcast a single one to `n`."""
    if isinstance(x, (list, tuple)):
        items = [convert(v, f"{what}[{i}]") for i, v in enumerate(x)]
    elif isinstance(x, np.ndarray) and x.ndim == 4 or (isinstance(x, np.ndarray) and x.ndim == 3 and
                                                       what == "mask" and x.shape[-1] not in (1, 3, 4)):
        items = [convert(v, f"{what}[{i}]") for i, v in enumerate(x)]
    else:
        items = [convert(x, what)]
    if n is not None and len(items) == 1 and n > 1:
        items = items * n
    if n is not None and len(items) != n:
        raise images.ImageError(f"{what}: {len(items)} given for {n} source images")
    return items


@dataclasses.dataclass
class Inputs:
    """Preprocessed host arrays for one batch, NHWC."""

    image: np.ndarray  # (B, H, W, 3) float32 in [-1, 1]
    keep: np.ndarray  # (B, H, W, 1) float32, 1 = keep, 0 = edit
    reference: np.ndarray  # (B, h, w, 3) float32, CLIP-normalised
    source_rgb: np.ndarray  # (B, H, W, 3) uint8, for paste-back


class PaintByExample:
    """The user-facing pipeline. `from_pretrained(dir)` loads a diffusers Paint-by-Example folder or this
    project's checkpoint; calling it edits a batch of images."""

    def __init__(self, models: PaintByExampleModels, schedule: NoiseSchedule | None = None,
                 processor: images.ReferenceProcessor | None = None):
        self.models = models
        self.schedule = schedule or NoiseSchedule.from_config(models.extra_configs.get("scheduler"))
        self.processor = processor or images.ReferenceProcessor.from_config(
            models.extra_configs.get("feature_extractor"), models.image_encoder.config.image_size)
        self.vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        graphdef, state = nnx.split((models.unet, models.vae, models.image_encoder))
        self._state = state
        self._generate = jax.jit(lambda state, *a, **k: _generate(nnx.merge(graphdef, state), *a, **k),
                                 static_argnames=("use_guidance", "sample_posterior"))

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, dtype=None, attention: str = "auto",
                        variant: str | None = None) -> "PaintByExample":
        """`dtype` is the compute dtype (default: bfloat16 on accelerators, float32 on CPU); parameters stay
        as stored up to float32. `attention`: "auto", "xla" or "cudnn"."""
        policy = Policy(dtype=jnp.dtype(dtype or default_dtype()), attention_backend=attention)
        return cls(load(resolve_pretrained(path_or_repo), policy=policy, variant=variant))

    def preprocess(self, image, mask, reference, height: int = 512, width: int = 512) -> Inputs:
        """PIL images, paths or arrays (single or batched; one reference or mask may serve every image)."""
        f = self.vae_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}×{width}")
        rgb = [images.resize_rgb(a, (height, width)) for a in _batch(image, None, images.to_rgb, "image")]
        n = len(rgb)
        masks = [images.resize_mask(m, (height, width)) for m in _batch(mask, n, images.to_mask, "mask")]
        refs = [self.processor(r) for r in _batch(reference, n, images.to_rgb, "reference")]
        source = np.stack(rgb)
        m = np.stack(masks)[..., None]
        keep = 1.0 - m
        keep = np.where(keep < 0.5, 0.0, 1.0).astype(np.float32)  # the reference pipeline's binarisation
        return Inputs(source.astype(np.float32) / 127.5 - 1.0, keep, np.stack(refs), source)

    def __call__(self, image, mask, reference, *, steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
                 latents: np.ndarray | None = None, sampler: str = "plms", height: int = 512, width: int = 512,
                 num_images_per_reference: int = 1, eta: float = 0.0, keep_unmasked: bool = False,
                 sample_posterior: bool = True) -> np.ndarray:
        """Edit: returns uint8 (B · num_images_per_reference, height, width, 3), the copies of one input
        consecutive. `latents`, if given, is the initial noise in diffusers' NCHW layout
        (B · n, 4, height/8, width/8), so that both pipelines can start from the same point.
        `keep_unmasked` pastes the source back outside the mask (feathered at the edge inside it).
        `sample_posterior=False` encodes the masked source with the posterior mean instead of a sample."""
        x = self.preprocess(image, mask, reference, height, width)
        return self.generate(x, steps=steps, guidance_scale=guidance_scale, seed=seed, latents=latents,
                             sampler=sampler, num_images_per_reference=num_images_per_reference, eta=eta,
                             keep_unmasked=keep_unmasked, sample_posterior=sample_posterior)

    def generate(self, x: Inputs, *, steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
                 latents: np.ndarray | None = None, sampler: str = "plms", num_images_per_reference: int = 1,
                 eta: float = 0.0, keep_unmasked: bool = False, sample_posterior: bool = True) -> np.ndarray:
        """`__call__` on preprocessed inputs."""
        n = num_images_per_reference
        if n < 1:
            raise ValueError(f"num_images_per_reference must be ≥ 1, not {n}")
        b, h, w = x.image.shape[:3]
        shape = (b * n, h // self.vae_factor, w // self.vae_factor, self.models.vae.config.latent_channels)
        key_noise, key_rest = jax.random.split(jax.random.key(seed))
        if latents is None:
            z = jax.random.normal(key_noise, shape, jnp.float32)
        else:
            z = np.asarray(latents, np.float32)
            if z.shape != (shape[0], shape[3], shape[1], shape[2]):
                raise ValueError(f"latents must have diffusers' NCHW shape {(shape[0], shape[3]) + shape[1:3]}, "
                                 f"got {z.shape}")
            z = jnp.asarray(z.transpose(0, 2, 3, 1))
        tables = make_tables(self.schedule, sampler, steps, eta)
        rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731
        out = self._generate(self._state, rep(x.image), rep(x.keep), rep(x.reference), z, key_rest, tables,
                             jnp.float32(guidance_scale), use_guidance=guidance_scale > 1.0,
                             sample_posterior=sample_posterior)
        out = np.asarray(out)
        if keep_unmasked:
            out = np.stack([images.paste_back(s, o, 1.0 - k[..., 0])
                            for s, o, k in zip(rep(x.source_rgb), out, rep(x.keep))])
        return out


def _generate(nets, image, keep, reference, z, key, tables, scale, *, use_guidance: bool, sample_posterior: bool):
    """Everything after host preprocessing, traced once per shape: condition, masked-image latents, the
    sampler loop, decoding, uint8."""
    unet, vae, encoder = nets
    b = z.shape[0]
    cond = encoder(reference)
    uncond = encoder.uncond(b)
    key_posterior, key_sampler = jax.random.split(key)
    posterior = vae.encode(image * keep)
    masked = vae.scale(posterior.sample(key_posterior) if sample_posterior else posterior.mode())
    lh, lw = z.shape[1:3]
    f = image.shape[1] // lh
    keep_latent = keep[:, ::f, ::f][:, :lh, :lw]  # torch's nearest interpolation at an integer factor

    def eps_fn(x, t, context):
        reps = x.shape[0] // b
        extra = jnp.concatenate([masked.astype(jnp.float32), keep_latent], axis=-1)
        return unet(jnp.concatenate([x, jnp.tile(extra, (reps, 1, 1, 1))], axis=-1), t, context)

    latents = sample(guided(eps_fn, cond, uncond, scale, use_guidance), z, tables, key_sampler)
    decoded = vae.decode(vae.unscale(latents)).astype(jnp.float32)
    return jnp.round(jnp.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


__all__ = ["PaintByExample", "Inputs", "resolve_pretrained"]

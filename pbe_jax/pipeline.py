"""`PaintByExample`: source image + mask + exemplar → edited image, the whole generation in one `jit`.

Preprocessing reproduces diffusers' `PaintByExamplePipeline`: source to [-1, 1]; mask binarised at 0.5
(white = edit) and turned into the model's convention here, once: `keep` = 1 outside the edit region;
masked source encoded by the VAE (a posterior sample, as the reference does); `keep` resized to latent size
by nearest neighbour; exemplar through the CLIP processor settings of the folder.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import images, parallel, storage
from pbe_jax.convert import PaintByExampleModels, load
from pbe_jax.diffusion import NoiseSchedule, guided, make_tables, per_row, sample
from pbe_jax.models import Policy


def default_dtype(mesh: jax.sharding.Mesh | None = None):
    """bfloat16 on accelerators, float32 on CPU: those of `mesh` (the devices the program is compiled for),
    else this process's."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return jnp.float32 if platform == "cpu" else jnp.bfloat16


def resolve_pretrained(path_or_repo: str | os.PathLike, *, variant: str | None = None) -> storage.Path:
    """A local or object-store (gs://…) folder as it is, or a Hub repository id ("org/name") downloaded with
    `pbe_jax.hub.download` (when the network allows, or from huggingface_hub's cache): the folders a
    Paint-by-Example pipeline loads, with safetensors weights or else `.bin` ones (`variant`: e.g. "fp16");
    for a single-file repository, the path of its checkpoint file."""
    path = storage.path(path_or_repo)
    if storage.is_remote(path) or path.exists():
        return path
    name = str(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such folder (and not a Hub repository id like 'org/name')")
    from pbe_jax import hub
    from pbe_jax.convert.diffusers import COMPONENTS, PASSTHROUGH

    try:
        return hub.download(name, variant=variant, components=(*COMPONENTS, *PASSTHROUGH))
    except hub.HubError as e:  # the name may also be a mistyped local folder: say both
        raise hub.HubError(f"{name}: no such local folder; as a Hub repository: "
                           f"{str(e).removeprefix(name + ': ')}") from e


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
                 processor: images.ReferenceProcessor | None = None, mesh: jax.sharding.Mesh | None = None):
        """With a `mesh` (see `parallel.data_mesh`), batches are split over its `data` axis and the networks
        replicated; a batch that does not divide evenly is padded and trimmed."""
        self.models = models
        self.schedule = schedule or NoiseSchedule.from_config(models.extra_configs.get("scheduler"))
        self.processor = processor or images.ReferenceProcessor.from_config(
            models.extra_configs.get("feature_extractor"), models.image_encoder.config.image_size)
        self.vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        self.mesh = mesh
        graphdef = self.set_weights(models)
        self._on_step = None  # the running call's progress callback (`generate(on_step=…)`)

        def generate(state, *args, progress: bool = False, **kwargs):
            with parallel.abstract_mesh(mesh):
                return _generate(nnx.merge(graphdef, state), *args, on_step=self._step_done if progress else None,
                                 **kwargs)

        self._generate = jax.jit(generate, static_argnames=("condition", "sample_posterior", "draw_latents",
                                                            "progress"))

    def _step_done(self, i, _) -> None:
        """The host end of the sampler's per-step callback (one compiled program serves every call: the target
        is looked up when it fires). Under a mesh a step may report once per device: `on_step` sees its count."""
        if self._on_step is not None:
            self._on_step(int(i) + 1)

    def set_weights(self, models: PaintByExampleModels) -> nnx.GraphDef:
        """Swap in networks of the same architecture (e.g. newer training weights) without recompiling;
        returns their graph definition."""
        graphdef, state = nnx.split((models.unet, models.vae, models.image_encoder))
        self.models = models
        self._state = parallel.replicate(state, self.mesh) if self.mesh is not None else state
        return graphdef

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, dtype=None, attention: str = "auto",
                        variant: str | None = None, mesh: jax.sharding.Mesh | None = None,
                        ema: bool = True, lora: str | os.PathLike | None = None,
                        lora_scale: float = 1.0) -> "PaintByExample":
        """`path_or_repo`: a Paint-by-Example folder (diffusers layout or this project's checkpoint), a single file
        in the original release's layout (`model.ckpt`, `.safetensors`; `ema`: its EMA weights when it has
        them), or a Hub repository id. `dtype` is the compute dtype (default: bfloat16 on accelerators, float32
        on CPU); parameters are float32. `attention`: "auto", "xla" or "cudnn". `lora`: a UNet LoRA file in
        diffusers' layout (or a folder holding pytorch_lora_weights.safetensors), merged into the UNet's weights
        at `lora_scale` times its alpha / rank; keys that are not UNet LoRA factors are reported (a warning). The
        parts trained beside it, when its folder holds them (`lora.PARTS_FILE`), replace the base's."""
        from pbe_jax import lora as lora_lib

        policy = Policy(dtype=jnp.dtype(dtype or default_dtype(mesh)), attention_backend=attention)
        models = load(resolve_pretrained(path_or_repo, variant=variant), policy=policy, variant=variant, ema=ema)
        if lora is not None:
            adapter, cfg, other = lora_lib.load_peft(lora)
            if other:
                warnings.warn(f"{lora}: {len(other)} keys are not UNet LoRA factors and were not used: "
                              f"{', '.join(other[:5])}{', …' if len(other) > 5 else ''}", stacklevel=2)
            lora_lib.apply(models.unet, adapter, cfg.scale * lora_scale)
            lora_path = storage.path(lora)
            parts = (lora_path if lora_path.is_dir() else lora_path.parent) / lora_lib.PARTS_FILE
            if parts.is_file():  # conv_in / bottleneck trained beside the adapter (model.lora.train)
                lora_lib.load_parts(models, parts)
        return cls(models, mesh=mesh)

    @property
    def default_size(self) -> int:
        """The image side the VAE was configured for (512 for Stable Diffusion)."""
        return self.models.vae.config.sample_size

    def preprocess(self, image, mask, reference, height: int = 512, width: int = 512) -> Inputs:
        """PIL images, paths or arrays (single or batched; one reference or mask may serve every image). A mask of
        another size than its source is resized to it if its aspect ratio is the source's, with a warning, and
        refused otherwise (`images.mask_for_source`)."""
        f = self.vae_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}×{width}")
        sources = _batch(image, None, images.to_rgb, "image")
        n = len(sources)
        masks = [images.mask_for_source(m, s.shape[:2], f"mask[{i}]" if n > 1 else "mask")
                 for i, (m, s) in enumerate(zip(_batch(mask, n, images.to_mask, "mask"), sources))]
        rgb = [images.resize_rgb(a, (height, width)) for a in sources]
        masks = [images.resize_mask(m, (height, width)) for m in masks]
        refs = [self.processor(r) for r in _batch(reference, n, images.to_rgb, "reference")]
        source = np.stack(rgb)
        m = np.stack(masks)[..., None]
        keep = 1.0 - m
        keep = np.where(keep < 0.5, 0.0, 1.0).astype(np.float32)  # the reference pipeline's binarisation
        return Inputs(source.astype(np.float32) / 127.5 - 1.0, keep, np.stack(refs), source)

    def __call__(self, image, mask, reference, *, steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
                 latents: np.ndarray | None = None, sampler: str = "plms", height: int = 512, width: int = 512,
                 num_images_per_reference: int = 1, eta: float = 0.0, keep_unmasked: bool = False,
                 sample_posterior: bool = True, on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Edit: returns uint8 (B · num_images_per_reference, height, width, 3), the copies of one input
        consecutive. `latents`, if given, is the initial noise in diffusers' NCHW layout
        (B · n, 4, height/8, width/8), so that both pipelines can start from the same point.
        `keep_unmasked` pastes the source back outside the mask (feathered at the edge inside it).
        `sample_posterior=False` encodes the masked source with the posterior mean instead of a sample.
        `guidance_scale`: > 1 classifier-free guidance, (0, 1] the exemplar's condition alone, 0 the learned
        unconditional vector alone (the reference is then ignored). `on_step(done, total)` is called on the host
        as the denoising steps finish (a separate compiled program, with one host callback per step)."""
        x = self.preprocess(image, mask, reference, height, width)
        return self.generate(x, steps=steps, guidance_scale=guidance_scale, seed=seed, latents=latents,
                             sampler=sampler, num_images_per_reference=num_images_per_reference, eta=eta,
                             keep_unmasked=keep_unmasked, sample_posterior=sample_posterior, on_step=on_step)

    def generate(self, x: Inputs, *, steps: int = 50, guidance_scale: float = 5.0, seed: int | Sequence[int] = 0,
                 latents: np.ndarray | None = None, sampler: str = "plms", num_images_per_reference: int = 1,
                 eta: float = 0.0, keep_unmasked: bool = False, sample_posterior: bool = True,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """`__call__` on preprocessed inputs. Every output row draws its noise from its own key: row r from
        `seed` + r (or from `seed[r]` when a list is given), so an image's edit does not depend on the batch
        it is in, the device count, or padding."""
        n = num_images_per_reference
        if n < 1:
            raise ValueError(f"num_images_per_reference must be ≥ 1, not {n}")
        b, h, w = x.image.shape[:3]
        rows = b * n
        seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed + r for r in range(rows)]
        if len(seeds) != rows:
            raise ValueError(f"{len(seeds)} seeds given for {rows} output images")
        lh, lw = h // self.vae_factor, w // self.vae_factor
        c = self.models.vae.config.latent_channels
        if latents is None:
            z = np.zeros((rows, lh, lw, c), np.float32)  # drawn per row inside the jit
        else:
            z = np.asarray(latents, np.float32)
            if z.shape != (rows, c, lh, lw):
                raise ValueError(f"latents must have diffusers' NCHW shape {(rows, c, lh, lw)}, got {z.shape}")
            z = z.transpose(0, 2, 3, 1)
        rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731
        batch = (rep(x.image), rep(x.keep), rep(x.reference), z, np.asarray(seeds, np.uint32))
        if self.mesh is not None:
            padded = parallel.pad_to_multiple(rows, self.mesh.size)
            batch = parallel.shard_batch(tuple(np.concatenate([a, np.repeat(a[-1:], padded - rows, axis=0)])
                                               for a in batch), self.mesh)
        tables = make_tables(self.schedule, sampler, steps, eta)
        total = len(tables.timestep)
        self._on_step = None if on_step is None else (lambda done: on_step(done, total))
        try:
            out = self._run(self._generate, batch, tables, guidance_scale, jnp.float32(guidance_scale),
                            sample_posterior=sample_posterior, draw_latents=latents is None,
                            progress=on_step is not None)
            out = np.asarray(out)[:rows]
        finally:
            self._on_step = None
        if keep_unmasked:
            out = np.stack([images.paste_back(s, o, 1.0 - k[..., 0])
                            for s, o, k in zip(rep(x.source_rgb), out, rep(x.keep))])
        return out


    def _run(self, fn, batch, tables, guidance_scale: float, scale, *, sample_posterior: bool, draw_latents: bool,
             progress: bool = False):
        """The jitted generation (`fn`: it, or its `.lower`) on a placed batch (image, keep, reference, latents,
        seeds), with `scale` the traced value of `guidance_scale`."""
        return fn(self._state, *batch, tables, scale, condition=_condition(guidance_scale),
                  sample_posterior=sample_posterior, draw_latents=draw_latents, progress=progress)

    def lower(self, batch_size: int, height: int, width: int, *, steps: int = 50, sampler: str = "plms",
              guidance_scale: float = 5.0, eta: float = 0.0, sample_posterior: bool = True) -> jax.stages.Lowered:
        """The program `generate` runs for `batch_size` output images of height × width (latents drawn inside),
        lowered from shapes alone: the same function, arguments, padding and shardings, for the pipeline's mesh,
        whose devices need not be this process's (a TPU topology: `pbe_jax.aot`). The pipeline may hold shapes
        only (`convert.load_abstract`). `.compile()` the result."""
        f = self.vae_factor
        c, r = self.models.vae.config.latent_channels, self.models.image_encoder.config.image_size
        rows = parallel.pad_to_multiple(batch_size, self.mesh.size) if self.mesh is not None else batch_size
        shapes = ((height, width, 3), (height, width, 1), (r, r, 3), (height // f, width // f, c))
        batch = tuple(jax.ShapeDtypeStruct((rows, *s), jnp.float32) for s in shapes)
        batch += (jax.ShapeDtypeStruct((rows,), jnp.uint32),)
        tables = make_tables(self.schedule, sampler, steps, eta)
        scale = jax.ShapeDtypeStruct((), jnp.float32)
        if self.mesh is not None:
            batch = parallel.shard_batch(batch, self.mesh)
            tables, scale = parallel.replicate((jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                                             tables), scale), self.mesh)
        return self._run(self._generate.lower, batch, tables, guidance_scale, scale,
                         sample_posterior=sample_posterior, draw_latents=True)


def _condition(guidance_scale: float) -> str:
    """What the UNet is conditioned on: "guided" (classifier-free guidance, scale > 1), "cond" (the
    exemplar alone, 0 < scale ≤ 1, as diffusers does) or "uncond" (scale 0: the learned uncond vector alone,
    no exemplar; the paper's "no exemplar" baseline)."""
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be ≥ 0, not {guidance_scale}")
    return "guided" if guidance_scale > 1.0 else "uncond" if guidance_scale == 0 else "cond"


def _generate(nets, image, keep, reference, z, seeds, tables, scale, *, condition: str,
              sample_posterior: bool, draw_latents: bool, on_step=None):
    """Everything after host preprocessing, traced once per shape: per-row keys, condition, masked-image
    latents, the sampler loop, decoding, uint8."""
    unet, vae, encoder = nets
    b = z.shape[0]
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(seeds)  # (B, 3): noise, posterior, η
    if draw_latents:
        z = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys[:, 0])
    cond = encoder(reference)
    uncond = encoder.uncond(b)
    posterior = vae.encode(image * keep)
    if sample_posterior:
        noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(keys[:, 1])
        masked = posterior.mean + jnp.exp(0.5 * posterior.logvar) * noise.astype(posterior.mean.dtype)
    else:
        masked = posterior.mode()
    masked = vae.scale(masked).astype(jnp.float32)
    lh, lw = z.shape[1:3]
    f = image.shape[1] // lh
    keep_latent = keep[:, ::f, ::f][:, :lh, :lw]  # torch's nearest interpolation at an integer factor
    extra = jnp.concatenate([masked, keep_latent], axis=-1)

    def eps_fn(x, t, context):
        reps = x.shape[0] // b
        return unet(jnp.concatenate([x, per_row(extra, reps)], axis=-1), t, context)

    if condition == "uncond":
        cond = uncond
    latents = sample(guided(eps_fn, cond, uncond, scale, condition == "guided"), z, tables, keys[:, 2],
                     on_step=on_step)
    decoded = vae.decode(vae.unscale(latents)).astype(jnp.float32)
    return jnp.round(jnp.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


__all__ = ["PaintByExample", "Inputs", "resolve_pretrained"]

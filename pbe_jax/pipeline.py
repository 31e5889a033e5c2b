"""`PaintByExample`: source image + mask + exemplar → edited image, the whole generation in one `jit`.

Preprocessing reproduces diffusers' `PaintByExamplePipeline`: source to [-1, 1]; mask binarised at 0.5
(white = edit) and turned into the model's convention here, once: `keep` = 1 outside the edit region;
masked source encoded by the VAE (a posterior sample, as the reference does); `keep` resized to latent size
by nearest neighbour; exemplar through the CLIP processor settings of the folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import images, memory, parallel, regions, storage
from pbe_jax.convert.build import build_models
from pbe_jax.convert.diffusers import PaintByExampleModels
from pbe_jax.convert.source import ModelSource
from pbe_jax.diffusion import NoiseSchedule, guided, make_tables, per_row, sample, start_noise
from pbe_jax.models.layers import store_kernels_in_compute_dtype


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


@dataclasses.dataclass
class Edit:
    """One source's edit as prepared on the host: the photo and its (feathered) mask at the photo's size, where
    the model works on it (`placement`), and the working-size arrays."""

    photo: np.ndarray  # (H, W, 3) uint8, upright
    mask: np.ndarray  # (H, W) uint8, white = edit, after mask_blur
    placement: regions.Placement
    source: np.ndarray  # (h, w, 3) uint8 at the working size
    keep: np.ndarray  # (h, w) float32, 1 = keep, 0 = edit (binarised at 0.5)
    reference: np.ndarray  # CLIP-normalised exemplar

    def back(self, result: np.ndarray, keep_unmasked: bool) -> np.ndarray:
        """A working-size result at the photo's size: pasted through the mask when cropped; otherwise the whole
        picture, with `keep_unmasked` the photo pasted back outside the mask (through a feathered mask as it is,
        a sharp one with `images.paste_back`'s ramp inside its edge)."""
        out = self.placement.place(result, self.photo, self.mask)
        if not keep_unmasked or self.placement.crop:
            return out
        if np.isin(self.mask, (0, 255)).all():
            return images.paste_back(self.photo, out, (self.mask == 255).astype(np.float32))
        return regions.overlay(self.mask, self.photo, out)


def stack(edits: Sequence[Edit]) -> Inputs:
    """The working-size arrays of edits of one working size, as a batch."""
    sizes = sorted({e.placement.size for e in edits})
    if len(sizes) > 1:
        raise ValueError(f"these edits have different working sizes {sizes}; batch them by size")
    source = np.stack([e.source for e in edits])
    return Inputs(source.astype(np.float32) / 127.5 - 1.0, np.stack([e.keep for e in edits])[..., None],
                  np.stack([e.reference for e in edits]))


class _Progress:
    """Where the compiled program's per-step host callback reports: to the hook of the call that runs it. The
    program, callback included, serves every call, so calls with a hook take turns; calls without one run the
    program compiled without the callback and never wait (docs/sampling.md#the-compiled-program-and-progress)."""

    def __init__(self):
        self._turn = threading.Lock()
        self._hook: Callable[[int], None] | None = None

    def report(self, i, _) -> None:
        """The host end of the sampler's callback: step i is done. Under a mesh a step may report once per
        device: the hook sees its count."""
        hook = self._hook
        if hook is not None:
            hook(int(i) + 1)

    @contextlib.contextmanager
    def reporting_to(self, hook: Callable[[int], None] | None):
        """While the block runs (a call's program, until its output is on the host), reports go to `hook`
        (steps done); None: no reports, no turn taken."""
        if hook is None:
            yield
            return
        with self._turn:
            self._hook = hook
            try:
                yield
            finally:
                self._hook = None


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
        reports = self._progress = _Progress()

        def edit(state, *args, progress: bool = False, **kwargs):
            with parallel.abstract_mesh(mesh):
                return _edit_program(nnx.merge(graphdef, state), *args,
                                     on_step=reports.report if progress else None, **kwargs)

        self._jitted_edit = jax.jit(edit, static_argnames=("condition", "sample_posterior", "draw_latents",
                                                           "progress"))

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
        """The pipeline of a saved model.

        Args:
          path_or_repo: a Paint-by-Example folder (diffusers layout or this project's checkpoint), a single file in
            the original release's layout (`model.ckpt`, `.safetensors`), or a Hub repository id.
          dtype: the compute dtype (default: bfloat16 on accelerators, float32 on CPU). Parameters are float32,
            except the Linear and Conv kernels, kept in a half-precision compute dtype
            (`store_kernels_in_compute_dtype`: the same results, half their memory).
          attention: "auto", "xla" or "cudnn".
          variant: the weights' variant in a folder or Hub repository (e.g. "fp16").
          mesh: the devices to split batches over (see `__init__`).
          ema: a single file's EMA weights, when it has them.
          lora: a UNet LoRA file in diffusers' layout (or a folder holding pytorch_lora_weights.safetensors),
            merged into the UNet's weights; keys that are not UNet LoRA factors are reported (a warning). The
            parts trained beside it, when its folder holds them (`lora.PARTS_FILE`), replace the base's.
          lora_scale: the adapter is merged at `lora_scale` times its alpha / rank."""
        from pbe_jax import lora as lora_lib

        source = ModelSource.pretrained(resolve_pretrained(path_or_repo, variant=variant), ema=ema,
                                        dtype=jnp.dtype(dtype or default_dtype(mesh)).name, attention=attention)
        models = build_models(source, variant=variant)
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
        store_kernels_in_compute_dtype(*models.components().values())
        return cls(models, mesh=mesh)

    @property
    def default_size(self) -> int:
        """The image side the VAE was configured for (512 for Stable Diffusion)."""
        return self.models.vae.config.sample_size

    @property
    def size_multiple(self) -> int:
        """Working sizes are multiples of this: the autoencoder's factor times the UNet's downsampling."""
        return self.vae_factor * 2 ** (len(self.models.unet.config.block_out_channels) - 1)

    def prepare(self, image, mask, reference, *, height: int | None = None, width: int | None = None,
                padding_mask_crop: int | None = None, mask_blur: float = 0) -> list[Edit]:
        """Each source's edit, prepared on the host. `image`, `mask`, `reference`: PIL images, paths or arrays
        (single or batched; files and PIL images are turned upright by their EXIF orientation). One mask or
        reference may serve every source; one source with K references is K edits of it. A mask of another
        size than its source is resized to it if its aspect ratio is the source's, with a warning, and refused
        otherwise (`images.mask_for_source`). See `__call__` for the rest."""
        f = self.vae_factor
        if (height is None) != (width is None):
            raise ValueError("give both height and width, or neither (chosen from the photo or the crop)")
        if height is not None and (height % f or width % f):
            raise ValueError(f"height and width must be multiples of {f}, got {height}×{width}")
        sources = _batch(image, None, images.to_rgb, "image")
        refs = _batch(reference, None, images.to_rgb, "reference")
        if len(sources) == 1 and len(refs) > 1:  # one photo, several exemplars
            sources = sources * len(refs)
        n = len(sources)
        if len(refs) == 1:
            refs = refs * n
        if len(refs) != n:
            raise images.ImageError(f"reference: {len(refs)} given for {n} source images")
        masks = _batch(mask, n, images.to_mask, "mask")
        edits, done = [], {}
        for i, (src, m, ref) in enumerate(zip(sources, masks, refs)):
            key = (id(src), id(m))
            if key not in done:  # the same photo and mask for several exemplars: prepared once
                what = f"mask[{i}]" if n > 1 else "mask"
                m = np.round(images.mask_for_source(m, src.shape[:2], what) * 255).astype(np.uint8)
                m = regions.blur(m, mask_blur)
                if padding_mask_crop is not None and not m.any():
                    raise images.ImageError(f"{what}: the mask is empty (no white pixels), nothing to edit")
                place = regions.plan(m, height=height, width=width, padding_mask_crop=padding_mask_crop,
                                     native=self.default_size, multiple=self.size_multiple if height is None else f)
                keep = (place.cut(m) < 128).astype(np.float32)  # the reference pipelines' binarisation at 0.5
                done[key] = (src, m, place, place.cut(src), keep)
            edits.append(Edit(*done[key], reference=self.processor(ref)))
        return edits

    def preprocess(self, image, mask, reference, height: int | None = None, width: int | None = None, *,
                   padding_mask_crop: int | None = None, mask_blur: float = 0) -> Inputs:
        """`prepare`'s working-size arrays as one batch (the sources must share a working size)."""
        return stack(self.prepare(image, mask, reference, height=height, width=width,
                                  padding_mask_crop=padding_mask_crop, mask_blur=mask_blur))

    def __call__(self, image, mask, reference, *, steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
                 latents: np.ndarray | None = None, sampler: str = "plms", height: int | None = None,
                 width: int | None = None, num_images_per_reference: int = 1, eta: float = 0.0,
                 keep_unmasked: bool = False, sample_posterior: bool = True, padding_mask_crop: int | None = None,
                 mask_blur: float = 0, strength: float = 1.0,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray | list[np.ndarray]:
        """Edit: uint8 images at each source's own size and orientation, (B · num_images_per_reference, H, W, 3)
        (a list when the sources differ in size), the copies of one input consecutive; one source with K
        references gives K edits of it. `padding_mask_crop`, `mask_blur` and `strength` are diffusers'
        inpainting options, with their semantics (docs/sampling.md#photos-the-region-around-the-mask).

        Args:
          image, mask, reference: see `prepare` (the mask is white where the exemplar goes).
          steps: denoising steps.
          guidance_scale: > 1 classifier-free guidance, (0, 1] the exemplar's condition alone, 0 the learned
            unconditional vector alone (the reference is then ignored).
          seed: output row r draws its noise from `seed` + r (or `seed[r]`, a list of seeds).
          latents: the initial noise in diffusers' NCHW layout (B · n, 4, h/8, w/8), so that both pipelines can
            start from the same point (with strength < 1, the noise added to the source's latents).
          sampler: "plms", "ddim", "dpmpp_2m" or "unipc" (docs/sampling.md#samplers-and-steps).
          height, width: the working size. By default it follows the crop's (or the photo's) aspect ratio at
            about the model's native pixel count (`default_size`²), in multiples of `size_multiple`.
          num_images_per_reference: edits of each input (n), consecutive in the output.
          eta: DDIM's η.
          keep_unmasked: without `padding_mask_crop`, the photo pasted back outside the mask (feathered at the
            edge inside it).
          sample_posterior: False encodes with the posterior mean instead of a sample.
          padding_mask_crop: pixels. The box around the mask, this much larger on each side, grown to the working
            aspect ratio (`regions.crop_region`), is edited at the working size and pasted back into the photo
            through the mask (`regions.overlay`): outside the mask the result is the photo, bit for bit.
            Without it, the whole photo is the model's picture: resized into the working size with its aspect
            ratio kept (the leftover bands filled from its edges), and the result resized back to the photo's
            size.
          mask_blur: the mask feathered by a Gaussian of this radius in photo pixels first (`regions.blur`); the
            model sees it binarised at 0.5, the paste uses it as it is.
          strength: in (0, 1]: start from the source's latents noised to the level of step int(steps · strength)
            from the end, and run only those steps (`get_timesteps`, `prepare_latents`).
          on_step: `on_step(done, total)` is called on the host as the denoising steps finish (a separate
            compiled program, with one host callback per step), for this call only."""
        edits = self.prepare(image, mask, reference, height=height, width=width,
                             padding_mask_crop=padding_mask_crop, mask_blur=mask_blur)
        n = num_images_per_reference
        rows = len(edits) * n
        seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed + r for r in range(rows)]
        if len(seeds) != rows:
            raise ValueError(f"{len(seeds)} seeds given for {rows} output images")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(edits):
            groups.setdefault(e.placement.size, []).append(i)
        if latents is not None and len(groups) > 1:
            raise ValueError(f"latents were given, but the sources have different working sizes "
                             f"{sorted(groups)}; give height and width")
        out: list = [None] * rows
        for members in groups.values():  # one compiled batch per working size
            batch_seeds = [seeds[i * n + k] for i in members for k in range(n)]
            results = self.generate(stack([edits[i] for i in members]), steps=steps, guidance_scale=guidance_scale,
                                    seed=batch_seeds, latents=latents, sampler=sampler, num_images_per_reference=n,
                                    eta=eta, sample_posterior=sample_posterior, strength=strength, on_step=on_step)
            for j, i in enumerate(members):
                for k in range(n):
                    out[i * n + k] = edits[i].back(results[j * n + k], keep_unmasked)
        return np.stack(out) if len({o.shape for o in out}) == 1 else out

    def generate(self, x: Inputs, *, steps: int = 50, guidance_scale: float = 5.0, seed: int | Sequence[int] = 0,
                 latents: np.ndarray | None = None, sampler: str = "plms", num_images_per_reference: int = 1,
                 eta: float = 0.0, sample_posterior: bool = True, strength: float = 1.0,
                 on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """`__call__` on preprocessed inputs, at the working size (pasting back is `Edit.back`'s): uint8
        (B · num_images_per_reference, h, w, 3).

        Args:
          x: the working-size arrays (`preprocess`, `stack`).
          seed: every output row draws its noise from its own key: row r from `seed` + r (or from `seed[r]` when
            a list is given), so an image's edit does not depend on the batch it is in, the device count, or
            padding.
          on_step: `on_step(done, total)` on the host as the steps finish, for this call only: calls with a hook
            take turns on the program (docs/sampling.md#the-compiled-program-and-progress).
          steps, guidance_scale, latents, sampler, num_images_per_reference, eta, sample_posterior, strength: as
            in `__call__`."""
        n = num_images_per_reference
        if n < 1:
            raise ValueError(f"num_images_per_reference must be ≥ 1, not {n}")
        b, h, w = x.image.shape[:3]
        rows = b * n
        seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed + r for r in range(rows)]
        if len(seeds) != rows:
            raise ValueError(f"{len(seeds)} seeds given for {rows} output images")
        memory.check_pipeline_fits(self, rows=rows, height=h, width=w, guided=_condition(guidance_scale) == "guided")
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
        tables = make_tables(self.schedule, sampler, steps, eta, strength)
        start = start_noise(self.schedule, sampler, steps, strength) if strength != 1.0 else None
        total = len(tables.timestep)
        hook = None if on_step is None else (lambda done: on_step(done, total))
        with self._progress.reporting_to(hook):
            out = self._run(batch, tables, guidance_scale, sample_posterior=sample_posterior,
                            draw_latents=latents is None, progress=hook is not None, start=start)
            return np.asarray(out)[:rows]

    def _run(self, batch, tables, guidance_scale: float, *, sample_posterior: bool, draw_latents: bool,
             progress: bool = False, start: tuple[float, float] | None = None, lower: bool = False):
        """The jitted edit on a placed batch (image, keep, reference, latents, seeds): run, or with `lower`
        lowered, the batch given as shapes and the other traced arguments turned into shapes here (replicated
        over the mesh). `guidance_scale` chooses the condition (static, `_condition`) and is the traced scale;
        `start`: (a, s) of a run from the source noised to a · x₀ + s · ε (strength < 1), None from noise."""
        traced = (tables, np.float32(guidance_scale), None if start is None else np.float32(start))
        fn = self._jitted_edit
        if lower:
            traced = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), traced)
            if self.mesh is not None:
                traced = parallel.replicate(traced, self.mesh)
            fn = fn.lower
        return fn(self._state, *batch, *traced, condition=_condition(guidance_scale),
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
        if self.mesh is not None:
            batch = parallel.shard_batch(batch, self.mesh)
        return self._run(batch, make_tables(self.schedule, sampler, steps, eta), guidance_scale,
                         sample_posterior=sample_posterior, draw_latents=True, lower=True)


def _condition(guidance_scale: float) -> str:
    """What the UNet is conditioned on: "guided" (classifier-free guidance, scale > 1), "cond" (the
    exemplar alone, 0 < scale ≤ 1, as diffusers does) or "uncond" (scale 0: the learned uncond vector alone,
    no exemplar; the paper's "no exemplar" baseline)."""
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be ≥ 0, not {guidance_scale}")
    return "guided" if guidance_scale > 1.0 else "uncond" if guidance_scale == 0 else "cond"


def _edit_program(nets, image, keep, reference, z, seeds, tables, scale, start, *, condition: str,
                  sample_posterior: bool, draw_latents: bool, on_step=None):
    """Everything after host preprocessing, traced once per shape: per-row keys, condition, masked-image
    latents, the start (noise, or the source noised: `start` = (a, s)), the sampler loop, decoding, uint8."""
    unet, vae, encoder = nets
    b = z.shape[0]
    keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(seeds)  # (B, 3): noise, posterior, η
    if draw_latents:
        z = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys[:, 0])
    cond = encoder(reference)
    uncond = encoder.uncond(b)

    def latents_of(pixels, posterior_keys):
        posterior = vae.encode(pixels)
        if not sample_posterior:
            return vae.scale(posterior.mode()).astype(jnp.float32)
        noise = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(posterior_keys)
        return vae.scale(posterior.sample_with(noise)).astype(jnp.float32)

    masked = latents_of(image * keep, keys[:, 1])
    if start is not None:  # strength < 1: the whole source's latents, noised (the inpaint pipelines' start)
        source_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 1))(seeds)
        z = start[0] * latents_of(image, source_keys) + start[1] * z
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


__all__ = ["PaintByExample", "Edit", "Inputs", "resolve_pretrained", "stack"]

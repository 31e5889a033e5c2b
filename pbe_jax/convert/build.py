"""The one builder: the three networks a `ModelSource` names, with their weights or with shapes only, for every
init. Training (`train.trainer`), `python -m pbe_jax.aot` (the step and the sampler) and the pipeline
(`PaintByExample.from_pretrained`) all build here."""
from __future__ import annotations

import jax.numpy as jnp

from pbe_jax import storage
from pbe_jax.convert import formats, init
from pbe_jax.convert.diffusers import PaintByExampleModels, abstract as abstract_models, load_component, read_config
from pbe_jax.convert.ldm_file import default_extras
from pbe_jax.convert.source import INITS, ModelSource
from pbe_jax.models import CLIPVisionConfig, Policy, UNet2DConditionModel, UNetConfig, VAEConfig


def policy(source: ModelSource) -> Policy:
    """The compute dtype and attention kernel the source asks for (parameters stay float32)."""
    return Policy(dtype=jnp.dtype(source.dtype), attention_backend=source.attention)


def build_models(source: ModelSource, *, seed: int = 0, reference_size: int = 224, abstract: bool = False,
                 variant: str | None = None) -> PaintByExampleModels:
    """The UNet, VAE and image encoder `source.init` names.

    Args:
      source: where they come from (a training config's `model` is one): "sd" (SD v1.x + a CLIP vision folder,
        the paper's initialisation), "pbe" (a Paint-by-Example folder or single file), "components" (VAE and
        image encoder folders, a random UNet of `source.unet`'s config) or "scratch" (all random).
      seed: the random weights' seed (SD's new bottleneck, or every network from scratch).
      reference_size: the reference's side in the preprocessing config of a model trained here (components,
        scratch); a folder's or file's own configs are kept.
      abstract: shapes only (`jax.ShapeDtypeStruct` leaves): configs are read from the folders' config.json
        files (a single file's from its tensors' shapes) and no weight is read, drawn or allocated, so that any
        program over them can be lowered for any devices (`pbe_jax.aot`).
      variant: a folder's weights variant (e.g. "fp16"), for init="pbe".
    """
    p = policy(source)
    if source.init == "pbe":
        path = storage.path(source.weights())
        if abstract:
            return formats.load_abstract(path, policy=p)
        return formats.load(path, policy=p, variant=variant, ema=source.ema)
    if source.init == "sd":
        if abstract:
            configs, extras = init.stable_diffusion_configs(source.weights(), source.clip_folder)
            return abstract_models(configs, policy=p, extra_configs=extras)
        return init.from_stable_diffusion(source.weights(), source.clip_folder, policy=p, seed=seed, ema=source.ema)
    if source.init not in INITS:
        raise ValueError(f"model.init must be {', '.join(map(repr, INITS[:-1]))} or {INITS[-1]!r}, "
                         f"not {source.init!r}")
    extras = default_extras(reference_size)  # a model trained here samples with PLMS and CLIP's preprocessing
    unet = UNetConfig.from_dict(source.unet, "model.unet")
    if source.init == "components":
        folders = {"vae": storage.path(source.vae_folder), "image_encoder": storage.path(source.image_encoder_folder)}
        if abstract:
            configs = {"unet": unet, **{name: read_config(folder, name) for name, folder in folders.items()}}
            return abstract_models(configs, policy=p, extra_configs=extras)
        return PaintByExampleModels(init.random_module(UNet2DConditionModel, unet, p, seed),
                                    *(load_component(folder, name, policy=p) for name, folder in folders.items()),
                                    extras)
    vae = VAEConfig.from_dict(source.vae, "model.vae")
    encoder = CLIPVisionConfig.from_dict(source.image_encoder, "model.image_encoder")
    if abstract:
        return abstract_models({"unet": unet, "vae": vae, "image_encoder": encoder}, policy=p, extra_configs=extras)
    return init.from_scratch(unet, vae, encoder, policy=p, seed=seed, extra_configs=extras)


__all__ = ["build_models", "policy"]

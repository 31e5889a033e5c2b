"""Whole single files in the original code base's layout, in and out: the Paint-by-Example release's
`model.ckpt` (or a `.safetensors` of it) as a `PaintByExampleModels`, the UNet and VAE of an SD v1 file for the
paper's initialisation, and `save_ldm`, which writes a model back in the original's layout (`ldm.py` maps the
UNet and VAE names, `single_file.py` reads files, tells what they hold and maps the conditioning part).

Configs come from the tensors' shapes (SD v1's values for what shapes cannot show: 8 attention heads, 32 norm
groups, …, and the CLIP ViT-L/14 tower), unless the file carries this project's configs (`save_ldm` writes
them into its metadata), which then win: a model with other options (the tiny test models, the shipped one)
round-trips exactly.
"""
from __future__ import annotations

import io
import json

import numpy as np

from pbe_jax import storage
from pbe_jax.convert import ldm, mapping, single_file
from pbe_jax.convert.diffusers import PaintByExampleModels, _stored, from_state_dict
from pbe_jax.convert.weights import SINGLE_FILE_SUFFIXES, WeightsError, save_safetensors
from pbe_jax.diffusion.schedule import NoiseSchedule
from pbe_jax.models import Policy
from pbe_jax.storage import Path, PathLike

SUFFIXES = SINGLE_FILE_SUFFIXES
CONFIGS_KEY = "pbe_jax_configs"  # the metadata entry save_ldm writes: {"unet": …, "vae": …, "image_encoder": …}


def is_single_file(path: PathLike) -> bool:
    path = storage.path(path)
    return path.suffix in SUFFIXES and path.is_file()


def default_extras(reference_size: int = 224) -> dict:
    """The sampling configs a file without them gets (and a model trained here): PLMS (diffusers' PNDM with
    `skip_prk_steps`) on SD's schedule, and CLIP's preprocessing of the reference at `reference_size`."""
    return {"scheduler": {"_class_name": "PNDMScheduler", **NoiseSchedule().to_config(), "skip_prk_steps": True},
            "feature_extractor": {"crop_size": {"height": reference_size, "width": reference_size},
                                  "size": {"shortest_edge": reference_size}, "do_center_crop": True,
                                  "do_normalize": True, "do_resize": True, "resample": 3}}


def _read(path: PathLike, ema: bool, expected: str) -> tuple[dict, dict, Path]:
    """(weights with EMA chosen, this project's configs if the file has them, path); WeightsError naming the
    file when it is not the `expected` kind ("pbe" or "sd1")."""
    path = storage.path(path)
    sd, meta = single_file.read_file(path)
    try:
        kind = single_file.detect(sd)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e
    if kind != expected:
        raise WeightsError(
            f"{path}: an SD v1 text-to-image checkpoint, not a Paint-by-Example model; use it to initialise "
            f"training (train.py model.init=sd model.sd_file={path} model.clip_folder=…)" if kind == "sd1" else
            f"{path}: a Paint-by-Example checkpoint, not SD v1; load it with PaintByExample.from_pretrained, or "
            f"fine-tune it with train.py model.init=pbe model.pbe_file={path}")
    try:
        configs = json.loads(meta[CONFIGS_KEY]) if CONFIGS_KEY in meta else {}
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: its {CONFIGS_KEY} metadata is not JSON ({e})") from e
    return single_file.select_ema(sd, ema), configs, path


def _named(path: Path, fn, *args, **kwargs):
    """fn(*args, **kwargs), its WeightsError or ValueError prefixed with the file it is about."""
    try:
        return fn(*args, **kwargs)
    except WeightsError as e:
        raise e if str(path) in str(e) else WeightsError(f"{path}: {e}") from e
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from e


def _unet_vae(sd: dict, configs: dict, path: Path, in_channels: int | None = None) -> tuple[dict, dict, dict, dict]:
    unet_cfg = configs.get("unet") or _named(path, ldm.unet_config_from_ldm, sd)
    vae_cfg = configs.get("vae") or _named(path, ldm.vae_config_from_ldm, sd)
    if in_channels is not None and unet_cfg.get("in_channels") != in_channels:
        raise WeightsError(f"{path}: {ldm.UNET_PREFIX}input_blocks.0.0.weight has {unet_cfg.get('in_channels')} "
                           f"input channels, expected {in_channels}")
    return unet_cfg, _named(path, ldm.unet_from_ldm, sd), vae_cfg, _named(path, ldm.vae_from_ldm, sd)


def load_single_file(path: PathLike, *, policy: Policy = Policy(), ema: bool = True) -> PaintByExampleModels:
    """A Paint-by-Example model from the original release's single file (`.ckpt` via
    `torch.load(weights_only=True)`, or `.safetensors` without torch). `ema`: use the EMA weights when the file
    has them. Schedule buffers and other non-weights are ignored; anything else that does not fit is a
    WeightsError naming the file, the key and both shapes."""
    sd, configs, path = _read(path, ema, "pbe")
    unet_cfg, unet_state, vae_cfg, vae_state = _unet_vae(sd, configs, path)
    enc_cfg = configs.get("image_encoder") or _named(path, single_file.image_encoder_config_from_ldm, sd)
    enc_state = _named(path, single_file.image_encoder_from_ldm, sd)
    src = str(path)
    models = {"unet": from_state_dict("unet", unet_cfg, unet_state, policy=policy, source=src),
              "vae": from_state_dict("vae", vae_cfg, vae_state, policy=policy, source=src),
              "image_encoder": from_state_dict("image_encoder", enc_cfg, enc_state, policy=policy, source=src)}
    extras = configs.get("extra_configs") or default_extras(models["image_encoder"].config.image_size)
    return PaintByExampleModels(**models, extra_configs=extras)


def read_configs(path: PathLike, expected: str = "pbe") -> tuple[dict, dict]:
    """({"unet", "vae", "image_encoder"} config dicts, extra configs) of a Paint-by-Example single file
    (`expected="pbe"`), or of an SD v1 one ("sd1": UNet and VAE only, the UNet's 4 input channels as stored),
    as `load_single_file`/`load_sd_v1` derive them, without building a network."""
    sd, configs, path = _read(path, True, expected)
    out = {"unet": configs.get("unet") or _named(path, ldm.unet_config_from_ldm, sd),
           "vae": configs.get("vae") or _named(path, ldm.vae_config_from_ldm, sd)}
    if expected == "sd1":
        return out, {"scheduler": default_extras()["scheduler"]}
    out["image_encoder"] = (configs.get("image_encoder")
                            or _named(path, single_file.image_encoder_config_from_ldm, sd))
    size = out["image_encoder"].get("image_size", 224)
    return out, configs.get("extra_configs") or default_extras(size)


def load_sd_v1(path: PathLike, *, policy: Policy = Policy(), ema: bool = True) -> tuple[dict, dict, object, dict]:
    """From an SD v1 single file, what the paper's initialisation takes: (UNet config dict (4 input channels),
    the UNet's state dict in diffusers' names, the VAE module, the scheduler config)."""
    sd, configs, path = _read(path, ema, "sd1")
    unet_cfg, unet_state, vae_cfg, vae_state = _unet_vae(sd, configs, path, in_channels=4)
    vae = from_state_dict("vae", vae_cfg, vae_state, policy=policy, source=str(path))
    return unet_cfg, unet_state, vae, default_extras()["scheduler"]


# ---- writing ----------------------------------------------------------------------------------------


def schedule_buffers(schedule: NoiseSchedule) -> dict[str, np.ndarray]:
    """The DDPM buffers the original's LatentDiffusion registers (its state dict has them beside the weights),
    computed as it does: in float64 from its betas, stored as float32."""
    betas = (np.linspace(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, schedule.num_train_timesteps,
                         dtype=np.float64) ** 2 if schedule.beta_schedule == "scaled_linear" else
             np.linspace(schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps, dtype=np.float64))
    alphas = 1.0 - betas
    cum = np.cumprod(alphas)
    prev = np.append(1.0, cum[:-1])
    posterior = betas * (1.0 - prev) / (1.0 - cum)
    out = {"betas": betas, "alphas_cumprod": cum, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": np.sqrt(cum),
           "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cum), "log_one_minus_alphas_cumprod": np.log(1.0 - cum),
           "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cum), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cum - 1),
           "posterior_variance": posterior,
           "posterior_log_variance_clipped": np.log(np.maximum(posterior, 1e-20)),
           "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - cum),
           "posterior_mean_coef2": (1.0 - prev) * np.sqrt(alphas) / (1.0 - cum)}
    return {k: v.astype(np.float32) for k, v in out.items()}


def to_ldm(models: PaintByExampleModels) -> dict[str, np.ndarray]:
    """The whole model as the original's state dict: its weights, its schedule buffers and the CLIP tower's
    `position_ids` buffer (which the transformers version the original pins saves), nothing else."""
    unet, vae, enc = models.unet, models.vae, models.image_encoder
    out = {ldm.UNET_PREFIX + k: v for k, v in ldm.unet_to_ldm(mapping.to_torch(unet), unet.config.to_dict()).items()}
    out.update({ldm.VAE_PREFIX + k: v for k, v in ldm.vae_to_ldm(mapping.to_torch(vae), vae.config.to_dict()).items()})
    out.update(single_file.image_encoder_to_ldm(mapping.to_torch(enc)))
    positions = (enc.config.image_size // enc.config.patch_size) ** 2 + 1
    out[single_file.VISION + "embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
    out.update(schedule_buffers(NoiseSchedule.from_config(models.extra_configs.get("scheduler"))))
    return out


def save_ldm(models: PaintByExampleModels, path: PathLike, *, dtype: str | None = None) -> Path:
    """Write `models` in the original release's layout: `.safetensors` (no torch needed), or a `.ckpt`/`.pt`/
    `.pth` pickle `{"state_dict": …}` as the original's checkpoints are. This project's configs go into the file's
    metadata so that it reads back exactly here; other readers ignore them. `dtype` ("float16", …) stores
    the floating-point tensors in that type. Written whole or not at all."""
    path = storage.path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: an ldm file is .safetensors, or .ckpt/.pt/.pth (a PyTorch pickle)")
    tensors = _stored(to_ldm(models), dtype)
    configs = json.dumps({"unet": models.unet.config.to_dict(), "vae": models.vae.config.to_dict(),
                          "image_encoder": models.image_encoder.config.to_dict(),
                          "extra_configs": models.extra_configs})
    if path.suffix == ".safetensors":
        save_safetensors(tensors, path, {"format": "pt", CONFIGS_KEY: configs})
        return path
    import torch

    buffer = io.BytesIO()
    def tensor(v):  # torch has no bfloat16 numpy arrays: through float32, which holds them exactly
        if v.dtype == np.dtype("bfloat16"):
            return torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(np.array(v))  # a writable copy

    torch.save({"state_dict": {k: tensor(v) for k, v in tensors.items()}, CONFIGS_KEY: configs}, buffer)
    storage.write_bytes(path, buffer.getvalue())
    return path


__all__ = ["default_extras", "is_single_file", "load_sd_v1", "load_single_file", "save_ldm", "schedule_buffers",
           "to_ldm"]

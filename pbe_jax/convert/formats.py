"""A model in any format this project reads, by path: a diffusers Paint-by-Example folder, this project's
checkpoint folder (`convert.diffusers`), or a single file in the original release's layout (`model.ckpt`,
`.safetensors`: `convert.ldm_file`); and conversion between them. The one module that knows both readers, so
that neither needs the other."""
from __future__ import annotations

from pbe_jax import storage
from pbe_jax.convert import diffusers, ldm_file
from pbe_jax.convert.diffusers import PaintByExampleModels
from pbe_jax.convert.weights import SINGLE_FILE_SUFFIXES
from pbe_jax.models import Policy
from pbe_jax.storage import Path


def _single_file(path: Path) -> bool:
    return path.suffix in SINGLE_FILE_SUFFIXES and not path.is_dir()


def load(path: str | Path, *, policy: Policy = Policy(), variant: str | None = None,
         ema: bool = True) -> PaintByExampleModels:
    """A whole Paint-by-Example folder, diffusers format or this project's checkpoint, or a single file in the
    original release's layout (`model.ckpt`, `.safetensors`; `ema`: its EMA weights when it has them)."""
    path = storage.path(path)
    if _single_file(path):
        return ldm_file.load_single_file(path, policy=policy, ema=ema)
    return diffusers.load_folder(path, policy=policy, variant=variant)


def load_abstract(path: str | Path, *, policy: Policy = Policy()) -> PaintByExampleModels:
    """`load(path)` with shapes only: a folder's configs are read and its weights never; a single file's
    configs come from its tensors' shapes (so it is read, but no network is built from it)."""
    path = storage.path(path)
    if _single_file(path):
        configs, extras = ldm_file.read_configs(path)
        return diffusers.abstract(configs, policy=policy, extra_configs=extras)
    return diffusers.load_folder_abstract(path, policy=policy)


def convert(src: str | Path, dst: str | Path, *, to: str | None = None, variant: str | None = None,
            dtype: str | None = None, ema: bool = True) -> str:
    """Convert a model: a diffusers folder → this project's checkpoint, or back (`to` defaults to the other
    one); a single file in the original's layout → this project's checkpoint (or `to="diffusers"`); any of
    them → `to="ldm"`, a single file in the original's layout (`dst` ends in .safetensors or .ckpt). `dtype`
    stores the weights in that type (e.g. "float16", half the size); `ema` picks a single file's EMA weights."""
    src, dst = storage.path(src), storage.path(dst)
    to = to or ("diffusers" if diffusers.is_checkpoint(src) else "jax")
    if (src if storage.is_remote(src) else src.resolve()) == (dst if storage.is_remote(dst) else dst.resolve()):
        raise ValueError(f"source and destination are the same: {src}")
    models = load(src, variant=variant, ema=ema)
    if to == "ldm":
        ldm_file.save_ldm(models, dst, dtype=dtype)
    else:
        diffusers.save_replacing(models, dst, format=to, dtype=dtype)
    return to

"""Reading and writing weight files: safetensors (no torch needed), sharded indexes, and PyTorch pickles
loaded only with `torch.load(weights_only=True)`."""
from __future__ import annotations

import io
import json
import os
import re

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors.numpy needs)
import numpy as np
import safetensors.numpy

from pbe_jax import storage
from pbe_jax.storage import Path


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file and the key."""


# Where diffusers (first) and transformers (second) put a component's weights.
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def _weight_names(variant: str | None) -> list[str]:
    """The names a component's weights go by, safetensors first; a variant's shard index in both spellings
    (diffusers and transformers write model.safetensors.index.fp16.json)."""
    names = []
    for base in WEIGHT_NAMES:
        stem = f"{base}.{variant}" if variant else base
        names += [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin", f"{stem}.bin.index.json"]
        if variant:
            names += [f"{base}.safetensors.index.{variant}.json", f"{base}.bin.index.{variant}.json"]
    return sorted(names, key=lambda n: (".bin" in n, names.index(n)))


def find_weights(folder: Path, variant: str | None = None) -> Path:
    """The weight file (or shard index) of a component folder, safetensors preferred over pickles. With a
    `variant` ("fp16"), its files where the folder has them, else the plain ones (as diffusers does)."""
    folder = storage.path(folder)
    tried = []
    for names in ([_weight_names(variant)] if variant else []) + [_weight_names(None)]:
        tried += names
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise WeightsError(f"no weights in {folder} (looked for {', '.join(tried)})")


def _load_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{path} is a PyTorch pickle; reading it needs torch (pip install 'pbe-jax[torch]'), "
                           f"or convert it to safetensors first") from e
    try:
        sd = torch.load(io.BytesIO(path.read_bytes()) if storage.is_remote(path) else os.fspath(path), map_location="cpu",
                        weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise WeightsError(f"{path}: refusing to load. It is not a plain tensor pickle that "
                           f"torch.load(weights_only=True) accepts (it may execute code, or be truncated): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds a {type(sd).__name__}, not a dictionary of tensors")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach()
        out[k] = v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if storage.is_remote(path):
            return safetensors.numpy.load(path.read_bytes())
        return safetensors.numpy.load_file(os.fspath(path))
    except Exception as e:  # SafetensorError for truncated/corrupt files, OSError for unreadable ones
        raise WeightsError(f"{path}: cannot read safetensors file ({e}); it may be truncated or not "
                           f"a safetensors file") from e


def load_file(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one weight file or shard index, as numpy arrays keyed by PyTorch parameter name."""
    path = storage.path(path)
    if path.name.endswith(".index.json") or re.search(r"\.index\.[\w-]+\.json$", path.name):
        try:
            index = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{path}: not a shard index with a weight_map ({e})") from e
        out = {}
        for shard in sorted(set(index.values())):
            out.update(load_file(path.parent / shard))
        return out
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    return _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically (`storage.write_with`): a crash leaves the old file or none, never a truncated one."""
    # ascontiguousarray makes 0-d arrays 1-d; reshape keeps scalars (e.g. an EMA's num_updates) scalars.
    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}
    storage.write_with(path, lambda local: safetensors.numpy.save_file(tensors, local, metadata=metadata))

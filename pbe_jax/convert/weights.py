"""Reading and writing weight files: safetensors (no torch needed), sharded indexes, and PyTorch pickles
loaded only with `torch.load(weights_only=True)`."""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors.numpy needs)
import numpy as np
import safetensors.numpy

from pbe_jax import storage
from pbe_jax.storage import Path


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the file and the key."""


# Where diffusers (first) and transformers (second) put a component's weights.
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
# A whole model in one file, in the original code base's layout (its model.ckpt, SD v1 files).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


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


# Bookkeeping objects of (PyTorch) Lightning that a training checkpoint pickles beside the weights (e.g. the
# ModelCheckpoint class as a key of `callbacks`). They are unpickled as an inert stand-in, never imported.
_STUBBED = re.compile(r"^(pytorch_lightning|lightning|lightning_fabric)\.")


class _Stub:
    """What a Lightning object in a checkpoint unpickles to: nothing of it is imported or executed."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _damage(path: Path) -> str:
    # torch's own message for a cut-off zip archive is a bare "[Errno 22] Invalid argument"
    try:
        with path.open("rb") as f:
            head = f.read(4)
        cut = head == b"PK\x03\x04" and not zipfile.is_zipfile(
            io.BytesIO(path.read_bytes()) if storage.is_remote(path) else os.fspath(path))
    except OSError:
        cut = False
    if cut:
        return "it is a zip archive (torch.save's format) without its end: the file is truncated"
    return NOT_TORCH if not looks_like_torch_file(path) else "it may be truncated or not a checkpoint"


NOT_TORCH = "it is neither a zip archive (torch.save's format) nor a pickle, so it is damaged or of another format"


def looks_like_torch_file(path: Path) -> bool:
    """Whether the file starts as torch.save writes: a zip archive, a pickle (protocol 2 or later, the legacy
    format) or a tar archive (before torch 0.4). Unreadable files count as such (their error comes later)."""
    try:
        with path.open("rb") as f:
            head = f.read(262)
    except OSError:
        return True
    return (head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
            or head[257:262] == b"ustar")


def _torch_load(path: Path):
    """`torch.load(weights_only=True)` of `path`; Lightning's bookkeeping objects come back as inert stand-ins,
    any other object is refused (WeightsError naming it), as is a damaged file."""
    try:
        import torch
    except ImportError as e:
        if not looks_like_torch_file(path):  # what is wrong with the file comes before what is missing
            raise WeightsError(f"{path}: cannot read this PyTorch checkpoint; {NOT_TORCH}") from None
        raise WeightsError(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch, or the "
                           f"[torch] extra: pip install 'pbe-jax[torch]'), or convert it to safetensors where "
                           f"torch is installed") from e
    data = path.read_bytes() if storage.is_remote(path) else None

    def src():
        return io.BytesIO(data) if data is not None else os.fspath(path)

    def refused_globals(error) -> list[str] | None:
        # the globals weights_only would not construct: all at once for zip files, one per try for legacy ones
        if not isinstance(error, pickle.UnpicklingError):
            return None
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(src()))
        except Exception:
            return re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error)) or None

    stubs: list[str] = []
    mmap = data is None and zipfile.is_zipfile(src())  # zip format: map it rather than copy gigabytes
    while True:
        try:
            with torch.serialization.safe_globals([(_Stub, name) for name in stubs]):
                return torch.load(src(), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # UnpicklingError (a refused global), OSError/RuntimeError/EOFError (damage), …
            unsafe = refused_globals(e)
            if unsafe is None:
                line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                damage = _damage(path)
                if damage == NOT_TORCH:  # torch's own words add nothing (e.g. about weights_only) for such files
                    raise WeightsError(f"{path}: cannot read this PyTorch checkpoint; {damage}") from e
                raise WeightsError(f"{path}: cannot read this PyTorch checkpoint; {damage} "
                                   f"({type(e).__name__}: {line})") from e
            refused = [g for g in unsafe if not _STUBBED.match(g)]
            new = [g for g in unsafe if g not in stubs]
            if refused or not new:
                raise WeightsError(f"{path}: refusing to load. Besides tensors it pickles "
                                   f"{', '.join(refused) or 'objects'}, which torch.load(weights_only=True) does "
                                   f"not construct (constructing them could run code). Re-save its state_dict "
                                   f"alone, or as safetensors, where the file comes from a source you trust") from e
            stubs += new


def read_pickle(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, the string entries at the pickle's top level) of a PyTorch weights file: a plain state dict,
    or a (Lightning) checkpoint with it under `state_dict`, nested once or twice (other entries, such as the
    epoch or optimizer states, are left out). Every entry of the state dict must be a tensor."""
    path = storage.path(path)
    sd = _torch_load(path)  # first: it explains a missing torch
    import torch

    meta = {k: v for k, v in sd.items() if isinstance(v, str)} if isinstance(sd, dict) else {}
    for _ in range(2):
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds a {type(sd).__name__}, not a dictionary of tensors")
    if not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: no tensors in it (it holds {', '.join(repr(k) for k in list(sd)[:8]) or 'nothing'})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach()
        out[k] = v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 else v.numpy()
    return out, meta


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
    return _load_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path)[0]


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically (`storage.write_with`): a crash leaves the old file or none, never a truncated one."""
    # ascontiguousarray makes 0-d arrays 1-d; reshape keeps scalars (e.g. an EMA's num_updates) scalars.
    tensors = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}
    storage.write_with(path, lambda local: safetensors.numpy.save_file(tensors, local, metadata=metadata))

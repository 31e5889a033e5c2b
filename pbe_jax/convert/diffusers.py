"""Paint-by-Example folders ↔ Flax models: diffusers-format folders (as `save_pretrained` writes them and
as released) and this project's checkpoint (the same layout with Flax-layout safetensors, read without
torch and without transposes).

    folder/model_index.json
          /unet/config.json            + diffusion_pytorch_model.safetensors | params.safetensors
          /vae/config.json             + diffusion_pytorch_model.safetensors | params.safetensors
          /image_encoder/config.json   + model.safetensors                   | params.safetensors
          /scheduler/scheduler_config.json, /feature_extractor/preprocessor_config.json  (copied as they are)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import __version__, storage
from pbe_jax.convert import mapping
from pbe_jax.convert.weights import (NOT_TORCH, SINGLE_FILE_SUFFIXES, WeightsError, find_weights, load_file,
                                     looks_like_torch_file, save_safetensors)
from pbe_jax.models import (AutoencoderKL, CLIPVisionConfig, ConfigError, PaintByExampleImageEncoder, Policy,
                            UNet2DConditionModel, UNetConfig, VAEConfig)
from pbe_jax.storage import Path

CHECKPOINT_MARKER = "pbe_jax.json"  # at the root of this project's checkpoints
INDEX_FILE = "model_index.json"  # written last: in a bucket, a folder without it is incomplete
PARAMS_FILE = "params.safetensors"
# Components copied through unchanged (configs only); a released folder's safety_checker is not carried.
PASSTHROUGH = {"scheduler": "scheduler_config.json", "feature_extractor": "preprocessor_config.json"}


def encoder_key(key: str) -> str:
    # Released checkpoints (transformers 4) name the CLIP tower model.vision_model.*, transformers 5 saves
    # model.*; both load, and exports use the first form, which both versions read.
    if key.startswith("model.") and not key.startswith("model.vision_model."):
        return "model.vision_model." + key[len("model."):]
    return key


@dataclasses.dataclass(frozen=True)
class Component:
    model: type
    config: type
    weights_file: str  # the file name diffusers/transformers expect on export
    library: tuple[str, str]  # the model_index.json entry
    normalize_key: Callable[[str], str] = lambda k: k
    is_buffer: Callable[[str], bool] = lambda k: False


COMPONENTS = {
    "unet": Component(UNet2DConditionModel, UNetConfig, "diffusion_pytorch_model.safetensors",
                      ("diffusers", "UNet2DConditionModel")),
    "vae": Component(AutoencoderKL, VAEConfig, "diffusion_pytorch_model.safetensors",
                     ("diffusers", "AutoencoderKL")),
    "image_encoder": Component(PaintByExampleImageEncoder, CLIPVisionConfig, "model.safetensors",
                               ("paint_by_example", "PaintByExampleImageEncoder"), encoder_key,
                               lambda k: k.endswith("embeddings.position_ids")),
}


@dataclasses.dataclass
class PaintByExampleModels:
    """The three networks of a Paint-by-Example pipeline plus the configs sampling needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: PaintByExampleImageEncoder
    extra_configs: dict[str, dict] = dataclasses.field(default_factory=dict)  # scheduler, feature_extractor

    def components(self) -> dict[str, nnx.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}


def read_json(path: Path) -> dict[str, Any]:
    path = storage.path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def write_json(path: Path, obj: dict) -> None:
    storage.write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_config(folder: Path, name: str):
    path = storage.path(folder) / "config.json"
    return COMPONENTS[name].config.from_dict(read_json(path), str(path))


def is_checkpoint(folder: Path) -> bool:
    return (storage.path(folder) / CHECKPOINT_MARKER).is_file()


def from_state_dict(name: str, config, state_dict: dict, *, policy: Policy = Policy(),
                    source: str = "") -> nnx.Module:
    """Component `name` from its config (a config object, or a diffusers/transformers config dict) and a
    PyTorch-named state dict; `source` names where the weights came from, for error messages."""
    comp = COMPONENTS[name]
    if isinstance(config, dict):
        config = comp.config.from_dict(config, f"{name} config ({source})" if source else f"{name} config")
    state = {}
    for key, value in state_dict.items():
        canon = comp.normalize_key(key)
        if canon in state:
            raise WeightsError(f"{source}: {key} and another key both name {canon}")
        state[canon] = value
    return mapping.from_torch(comp.model, config, policy, state, source or name, ignore=comp.is_buffer)


def load_component(folder: Path, name: str, *, policy: Policy = Policy(), variant: str | None = None) -> nnx.Module:
    """One component from its folder: diffusers/transformers format, or this project's (params.safetensors)."""
    folder = storage.path(folder)
    config = read_config(folder, name)  # first: a config this port cannot build fails before any reading
    if (folder / PARAMS_FILE).is_file():
        flat = load_file(folder / PARAMS_FILE)
        params = {mapping.parse_flax_name(k): v for k, v in flat.items()}
        return mapping.materialize(COMPONENTS[name].model, config, policy, params, str(folder / PARAMS_FILE))
    path = find_weights(folder, variant)
    return from_state_dict(name, config, load_file(path), policy=policy, source=str(path))


STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def _stored(tensors: dict[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    """Floating-point tensors cast to the storage `dtype` (None: as they are); loading casts them back."""
    if dtype is None:
        return tensors
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype!r}")
    target = jnp.dtype(dtype)
    return {k: np.asarray(v, target) if np.issubdtype(v.dtype, np.floating) or v.dtype == jnp.bfloat16 else v
            for k, v in tensors.items()}


def save_component(module: nnx.Module, folder: Path, name: str, *, format: str, dtype: str | None = None) -> None:
    """Write one component as `format` "diffusers" (PyTorch names and layouts) or "jax" (this project's);
    `dtype` ("float16", ...) stores the weights in a smaller type (default: the parameters' own)."""
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", module.config.to_dict())
    if format == "diffusers":
        save_safetensors(_stored(mapping.to_torch(module), dtype), folder / COMPONENTS[name].weights_file,
                         {"format": "pt"})
    elif format == "jax":
        params = {mapping.flax_name(p): a for p, a in mapping.module_params(module).items()}
        save_safetensors(_stored(params, dtype), folder / PARAMS_FILE, {"format": "pbe_jax", "component": name})
    else:
        raise ValueError(f"format must be 'diffusers' or 'jax', not {format!r}")


def _not_a_folder(path: Path) -> Exception:
    """The error for a model path that is no folder: missing, or a file in no single-file format read here."""
    if not path.is_file():
        return FileNotFoundError(f"{path}: no such folder")
    why = ("if it is a PyTorch checkpoint in that layout, rename it to .ckpt" if looks_like_torch_file(path)
           else NOT_TORCH)
    return WeightsError(f"{path}: a file, not a model folder, and not a checkpoint this reads: a whole model in "
                        f"one file must be the original release's layout as "
                        f"{', '.join(SINGLE_FILE_SUFFIXES[:-1])} or {SINGLE_FILE_SUFFIXES[-1]} ({why})")


def load_folder(folder: str | Path, *, policy: Policy = Policy(), variant: str | None = None) -> PaintByExampleModels:
    """A whole Paint-by-Example folder, diffusers format or this project's checkpoint (`convert.load` takes
    single files too)."""
    folder = storage.path(folder)
    if not folder.is_dir():
        raise _not_a_folder(folder)
    index = folder / INDEX_FILE
    if storage.is_remote(folder) and not index.is_file():  # see storage.replace_folder
        raise FileNotFoundError(f"{folder}: no {INDEX_FILE}: not a pipeline folder, or one still being written (in a "
                                f"bucket {INDEX_FILE} is written last, and a folder without it counts as absent)")
    listed = read_json(index) if index.is_file() else {}
    for name in COMPONENTS:
        if not (folder / name).is_dir():
            where = f"; {index.name} lists it" if name in listed else ""
            raise FileNotFoundError(f"{folder} has no {name}/ folder, which a Paint-by-Example pipeline needs "
                                    f"(components: {', '.join(COMPONENTS)}){where}")
    models = {name: load_component(folder / name, name, policy=policy, variant=variant) for name in COMPONENTS}
    extras = {name: read_json(folder / name / file) for name, file in PASSTHROUGH.items()
              if (folder / name / file).is_file()}
    return PaintByExampleModels(**models, extra_configs=extras)


def abstract(configs: dict, *, policy: Policy = Policy(), extra_configs: dict | None = None) -> PaintByExampleModels:
    """The three networks with shapes only (`jax.ShapeDtypeStruct` leaves, nothing drawn or allocated) for
    `configs` {"unet": …, "vae": …, "image_encoder": …} (config objects or dicts): enough to lower and compile
    any program over them, for any devices (`pbe_jax.aot`)."""
    nets = {}
    for name, comp in COMPONENTS.items():
        config = configs[name]
        config = comp.config.from_dict(config, f"{name} config") if isinstance(config, dict) else config
        graphdef, flat = mapping.abstract_model(comp.model, config, policy)
        nets[name] = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
    return PaintByExampleModels(**nets, extra_configs=dict(extra_configs or {}))


def load_folder_abstract(path: str | Path, *, policy: Policy = Policy()) -> PaintByExampleModels:
    """`load_folder(path)` with shapes only: the folder's configs are read and its weights never."""
    path = storage.path(path)
    if not path.is_dir():
        raise _not_a_folder(path)
    configs = {name: read_config(path / name, name) for name in COMPONENTS}
    extras = {name: read_json(path / name / file) for name, file in PASSTHROUGH.items()
              if (path / name / file).is_file()}
    return abstract(configs, policy=policy, extra_configs=extras)


def save(models: PaintByExampleModels, folder: str | Path, *, format: str, dtype: str | None = None) -> Path:
    """Write a whole pipeline folder; "diffusers" opens with diffusers/transformers `from_pretrained`.
    `dtype`: storage type of the weights, as in `save_component`."""
    folder = storage.path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in models.components().items():
        save_component(module, folder / name, name, format=format, dtype=dtype)
    for name, cfg in models.extra_configs.items():
        (folder / name).mkdir(exist_ok=True)
        write_json(folder / name / PASSTHROUGH[name], cfg)
    index = {"_class_name": "PaintByExamplePipeline", "_diffusers_version": "0.42.0",
             **{name: list(c.library) for name, c in COMPONENTS.items()},
             "safety_checker": [None, None], "requires_safety_checker": False}
    if "scheduler" in models.extra_configs:
        index["scheduler"] = ["diffusers", models.extra_configs["scheduler"].get("_class_name", "PNDMScheduler")]
    if "feature_extractor" in models.extra_configs:
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    if format == "jax":
        write_json(folder / CHECKPOINT_MARKER, {"format": "pbe_jax", "version": __version__,
                                                 "components": list(COMPONENTS)})
    elif (folder / CHECKPOINT_MARKER).exists():
        (folder / CHECKPOINT_MARKER).unlink()
    write_json(folder / INDEX_FILE, index)  # last: its presence says the folder is complete
    return folder


def save_replacing(models: PaintByExampleModels, folder: str | Path, *, format: str,
                   dtype: str | None = None) -> Path:
    """`save` in place of `folder` (`storage.replace_folder`): an interrupted write never leaves a mix of old
    and new files that reads as complete."""
    return storage.replace_folder(folder, lambda target: save(models, target, format=format, dtype=dtype))

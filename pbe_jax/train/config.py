"""Training configuration: nested frozen dataclasses, named configs in `configs/`, `a.b=value` overrides."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

from pbe_jax.convert.source import ModelSource

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """model.lora: low-rank adaptation of the UNet (pbe_jax.lora). rank 0: off (model.trainable trains). With a
    rank, only the adapter trains: the whole base model is frozen (stored in model.frozen_dtype)."""

    rank: int = 0
    alpha: float = 0.0  # 0: the rank (scale alpha / rank = 1, which any reader of the file assumes)
    targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")  # or groups: attention, proj, ff, conv
    # also trained, whole, beside the adapter: "conv_in" (the UNet's 9-channel input convolution), "bottleneck"
    # (mapper, LayerNorm, projection, uncond vector); saved in the export's lora/ folder and merged into it
    train: tuple = ()

    def config(self):
        from pbe_jax.lora import LoRAConfig

        return LoRAConfig(rank=self.rank, alpha=self.alpha or None, targets=tuple(self.targets))


@dataclasses.dataclass(frozen=True)
class ModelConfig(ModelSource):
    """model: where the networks come from (`ModelSource`: init, folders and files, configs, dtype, attention)
    and what trains."""

    # What trains: module path prefixes. The paper's: UNet, mapper, LayerNorm, projection, uncond vector.
    trainable: tuple = ("unet", "image_encoder.mapper", "image_encoder.final_layer_norm", "image_encoder.proj_out",
                        "image_encoder.uncond_vector")
    frozen_dtype: str = "float32"  # storage of the frozen VAE and CLIP tower ("bfloat16" halves it)
    remat: bool = False  # recompute each UNet block in the backward pass
    lora: LoRASettings = LoRASettings()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "shards", "tfds", "folder", "synthetic" (docs/data.md)
    path: str = ""  # shards: a folder written by python -m pbe_jax.data.prepare (local, or a gcsfuse mount)
    name: str = "coco/2017"  # tfds: coco/2017 or open_images_v4
    split: str = "train"
    data_dir: str | None = None
    folder: str = ""  # folder: images + annotations
    annotations: str | None = None
    box_frame: str = "displayed"  # folder: boxes on the upright image as a viewer shows it, or "stored" pixels
    max_short_side: int = 1024  # folder: larger JPEGs decoded at a reduced scale (draft mode) and resized to it
    size: int = 10000  # synthetic: number of scenes
    scene_size: int = 0  # synthetic: side of the rendered scenes (0: image_size); pairs crop and resize them
    extra_colours: tuple[str, ...] = ()  # synthetic: colours added to the base world's (e.g. [pink]; docs/lora.md)
    image_size: int = 512
    reference_size: int = 224
    batch_size: int = 16  # global, over all devices and processes
    workers: int = 0  # grain worker processes per host


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 10000
    # The learning rate starts at warmup_start × lr and rises linearly to lr (the original's
    # LambdaLinearScheduler: f_start 1e-6, so its first step already moves the weights)
    warmup_start: float = 1e-6
    weight_decay: float = 0.01  # PyTorch AdamW's default, what the original trained with
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 0.0  # global-norm gradient clipping; 0 (the original: its trainer sets none) disables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    mode: str = "pbe"  # "pbe": Paint-by-Example training; "vae" / "tower": pretrain a small frozen network
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    steps: int = 100000
    seed: int = 0
    cond_drop: float = 0.2  # probability that the condition is replaced by the uncond vector
    # How many consecutive samples share one drop decision. The original draws one per forward pass, i.e. per
    # GPU's batch (4 in its config, configs/v1.yaml); 1 draws per sample.
    cond_drop_group: int = 4
    # The paper's augmentations, switchable for its ablations: the probability of an arbitrary-shape (Bezier)
    # mask instead of the extended box (0: box masks only), and the reference's augmentation (False: resize).
    bezier_mask_p: float = 0.5
    reference_augment: bool = True
    ema_decay: float = 0.0  # 0 disables EMA
    mesh_data: int = -1
    mesh_fsdp: int = 1
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: no sample grids during training
    sample_steps: int = 20
    export: bool = True  # write a diffusers folder at the end
    # Write each process's batch fingerprints (step, SHA-256 of its local batch) to batches/process_<i>.jsonl,
    # to check that a resumed run reads exactly what an uninterrupted one would.
    log_batches: bool = False


def load(name_or_path: str) -> TrainConfig:
    """A named config (`configs/<name>.py`) or a path to one; the file defines `get_config()`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
        raise FileNotFoundError(f"no config {name_or_path!r} (named configs: {', '.join(names)})")
    spec = importlib.util.spec_from_file_location(f"pbe_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _parse(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare string


def _words(value: str) -> tuple[str, ...]:
    """A list of bare words as a shell passes it unquoted, `[a, b]` or `a,b` or `a`, as a tuple of strings."""
    inner = value.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    return tuple(w.strip().strip("'\"") for w in inner.split(",") if w.strip())


def override(cfg, assignments: list[str]):
    """Apply `a.b=value` assignments (values as Python literals, else strings); unknown keys are errors, and so
    are values that do not fit their field's type (`steps=abc: steps takes an integer, not 'abc'`)."""
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        cfg = _set(cfg, key.split("."), value, item)
    return cfg


def _set(obj, parts: list[str], text: str, item: str):
    full = item.partition("=")[0]
    names = {f.name for f in dataclasses.fields(obj)}
    if parts[0] not in names:
        raise ValueError(f"unknown config key {full!r} ({type(obj).__name__} has: {', '.join(sorted(names))})")
    current = getattr(obj, parts[0])
    if len(parts) > 1:
        if isinstance(current, dict):
            if len(parts) > 2:
                raise ValueError(f"config key {full!r} goes deeper than a dict entry")
            new = {**current, parts[1]: _parse(text)}
        elif dataclasses.is_dataclass(current):
            new = _set(current, parts[1:], text, item)
        else:
            here = ".".join(full.split(".")[:len(full.split(".")) - len(parts) + 1])
            raise ValueError(f"config key {full!r} goes deeper than a setting: {here} is a value")
    else:
        new = _typed(typing.get_type_hints(type(obj))[parts[0]], current, text, item)
    return dataclasses.replace(obj, **{parts[0]: new})


def _typed(kind, current, text: str, item: str):
    """`text` as a value of the field type `kind` (whose current value is `current`), or a ValueError naming
    the key, the type and the value."""
    full = item.partition("=")[0]
    value = _parse(text)
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        kind = args[0] if len(args) == 1 else Any
    if optional and value is None:
        return None
    if dataclasses.is_dataclass(kind):
        keys = ", ".join(f"{full}.{f.name}" for f in dataclasses.fields(kind))
        raise ValueError(f"{item}: {full} is a group of settings, set one of them: {keys}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text.strip() in ("true", "false"):
            return text.strip() == "true"
        raise ValueError(f"{item}: {full} takes True or False, not {text!r}")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{item}: {full} takes an integer, not {text!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{item}: {full} takes a number, not {text!r}")
    if kind is str:
        return value if isinstance(value, str) else text  # `data.path=123` is the string "123"
    if kind is tuple or typing.get_origin(kind) is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        return _words(text)
    if kind is dict:
        return value  # a whole dict, as before
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, cls: type = TrainConfig, where: str = "config"):
    """The inverse of `to_dict` (e.g. the config saved with a checkpoint); unknown keys are errors, missing
    ones keep their defaults."""
    default = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)} ({cls.__name__} has: "
                         f"{', '.join(sorted(names))})")
    values = {}
    for name, value in d.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = from_dict(value, type(current), f"{where}.{name}")
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """"key: old → new" for every dotted key whose value differs between two `to_dict` forms (tuples and
    lists compare equal, as they do once saved as JSON)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out

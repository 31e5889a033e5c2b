"""Model configurations read from diffusers/transformers `config.json` files, with errors that name the key.

Each model's config is a frozen dataclass whose field names are the diffusers keys, so `to_dict()` is a
config.json that diffusers reads back. Options this port does not implement are refused, never ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration this port cannot build, with the file, the key and the value in the message."""


def per_block(value: Any, n: int, key: str) -> tuple:
    """An int-or-list diffusers option as one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{key} has {len(value)} entries but the model has {n} blocks")
        return tuple(value)
    return (value,) * n


def from_mapping(cls, d: Mapping[str, Any], source: str, *, unsupported: Mapping[str, Any] = {},
                 ignored: tuple[str, ...] = (), strict: bool = True):
    """Build dataclass `cls` from a config mapping.

    `unsupported` maps option → the only value this port implements (a differing value is an error);
    `ignored` are options that do not change the computation; with `strict`, any other unknown key is an
    error too, so a new diffusers option cannot change the model unnoticed.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    for key, supported in unsupported.items():
        value = d.get(key, supported)
        if value != supported and not (isinstance(supported, tuple) and value in supported):
            raise ConfigError(f"{source}: {key}={value!r} is not supported by this port "
                              f"(supported: {supported!r})")
    unknown = [k for k in d if not k.startswith("_") and k not in names and k not in unsupported
               and k not in ignored]
    if strict and unknown:
        raise ConfigError(f"{source}: unknown config keys {unknown}; this port does not know what they change")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the dataclass's own checks, which do not know the file
        raise ConfigError(f"{source}: {e}") from e


def to_dict(config, class_name: str) -> dict:
    d = {"_class_name": class_name}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        d[f.name] = list(v) if isinstance(v, tuple) else v
    return d

"""Weights in and out: diffusers folders ↔ Flax params, this project's checkpoint format, single files, and the
one builder of a model's networks (`build_models`). The names below load their module when first used, so that
`convert.source` (the training config's base) is importable without JAX."""
import importlib

_HOMES = {"COMPONENTS": "diffusers", "PaintByExampleModels": "diffusers", "abstract": "diffusers",
          "is_checkpoint": "diffusers", "load_component": "diffusers", "save": "diffusers",
          "save_component": "diffusers", "save_replacing": "diffusers", "convert": "formats", "load": "formats",
          "load_abstract": "formats", "WeightsError": "weights", "build_models": "build", "ModelSource": "source"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOMES)

"""Weights in and out: diffusers folders ↔ Flax params, and this project's checkpoint format."""
from pbe_jax.convert.diffusers import (COMPONENTS, PaintByExampleModels, convert, is_checkpoint, load,
                                       load_component, save, save_component, save_replacing)
from pbe_jax.convert.weights import WeightsError

__all__ = ["COMPONENTS", "PaintByExampleModels", "WeightsError", "convert", "is_checkpoint", "load",
           "load_component", "save", "save_component", "save_replacing"]

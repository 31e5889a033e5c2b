"""Weights in and out: diffusers folders ↔ Flax params, and this project's checkpoint format."""
from pbe_jax.convert.diffusers import (COMPONENTS, PaintByExampleModels, abstract, is_checkpoint, load_component, save,
                                       save_component, save_replacing)
from pbe_jax.convert.formats import convert, load, load_abstract
from pbe_jax.convert.weights import WeightsError

__all__ = ["COMPONENTS", "PaintByExampleModels", "WeightsError", "abstract", "convert", "load_abstract", "is_checkpoint", "load",
           "load_component", "save", "save_component", "save_replacing"]

"""CLIP image features as the CLIP score uses them: `image_embeds` of a CLIP vision tower with its visual
projection (transformers' `CLIPModel.get_image_features`, e.g. openai/clip-vit-base-patch32), unnormalised.

`load_image_features(folder)` reads a transformers `CLIPModel` folder (the text tower, its projection and
`logit_scale` are skipped) or a `CLIPVisionModelWithProjection` folder, safetensors or `.bin`. A tower without
`visual_projection.weight` (a plain `CLIPVisionModel`, a Paint-by-Example `image_encoder/`) is refused: its
pooled output lives in another space than the projected features CLIP scores are measured in.

`dtype` runs the model in float16 or bfloat16 (parameters cast and computation in that dtype, as the original
evaluation runs openai CLIP with `.half()`). `features.Extractor` runs it over many images, in float32 out.
"""
from __future__ import annotations

import jax.numpy as jnp

from pbe_jax import storage
from pbe_jax.convert import mapping
from pbe_jax.convert.diffusers import PARAMS_FILE, read_json
from pbe_jax.convert.init import TEXT_PARTS, TOWER_PREFIXES
from pbe_jax.convert.weights import WeightsError, find_weights, load_file
from pbe_jax.models import CLIPVisionConfig, CLIPVisionModelWithProjection, Policy
from pbe_jax.storage import PathLike

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PROJECTION = "visual_projection.weight"
# transformers' CLIPConfig / CLIPVisionConfig default when a config.json leaves projection_dim out.
DEFAULT_PROJECTION_DIM = 512


def _ignored(key: str) -> bool:
    """The parts of a CLIP checkpoint the image features do not use: the text side and position_ids buffers."""
    return key.startswith(TEXT_PARTS) or key.endswith("position_ids")


def _no_projection(folder, why: str) -> WeightsError:
    return WeightsError(f"{folder}: the visual projection is missing ({why}). CLIP image features need a "
                        f"transformers CLIPModel or CLIPVisionModelWithProjection folder")


def _state(path, tensors: dict) -> dict:
    state = {("vision_model." + k if k.startswith(TOWER_PREFIXES) else k): v for k, v in tensors.items()}
    if PROJECTION not in state:
        pbe = any(k.startswith(("mapper.", "model.vision_model.")) for k in state)
        kind = "a Paint-by-Example image encoder" if pbe else "a tower without projection, e.g. a CLIPVisionModel"
        raise _no_projection(path.parent, f"{path.name} has no {PROJECTION}; it looks like {kind}")
    return {k: v for k, v in state.items() if not _ignored(k)}


def load_image_features(folder: PathLike, *, dtype: str = "float32",
                        attention_backend: str = "auto") -> tuple[CLIPVisionModelWithProjection, dict | None]:
    """(model, the folder's preprocessor_config.json as a dict or None) from a transformers `CLIPModel` or
    `CLIPVisionModelWithProjection` folder. `dtype` ("float32", "bfloat16", "float16") is both the parameter
    and the compute dtype. Raises WeightsError (a ValueError) naming the folder when the projection is missing,
    and naming the file and key for weights that do not fit the config; ConfigError (a ValueError) for a
    missing or unreadable config.json."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    folder = storage.path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected a transformers CLIPModel or "
                                f"CLIPVisionModelWithProjection folder)")
    if (folder / "image_encoder").is_dir():
        raise _no_projection(folder, "a Paint-by-Example folder: its image_encoder/ is a CLIP tower without one")
    config_path = folder / "config.json"
    config = read_json(config_path)
    if "PaintByExampleImageEncoder" in config.get("architectures", []) or (folder / PARAMS_FILE).is_file():
        raise _no_projection(folder, "a Paint-by-Example image encoder, a CLIP tower without one")
    path = find_weights(folder)
    state = _state(path, load_file(path))
    cfg = CLIPVisionConfig.from_dict({"projection_dim": DEFAULT_PROJECTION_DIM, **config}, str(config_path))
    policy = Policy(dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], attention_backend=attention_backend)
    model = mapping.from_torch(CLIPVisionModelWithProjection, cfg, policy, state, str(path))
    fe = folder / "preprocessor_config.json"
    return model, (read_json(fe) if fe.is_file() else None)


__all__ = ["DTYPES", "load_image_features"]

"""Single-file checkpoints of the original code base (CompVis latent diffusion, as the Paint-by-Example release
`model.ckpt` and SD v1 `*.ckpt` / `*.safetensors` files lay it out): reading them, telling what they are,
choosing their EMA weights, and the conditioning part (CLIP tower + mapper + projection + uncond vector) in
diffusers' `PaintByExampleImageEncoder` names and back. The UNet / VAE key mapping lives in `ldm.py`.

The original's names (one flat dict, often under `state_dict`, sometimes twice):

    model.diffusion_model.*                        UNet (9 input channels for Paint by Example, 4 for SD v1)
    first_stage_model.*                            VAE
    cond_stage_model.transformer.vision_model.*    transformers CLIPVisionModel (ViT-L/14)
    cond_stage_model.mapper.resblocks.{i}.{ln_1, attn.c_qkv, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}.*
    cond_stage_model.final_ln.*, proj_out.*, learnable_vector (1, 1, 768: the unconditional token)
    model_ema.<name without "model." and without dots>   EMA copies (LitEma), plus model_ema.decay/num_updates
    betas, alphas_cumprod, …                       schedule buffers (not weights: ignored)
"""
from __future__ import annotations

import re

import numpy as np

from pbe_jax import storage
from pbe_jax.convert.diffusers import encoder_key
from pbe_jax.convert.weights import WeightsError, load_file, read_pickle
from pbe_jax.storage import Path

UNET = "model.diffusion_model."
CONV_IN = UNET + "input_blocks.0.0.weight"
EMA = "model_ema."
VISION = "cond_stage_model.transformer.vision_model."
TEXT = "cond_stage_model.transformer.text_model."
MAPPER = "cond_stage_model.mapper.resblocks."
FINAL_LN = "cond_stage_model.final_ln."
# The mapper's sub-layers (GLIDE's xf.Transformer) and their diffusers BasicTransformerBlock names. With one
# head, GLIDE's c_qkv output splits into q, k, v in this order (view(…, heads=1, 3·width), split on the last
# axis), so the split is three equal row blocks.
MAPPER_NAMES = {"ln_1": "norm1", "attn.c_proj": "attn1.to_out.0", "ln_2": "norm3", "mlp.c_fc": "ff.net.0.proj",
                "mlp.c_proj": "ff.net.2"}
QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file's header (an 8-byte length, then JSON)."""
    import json

    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n)) if 0 < n < 1 << 27 else {}
    return dict(header.get("__metadata__") or {})


def read_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(`read_state_dict(path)`, the file's string metadata): a safetensors header's `__metadata__`, or the
    string entries at the top level of a pickle (what `ldm_file.save_ldm` writes its configs into)."""
    path = storage.path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return load_file(path), _safetensors_metadata(path)
    return read_pickle(path)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a single-file checkpoint, keyed by the original's names. `.safetensors` is read without
    torch; anything else is a PyTorch pickle read with `torch.load(weights_only=True)` (Lightning's own
    bookkeeping objects beside the weights are unpickled as inert stand-ins; any other object is refused).
    A Lightning checkpoint's `state_dict` (nested once or twice) is unwrapped; other entries (epoch,
    optimizer states, …) are dropped."""
    return read_file(path)[0]


# ------------------------------------------------------------------------------------------------ detecting

def detect(sd: dict) -> str:
    """"pbe" (the Paint-by-Example release layout) or "sd1" (SD v1 text-to-image); any other latent-diffusion
    file is refused with a WeightsError that says what it looks like and which key shows it."""
    def first(pred):
        return next((k for k in sd if pred(k)), None)

    key = first(lambda k: k.startswith(("conditioner.embedders.", UNET + "label_emb.")))
    if key:
        raise WeightsError(f"unsupported: this looks like an SDXL checkpoint ({key}); Paint by Example and "
                           f"SD v1 files are supported")
    key = first(lambda k: k.startswith("cond_stage_model.model."))
    if key is None:
        key = first(lambda k: k.startswith(UNET) and k.endswith("attn2.to_k.weight")
                    and np.ndim(sd[k]) == 2 and np.shape(sd[k])[1] == 1024)
    if key:
        why = f"{key} {tuple(np.shape(sd[key]))}" if key.startswith(UNET) else key
        raise WeightsError(f"unsupported: this looks like an SD 2.x checkpoint ({why}: OpenCLIP text encoder / "
                           f"1024-d context); Paint by Example and SD v1 files are supported")
    if CONV_IN not in sd:
        shown = ", ".join(list(sd)[:5]) or "no keys"
        raise WeightsError(f"not a Stable Diffusion / Paint-by-Example checkpoint (no {CONV_IN}; it has "
                           f"{shown}{', …' if len(sd) > 5 else ''})")
    channels = np.shape(sd[CONV_IN])[1]
    vision = first(lambda k: k.startswith(VISION))
    text = first(lambda k: k.startswith("cond_stage_model.transformer.") and not k.startswith(VISION))
    if channels == 9 and text:
        raise WeightsError(f"unsupported: this looks like an SD v1 inpainting checkpoint ({CONV_IN} has 9 input "
                           f"channels and {text} is a text encoder); Paint by Example expects a CLIP image "
                           f"encoder ({VISION}…)")
    if channels == 9 and vision:
        return "pbe"
    if channels == 4 and text:
        return "sd1"
    raise WeightsError(f"not a Stable Diffusion / Paint-by-Example checkpoint ({CONV_IN} has {channels} input "
                       f"channels, with {'a text encoder' if text else 'an image encoder' if vision else 'no'} "
                       f"cond_stage_model; expected 9 with a CLIP image encoder, or 4 with a CLIP text encoder)")


# ---------------------------------------------------------------------------------------------------- EMA

class SelectedWeights(dict):
    """The state dict `select_ema` returns; `ema_used` says whether EMA copies replaced the plain weights."""

    ema_used: bool = False


def ema_name(key: str) -> str:
    """LitEma's buffer name for `model.<path>`: `model_ema.` + the path with its dots removed."""
    return EMA + key[len("model."):].replace(".", "")


def select_ema(sd: dict, ema: bool = True) -> SelectedWeights:
    """The weights without `model_ema.*`: with `ema` and EMA copies present, each `model.*` weight that has a
    copy is replaced by it (as the original's `ema_scope` does for sampling). `.ema_used` reports it."""
    out = SelectedWeights((k, v) for k, v in sd.items() if not k.startswith(EMA))
    if not ema:
        return out
    for key in out:
        if not key.startswith("model."):
            continue
        copy = sd.get(ema_name(key))
        if copy is None:
            continue
        if np.shape(copy) != np.shape(out[key]):
            raise WeightsError(f"{ema_name(key)} has shape {tuple(np.shape(copy))}, but {key} has "
                               f"{tuple(np.shape(out[key]))}")
        out[key] = copy
        out.ema_used = True
    return out


# ----------------------------------------------------------------------------------- the image encoder

def _vision_key(key: str) -> str | None:
    # diffusers' encoder names (released: model.vision_model.*; transformers 5 saves model.*) → the tower's path
    return encoder_key(key)[len("model."):] if key.startswith("model.") else None


def image_encoder_from_ldm(sd: dict) -> dict[str, np.ndarray]:
    """The conditioning part of an original checkpoint as diffusers' `PaintByExampleImageEncoder` state dict
    (`model.vision_model.*`, `mapper.blocks.*`, `final_layer_norm.*`, `proj_out.*`, `uncond_vector`)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(VISION):
            if not key.endswith("embeddings.position_ids"):  # a buffer of older transformers, not a weight
                out["model." + key[len("cond_stage_model.transformer."):]] = value
        elif key.startswith(MAPPER):
            m = re.fullmatch(r"(\d+)\.(.+)\.(weight|bias)", key[len(MAPPER):])
            if m is None or (m[2] not in MAPPER_NAMES and m[2] != "attn.c_qkv"):
                raise WeightsError(f"{key}: not a parameter of the Paint-by-Example mapper")
            block, name, kind = m.groups()
            if name == "attn.c_qkv":
                if np.shape(value)[0] % 3:
                    raise WeightsError(f"{key}: {np.shape(value)[0]} rows, not q, k and v of equal size")
                for part, q in zip(np.split(np.asarray(value), 3, axis=0), QKV):
                    out[f"mapper.blocks.{block}.{q}.{kind}"] = part
            else:
                out[f"mapper.blocks.{block}.{MAPPER_NAMES[name]}.{kind}"] = value
        elif key.startswith(FINAL_LN):
            out["final_layer_norm." + key[len(FINAL_LN):]] = value
        elif key in ("proj_out.weight", "proj_out.bias"):
            out[key] = value
        elif key == "learnable_vector":
            out["uncond_vector"] = value
    needed = ["model.vision_model.embeddings.patch_embedding.weight", "mapper.blocks.0.attn1.to_q.weight",
              "final_layer_norm.weight", "proj_out.weight", "uncond_vector"]
    original = [VISION + "embeddings.patch_embedding.weight", MAPPER + "0.attn.c_qkv.weight",
                FINAL_LN + "weight", "proj_out.weight", "learnable_vector"]
    missing = [o for n, o in zip(needed, original) if n not in out]
    if missing:
        raise WeightsError(f"no Paint-by-Example image encoder in these weights (missing {', '.join(missing)})")
    return out


def image_encoder_to_ldm(state: dict) -> dict[str, np.ndarray]:
    """The inverse of `image_encoder_from_ldm`: a diffusers `PaintByExampleImageEncoder` state dict (or this
    project's `mapping.to_torch` of one) in the original checkpoint's names, q/k/v merged into c_qkv."""
    out, qkv = {}, {}
    back = {v: k for k, v in MAPPER_NAMES.items()}
    for key, value in state.items():
        tower = _vision_key(key)
        if tower is not None:
            if not tower.endswith("embeddings.position_ids"):
                out["cond_stage_model.transformer." + tower] = value
            continue
        m = re.fullmatch(r"mapper\.blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m and m[2] in QKV:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m and m[2] in back:
            out[f"{MAPPER}{m[1]}.{back[m[2]]}.{m[3]}"] = value
        elif key.startswith("final_layer_norm."):
            out[FINAL_LN + key[len("final_layer_norm."):]] = value
        elif key in ("proj_out.weight", "proj_out.bias"):
            out[key] = value
        elif key == "uncond_vector":
            out["learnable_vector"] = value
        else:
            raise WeightsError(f"{key}: not a parameter of diffusers' PaintByExampleImageEncoder")
    for (block, kind), parts in sorted(qkv.items()):
        if len(parts) != 3:
            missing = [f"mapper.blocks.{block}.{q}.{kind}" for q in QKV if q not in parts]
            raise WeightsError(f"{', '.join(missing)} missing (q, k and v are merged into one c_qkv)")
        out[f"{MAPPER}{block}.attn.c_qkv.{kind}"] = np.concatenate([np.asarray(parts[q]) for q in QKV], axis=0)
    return out


def image_encoder_config_from_ldm(sd: dict, *, num_attention_heads: int | None = None, **overrides) -> dict:
    """A CLIP vision config for the encoder in `sd` (original or diffusers names): CLIP ViT-L/14's, with
    every size the tensors show taken from them. The head count cannot be read off the tensors: 16 (ViT-L/14)
    unless `num_attention_heads` is given; other config entries (e.g. `hidden_act`) through `overrides`."""
    from pbe_jax.models import CLIPVisionConfig, ConfigError

    if "uncond_vector" in sd:  # diffusers' names
        sd = image_encoder_to_ldm(sd)

    def shape(key):
        if key not in sd:
            raise WeightsError(f"no {key}: not a Paint-by-Example image encoder")
        return tuple(np.shape(sd[key]))

    hidden, channels, patch, _ = shape(VISION + "embeddings.patch_embedding.weight")
    positions = shape(VISION + "embeddings.position_embedding.weight")[0]
    side = int(round((positions - 1) ** 0.5))
    if side * side != positions - 1:
        raise WeightsError(f"{VISION}embeddings.position_embedding.weight: {positions} positions is not a "
                           f"square grid of patches plus the class token")
    layers = 1 + max((int(m[1]) for k in sd if (m := re.match(re.escape(VISION) + r"encoder\.layers\.(\d+)\.", k))),
                     default=-1)
    blocks = 1 + max((int(m[1]) for k in sd if (m := re.match(re.escape(MAPPER) + r"(\d+)\.", k))), default=-1)
    if (layers + 1) // 5 != blocks:
        raise WeightsError(f"{blocks} mapper blocks beside {layers} CLIP layers: diffusers' (and this port's) "
                           f"encoder has (layers + 1) // 5 = {(layers + 1) // 5} mapper blocks")
    if num_attention_heads is None:
        num_attention_heads = 16
        if hidden % 16:
            raise WeightsError(f"hidden size {hidden} is not divisible by ViT-L/14's 16 heads: the head count "
                               f"cannot be read from the weights; give num_attention_heads")
    cfg = dict(hidden_size=hidden, intermediate_size=shape(VISION + "encoder.layers.0.mlp.fc1.weight")[0],
               num_attention_heads=num_attention_heads, num_hidden_layers=layers, image_size=side * patch,
               patch_size=patch, num_channels=channels, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               projection_dim=shape("proj_out.weight")[0])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"unknown CLIP vision config entries: {', '.join(sorted(unknown))}")
    try:
        return CLIPVisionConfig(**{**cfg, **overrides}).to_dict()
    except ConfigError as e:
        raise WeightsError(f"the image encoder's config: {e}") from e

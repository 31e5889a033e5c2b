"""Where training starts: Stable Diffusion v1.x plus a CLIP vision tower (the paper's initialisation:
`conv_in` widened 4 → 9 with zeros, bottleneck and uncond vector fresh), with weights or its configs alone, or
random weights for small configurations (`convert.build_models` picks; fine-tuning a Paint-by-Example folder is
`convert.load`). Random weights are drawn with numpy on the
host, with PyTorch's default schemes, so no jitted initialisation ever runs."""
from __future__ import annotations

import numpy as np
from flax import nnx

from pbe_jax import storage
from pbe_jax.convert import ldm_file, mapping
from pbe_jax.convert.diffusers import COMPONENTS, PaintByExampleModels, from_state_dict, load_component, read_json
from pbe_jax.convert.weights import WeightsError, find_weights, load_file
from pbe_jax.models import CLIPVisionConfig, PaintByExampleImageEncoder, Policy, UNetConfig, VAEConfig
from pbe_jax.storage import Path

BOTTLENECK = ("mapper", "final_layer_norm", "proj_out", "uncond_vector")


def random_params(cls: type, config, policy: Policy, seed: int = 0,
                  only: tuple[str, ...] | None = None) -> dict[mapping.Path, np.ndarray]:
    """PyTorch-default random parameters for `cls(config)` (flax layout): Linear/Conv kernels and biases
    uniform in ±1/√fan_in, norms 1 and 0, embeddings and learned vectors N(0, 1) (N(0, 0.02) for
    position embeddings). `only` restricts to paths under these top-level names."""
    rng = np.random.default_rng(seed)
    flat = mapping.abstract_model(cls, config, policy)[1]
    kernels = {p[:-1]: v.get_value().shape for p, v in flat.items() if p[-1] == "kernel"}
    out = {}
    for path, var in flat.items():
        if only is not None and path[0] not in only:
            continue
        shape, leaf = var.get_value().shape, path[-1]
        if leaf in ("kernel", "bias") and path[:-1] in kernels:
            k = kernels[path[:-1]]
            bound = 1 / np.sqrt(np.prod(k[:-1]))  # fan_in: every axis but the output's
            out[path] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif leaf == "scale":
            out[path] = np.ones(shape, np.float32)
        elif leaf == "bias":
            out[path] = np.zeros(shape, np.float32)
        else:
            std = 0.02 if "position_embedding" in path else 1.0
            out[path] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def random_module(cls: type, config, policy: Policy = Policy(), seed: int = 0) -> nnx.Module:
    return mapping.materialize(cls, config, policy, random_params(cls, config, policy, seed), f"random {cls.__name__}")


def from_scratch(unet: UNetConfig, vae: VAEConfig, image_encoder: CLIPVisionConfig, *, policy: Policy = Policy(),
                 seed: int = 0, extra_configs: dict | None = None) -> PaintByExampleModels:
    """All three networks random (for small configurations trained end to end)."""
    nets = {name: random_module(COMPONENTS[name].model, cfg, policy, seed + i)
            for i, (name, cfg) in enumerate((("unet", unet), ("vae", vae), ("image_encoder", image_encoder)))}
    return PaintByExampleModels(**nets, extra_configs=dict(extra_configs or {}))


# A transformers CLIP checkpoint's parts: the vision tower's modules (transformers 5 saves a CLIPVisionModel
# without the vision_model. prefix) and the text side of a full CLIPModel.
TOWER_PREFIXES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
TEXT_PARTS = ("text_model.", "text_projection.", "logit_scale")


def vision_key(key: str) -> str | None:
    """A CLIP checkpoint key as the image encoder names it, or None for the parts it does not use (the text
    tower and the projections of a full CLIPModel)."""
    if key.startswith("vision_model."):
        return "model." + key
    if key.startswith(TOWER_PREFIXES):
        return "model.vision_model." + key
    if key.startswith(TEXT_PARTS + ("visual_projection.",)):
        return None
    return key  # anything else is reported as unexpected


def _sd_parts(sd: Path, policy: Policy, ema: bool) -> tuple[dict, dict, str, nnx.Module, dict]:
    """(UNet config, UNet state dict in diffusers' names, where it came from, VAE, extra configs) of an SD v1.x
    diffusers folder or single file."""
    if ldm_file.is_single_file(sd):
        unet_cfg, state, vae, scheduler = ldm_file.load_sd_v1(sd, policy=policy, ema=ema)
        return unet_cfg, state, str(sd), vae, {"scheduler": scheduler}
    unet_cfg = read_json(sd / "unet" / "config.json")
    if unet_cfg.get("in_channels") != 4:
        raise ValueError(f"{sd / 'unet' / 'config.json'}: in_channels is {unet_cfg.get('in_channels')}, "
                         f"an SD v1.x text-to-image UNet has 4")
    path = find_weights(sd / "unet")
    return unet_cfg, load_file(path), str(path), load_component(sd / "vae", "vae", policy=policy), _scheduler(sd)


def from_stable_diffusion(sd: str | Path, clip_folder: str | Path, *, policy: Policy = Policy(),
                          seed: int = 0, ema: bool = True) -> PaintByExampleModels:
    """The paper's initialisation from SD v1.x — a diffusers folder (unet/, vae/, scheduler/) or a single
    file (`sd-v1-4.ckpt`, `v1-5-pruned-emaonly.safetensors`; its EMA weights when it has them and `ema`) — and
    a CLIP vision folder (e.g. openai/clip-vit-large-patch14: a CLIPModel or CLIPVisionModel checkpoint)."""
    sd, clip_folder = storage.path(sd), storage.path(clip_folder)
    unet_cfg, state, path, vae, extras = _sd_parts(sd, policy, ema)
    w = state["conv_in.weight"]
    # The 5 new input channels (masked-image latents, mask) start at zero: the UNet begins as SD's.
    state["conv_in.weight"] = np.concatenate([w, np.zeros((w.shape[0], 5) + w.shape[2:], w.dtype)], axis=1)
    unet = from_state_dict("unet", {**unet_cfg, "in_channels": 9}, state, policy=policy, source=path)

    clip_cfg = _clip_config(clip_folder, unet.config.cross_attention_dim[0])
    clip_path = find_weights(clip_folder)
    tower = clip_vision_state(clip_path)
    fresh = random_params(PaintByExampleImageEncoder, clip_cfg, policy, seed, only=BOTTLENECK)
    encoder = mapping.from_torch(PaintByExampleImageEncoder, clip_cfg, policy, tower, str(clip_path), given=fresh)
    return PaintByExampleModels(unet, vae, encoder, {**extras, **_feature_extractor(clip_folder, sd)})


def stable_diffusion_configs(sd: str | Path, clip_folder: str | Path) -> tuple[dict, dict]:
    """({"unet", "vae", "image_encoder"} configs, extra configs) of what `from_stable_diffusion` builds, read
    from the config.json files of the folders (of a single file: its tensors' shapes), no weight loaded."""
    sd, clip_folder = storage.path(sd), storage.path(clip_folder)
    if ldm_file.is_single_file(sd):
        configs, extras = ldm_file.read_configs(sd, "sd1")
    else:
        configs, extras = {name: read_json(sd / name / "config.json") for name in ("unet", "vae")}, _scheduler(sd)
    unet = UNetConfig.from_dict({**configs["unet"], "in_channels": 9}, "unet config")
    configs.update(unet=unet, image_encoder=_clip_config(clip_folder, unet.cross_attention_dim[0]))
    return configs, {**extras, **_feature_extractor(clip_folder, sd)}


def _scheduler(sd: Path) -> dict:
    """{"scheduler": …} from an SD folder's scheduler config; {} without one."""
    path = sd / "scheduler" / "scheduler_config.json"
    return {"scheduler": read_json(path)} if path.is_file() else {}


def _clip_config(clip_folder: Path, projection_dim: int) -> CLIPVisionConfig:
    """The image encoder's config: the CLIP folder's, projecting to the UNet's cross-attention width."""
    path = clip_folder / "config.json"
    return CLIPVisionConfig.from_dict({**read_json(path), "projection_dim": projection_dim}, str(path))


def _feature_extractor(clip_folder: Path, sd: Path) -> dict:
    """{"feature_extractor": …} from the CLIP folder's preprocessor config, else SD's; {} without either."""
    for fe in (clip_folder / "preprocessor_config.json", sd / "feature_extractor" / "preprocessor_config.json"):
        if fe.is_file():
            return {"feature_extractor": read_json(fe)}
    return {}


def clip_vision_state(path: str | Path) -> dict:
    """The vision tower's weights from a transformers CLIP(Vision)Model weights file, named as the image
    encoder's (model.vision_model.…); the text tower and the position_ids buffer left out."""
    state = {}
    for key, value in load_file(path).items():
        name = vision_key(key)
        if name is not None and not name.endswith("position_ids"):
            state[name] = value
    return state


__all__ = ["BOTTLENECK", "WeightsError", "clip_vision_state", "from_scratch", "from_stable_diffusion",
           "random_module", "random_params", "stable_diffusion_configs"]

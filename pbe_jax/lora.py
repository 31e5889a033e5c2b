"""Low-rank adaptation (Hu et al. 2021) of the UNet, in the layout peft and diffusers use.

An adapter is, for each adapted layer (named by its PyTorch module path, e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), two factors in peft's layout:
`A` (rank, in) and `B` (out, rank) for a linear layer; `A` (rank, in, kh, kw) and `B` (out, rank, 1, 1) for a
convolution. The layer computes with W + (alpha / rank) · scale · B·A. The adapter is applied by merging that
product into the weight, so the UNet itself is unchanged: with B = 0 (how an adapter starts) the merged weights
are the base weights exactly, and sampling with a merged adapter costs nothing extra.

Files: `save_peft` writes the UNet adapter as diffusers writes SD LoRAs (`pytorch_lora_weights.safetensors`,
`unet.`-prefixed peft keys `….lora_A.weight` / `….lora_B.weight`, the rank, alpha and targets in the
`lora_adapter_metadata` entry of the safetensors header), which `UNet2DConditionModel.load_lora_adapter(…,
prefix="unet")` reads; `load_peft` reads such files, from here or elsewhere.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import storage
from pbe_jax.convert import mapping
from pbe_jax.convert.weights import save_safetensors

# What `model.lora.targets` may name: module-name suffixes inside the UNet. The attention projections of every
# transformer block are the default (as in diffusers' SD LoRA training scripts).
TARGET_GROUPS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "proj": ("proj_in", "proj_out"),  # the transformer blocks' input and output projections
    "ff": ("ff.net.0.proj", "ff.net.2"),  # their feed-forward layers
    "conv": ("conv1", "conv2"),  # the ResNet blocks' 3×3 convolutions
}
DEFAULT_TARGETS = TARGET_GROUPS["attention"]
# Parts of the base model that may train beside the adapter (`model.lora.train`), saved whole beside it.
PARTS = {"conv_in": ("unet.conv_in",),
         "bottleneck": ("image_encoder.mapper", "image_encoder.final_layer_norm", "image_encoder.proj_out",
                        "image_encoder.uncond_vector")}
PARTS_FILE = "pbe_trained_parts.safetensors"  # beside FILE_NAME: component-prefixed PyTorch names
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
FILE_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "unet"


class LoRAError(ValueError):
    """An adapter that does not fit the model, or a file that is not a UNet LoRA; the message names it."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """`rank` 0 turns LoRA off. `alpha` defaults to the rank (scale 1). `targets`: module-name suffixes
    (`to_q`, `ff.net.2`, …) or group names from TARGET_GROUPS (`attention`, `proj`, `ff`, `conv`)."""

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def suffixes(self) -> tuple[str, ...]:
        out = []
        for t in self.targets:
            out += TARGET_GROUPS.get(t, (t,))
        return tuple(dict.fromkeys(out))


Adapter = dict[str, dict[str, Any]]  # module name -> {"A": …, "B": …}


def _module_name(path: tuple) -> str:
    return ".".join(str(p) for p in path[:-1])


def target_layers(unet_params: Mapping[tuple, Any], cfg: LoRAConfig) -> dict[str, tuple]:
    """{module name: its kernel's path} for every UNet layer `cfg.targets` names (linear or convolution)."""
    suffixes = cfg.suffixes()
    found = {}
    for path, value in unet_params.items():
        if path[-1] != "kernel" or len(value.shape) not in (2, 4):
            continue
        name = _module_name(path)
        if any(name == s or name.endswith("." + s) for s in suffixes):
            found[name] = path
    unmatched = [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in found)]
    if unmatched:
        raise LoRAError(f"model.lora.targets: {', '.join(unmatched)} names no layer of this UNet (groups: "
                        f"{', '.join(TARGET_GROUPS)}; or a module-name suffix such as to_q or ff.net.2)")
    return found


def _in_out(kernel_shape: tuple) -> tuple[int, int, tuple]:
    """(in, out, spatial) of a flax kernel: (in, out) for a linear layer, (kh, kw, in, out) for a convolution."""
    if len(kernel_shape) == 2:
        return kernel_shape[0], kernel_shape[1], ()
    return kernel_shape[2], kernel_shape[3], tuple(kernel_shape[:2])


def init(unet_params: Mapping[tuple, Any], cfg: LoRAConfig, seed: int = 0) -> Adapter:
    """A fresh adapter as peft draws one: A from kaiming_uniform(a=√5), i.e. U(±1/√fan_in), B zeros; so the
    adapted model computes exactly the base model until B moves. numpy, on the host, float32. The UNet's
    parameters are only read for their shapes (arrays or jax.ShapeDtypeStruct)."""
    if cfg.rank < 1:
        raise LoRAError(f"model.lora.rank must be at least 1 to adapt, not {cfg.rank}")
    rng = np.random.default_rng(seed)
    out = {}
    for name, path in sorted(target_layers(unet_params, cfg).items()):
        fan_in_ch, out_ch, spatial = _in_out(tuple(unet_params[path].shape))
        fan_in = fan_in_ch * math.prod(spatial)
        bound = 1.0 / math.sqrt(fan_in)
        a = rng.uniform(-bound, bound, (cfg.rank, fan_in_ch, *spatial)).astype(np.float32)
        b = np.zeros((out_ch, cfg.rank, *((1, 1) if spatial else ())), np.float32)
        out[name] = {"A": a, "B": b}
    return out


def delta(a, b):
    """B·A in PyTorch's weight layout: (out, in) for linear factors, (out, in, kh, kw) for convolution ones
    (numpy or jax arrays alike)."""
    if a.ndim == 2:
        return b @ a
    return (b[:, :, 0, 0] @ a.reshape(a.shape[0], -1)).reshape(b.shape[0], *a.shape[1:])


def merged(path: tuple, w, a, b, scale: float):
    """One kernel W (flax layout, at `path`) with its factors merged: W + scale · B·A, computed in float32 and
    stored back in W's dtype. The one formula of both merges: on the host (`merge`, `apply`) and inside the
    train step's jit (`merge_state`)."""
    d = mapping.to_flax_layout(path, delta(a.astype(np.float32), b.astype(np.float32)))
    return (w.astype(np.float32) + scale * d).astype(w.dtype)


def merge(unet_params: Mapping[tuple, Any], adapter: Adapter, scale: float) -> dict[tuple, Any]:
    """The UNet's parameters (flax layout, keyed by path; numpy) with each adapted kernel merged (`merged`),
    after `check`; `scale`: alpha / rank, times any extra strength."""
    check(unet_params, adapter)
    by_name = {_module_name(p): p for p in unet_params if p[-1] == "kernel"}
    out = dict(unet_params)
    for name, f in adapter.items():
        path = by_name[name]
        out[path] = merged(path, unet_params[path], f["A"], f["B"], scale)
    return out


def check(unet_params: Mapping[tuple, Any], adapter: Adapter) -> int:
    """The adapter's rank, after checking that every layer it names exists in the UNet and that its factors'
    shapes fit that layer and one another; LoRAError naming the layer otherwise."""
    by_name = {_module_name(p): p for p in unet_params if p[-1] == "kernel"}
    ranks = set()
    for name, f in adapter.items():
        path = by_name.get(name)
        if path is None:
            raise LoRAError(f"{name}: no such layer in this UNet")
        fan_in, out_ch, spatial = _in_out(np.shape(unet_params[path]))
        rank = f["A"].shape[0]
        want_a, want_b = (rank, fan_in, *spatial), (out_ch, rank, *((1, 1) if spatial else ()))
        if tuple(f["A"].shape) != want_a or tuple(f["B"].shape) != want_b:
            raise LoRAError(f"{name}: lora_A {tuple(f['A'].shape)} and lora_B {tuple(f['B'].shape)} do not fit the "
                            f"layer (weight {mapping.torch_shape(path, np.shape(unet_params[path]))}): expected "
                            f"lora_A {want_a} and lora_B {want_b}")
        ranks.add(rank)
    if len(ranks) > 1:
        raise LoRAError(f"the adapter mixes ranks {sorted(ranks)}; one rank per adapter is supported")
    return ranks.pop() if ranks else 0


def apply(unet, adapter: Adapter, scale: float) -> None:
    """Merge `adapter` into the UNet module's weights in place, on the host (`merge`); `scale` = alpha / rank ×
    any strength."""
    import jax

    flat = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
    kernels = {p: np.asarray(jax.device_get(v.get_value())) for p, v in flat.items() if p[-1] == "kernel"}
    new = merge(kernels, adapter, scale)
    nnx.update(unet, nnx.from_flat_state([(p, flat[p].replace(jax.device_put(new[p])))
                                          for p in kernels if _module_name(p) in adapter]))


class Factors(nnx.Module):
    """An adapter as parameters of a module (`factors[name]["A" | "B"]`), so that the trainer's state, optimiser,
    EMA, sharding and checkpoints treat it as any other trainable part."""

    def __init__(self, adapter: Adapter):
        self.factors = nnx.Dict({name: nnx.Dict({k: nnx.Param(jnp.asarray(f[k])) for k in ("A", "B")})
                                 for name, f in sorted(adapter.items())})

    def adapter(self) -> Adapter:
        return {name: {k: f[k].get_value() for k in ("A", "B")} for name, f in self.factors.items()}


def merge_state(frozen, params, scale: float):
    """The trainer's frozen state (an nnx.State holding unet.…) with the adapter in `params` (lora.factors.…)
    merged into the UNet's kernels: W + scale · B·A, the product in float32, stored back in W's dtype. Functional
    (new variables, nothing mutated), so the train step calls it inside its jit and its gradient."""
    factors = {}
    for path, v in nnx.to_flat_state(params):
        if path[:2] == ("lora", "factors"):
            factors.setdefault(path[2], {})[path[3]] = v.get_value()
    out = []
    for path, v in nnx.to_flat_state(frozen):
        name = _module_name(path[1:]) if path[0] == "unet" and path[-1] == "kernel" else None
        if name in factors:
            v = v.replace(merged(path, v.get_value(), factors[name]["A"], factors[name]["B"], scale))
        out.append((path, v))
    return nnx.from_flat_state(out)


# ---- files ----------------------------------------------------------------------------------------------

def save_peft(adapter: Adapter, cfg: LoRAConfig, path: storage.PathLike) -> storage.Path:
    """The adapter as diffusers saves an SD UNet LoRA (see the module's docstring); `path` a file or a folder
    (which gets FILE_NAME). float32."""
    path = storage.path(path)
    if path.suffix != ".safetensors":
        path = path / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, f in sorted(adapter.items()):
        tensors[f"{PREFIX}.{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(f["A"], np.float32))
        tensors[f"{PREFIX}.{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(f["B"], np.float32))
    rank = check_ranks(adapter)
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(adapter), "lora_dropout": 0.0,
              "bias": "none", "init_lora_weights": True, "use_dora": False}
    metadata = {METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, sort_keys=True),
                "format": "pt"}
    save_safetensors(tensors, path, metadata)
    return path


def part_prefixes(parts: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise LoRAError(f"model.lora.train: {', '.join(unknown)} is not a part that trains beside an adapter "
                        f"(choose from {', '.join(PARTS)})")
    return tuple(prefix for p in parts for prefix in PARTS[p])


def save_parts(models, parts: tuple[str, ...], folder: storage.PathLike) -> storage.Path | None:
    """The parts that trained beside the adapter (`model.lora.train`), whole, as `folder`/PARTS_FILE with
    component-prefixed PyTorch names (unet.conv_in.weight, image_encoder.mapper.…); None when there are none."""
    prefixes = part_prefixes(parts)
    if not prefixes:
        return None
    tensors = {}
    for component, module in models.components().items():
        for path, value in mapping.module_params(module).items():
            dotted = f"{component}.{mapping.flax_name(path)}"
            if any(dotted == p or dotted.startswith(p + ".") for p in prefixes):
                tensors[f"{component}.{mapping.torch_name(path)}"] = np.ascontiguousarray(
                    mapping.to_torch_layout(path, value))
    out = storage.path(folder) / PARTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out, {"format": "pt", "parts": ",".join(parts)})
    return out


def load_parts(models, path: storage.PathLike) -> list[str]:
    """Put the parts saved by `save_parts` into `models` (in place); returns their names. LoRAError naming the
    tensor when one does not fit."""
    import jax

    tensors, _ = _read(storage.path(path))
    names = []
    for component, module in models.components().items():
        flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
        by_torch = {mapping.torch_name(p): p for p in flat}
        updates = []
        for key, value in tensors.items():
            if not key.startswith(component + "."):
                continue
            p = by_torch.get(key.removeprefix(component + "."))
            if p is None:
                raise LoRAError(f"{path}: {key} names no parameter of this model")
            new = mapping.to_flax_layout(p, value)
            old = flat[p].get_value()
            if tuple(new.shape) != tuple(old.shape):
                raise LoRAError(f"{path}: {key} is {tuple(value.shape)}, the model's "
                                f"{mapping.torch_shape(p, old.shape)}")
            updates.append((p, flat[p].replace(jax.device_put(np.asarray(new).astype(old.dtype)))))
            names.append(key)
        if updates:
            nnx.update(module, nnx.from_flat_state(updates))
    unknown = sorted(k for k in tensors if k.split(".")[0] not in models.components())
    if unknown:
        raise LoRAError(f"{path}: {unknown[0]} is no part of a Paint-by-Example model")
    return sorted(names)


def check_ranks(adapter: Adapter) -> int:
    ranks = {f["A"].shape[0] for f in adapter.values()}
    if len(ranks) != 1:
        raise LoRAError(f"an adapter needs one rank, this one has {sorted(ranks) or 'none'}")
    return ranks.pop()


def load_peft(path: storage.PathLike) -> tuple[Adapter, LoRAConfig, list[str]]:
    """(adapter, its config, the keys that are not the UNet's LoRA factors: reported, never silently used) from
    a diffusers/peft LoRA file (or a folder holding FILE_NAME). alpha comes from the file's metadata, else
    from per-layer `….alpha` entries (kohya-style), else it equals the rank, as diffusers assumes."""
    path = storage.path(path)
    if path.is_dir():
        path = path / FILE_NAME
    tensors, header = _read(path)
    factors: dict[str, dict[str, np.ndarray]] = {}
    alphas, other = {}, []
    for key, value in tensors.items():
        name, _, rest = key.removeprefix(f"{PREFIX}.").rpartition(".lora_")
        if key.startswith(f"{PREFIX}.") and name and rest in ("A.weight", "B.weight"):
            factors.setdefault(name, {})[rest[0]] = np.asarray(value, np.float32)
        elif key.startswith(f"{PREFIX}.") and key.endswith(".alpha") and np.size(value) == 1:
            alphas[key.removeprefix(f"{PREFIX}.").removesuffix(".alpha")] = float(np.asarray(value).reshape(()))
        else:
            other.append(key)
    if not factors:
        raise LoRAError(f"{path}: no UNet LoRA factors (keys like unet.….to_q.lora_A.weight); its keys start with "
                        f"{', '.join(sorted({k.split('.')[0] for k in tensors})) or 'nothing'}")
    incomplete = sorted(n for n, f in factors.items() if set(f) != {"A", "B"})
    if incomplete:
        raise LoRAError(f"{path}: {incomplete[0]} has only lora_{''.join(factors[incomplete[0]])}"
                        + (f" (and {len(incomplete) - 1} more layers)" if len(incomplete) > 1 else ""))
    rank = check_ranks(factors)
    meta = json.loads(header.get(METADATA_KEY, "{}") or "{}")
    alpha = meta.get(f"{PREFIX}.lora_alpha")
    if alpha is None and alphas:
        values = set(alphas.values())
        if len(values) > 1:
            raise LoRAError(f"{path}: per-layer alphas differ ({sorted(values)}); one alpha per adapter is supported")
        alpha = values.pop()
    cfg = LoRAConfig(rank=rank, alpha=float(alpha) if alpha is not None else None,
                     targets=tuple(sorted(factors)))
    return factors, cfg, sorted(other)


def _read(path: storage.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the header's metadata of a safetensors file (local or in a bucket)."""
    import struct

    import safetensors.numpy

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    data = path.read_bytes()  # an adapter is small
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length]).get("__metadata__") or {}
        tensors = safetensors.numpy.load(data)
    except (struct.error, ValueError, UnicodeDecodeError, safetensors.SafetensorError) as e:
        raise LoRAError(f"{path}: not a safetensors LoRA file ({e})") from None
    return tensors, header

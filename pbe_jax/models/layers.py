"""Layers shared by the UNet and the VAE: the numeric policy, parameter factories with PyTorch's
conventions (padding, norm variance), activations, ResNet blocks and resampling.

Images are NHWC. Attribute names mirror the diffusers module paths so that conversion is a generic walk.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Policy:
    """Numerics shared by every layer of a model: compute dtype, parameter dtype, attention backend."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_backend: str = "auto"


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") of the devices the program being traced is compiled for: those of the
    ambient mesh (`jax.sharding.use_abstract_mesh`, which the train step and the pipeline set), else this
    process's default backend. A TPU program compiled from a CPU host (`pbe_jax.aot`) is a TPU program: its
    kernels and their modes follow the target, never the host."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def store_kernels_in_compute_dtype(*nets: nnx.Module) -> None:
    """Keep each Linear's and Conv's kernel in the layer's compute dtype where that is half precision. Every use
    casts the kernel to that dtype anyway (flax promotes it to the layer's dtype), so the results are the same
    bit for bit; what changes is what the device holds and does: for SD-1.4 sampled in bf16, 2.0 GiB of
    float32 kernels less, and no cast of a kernel inside the sampler's loop (the GPU compiler left 114 of them
    in each step). Biases, norms and embeddings stay float32. Works on loaded and on shape-only networks; the
    loaded kernels of one dtype are cast by one compiled program (not one per kernel shape)."""
    todo: dict[Any, list] = {}
    for net in nets:
        for _, module in nnx.iter_graph(net):
            if not isinstance(module, (nnx.Linear, nnx.Conv)) or module.dtype is None:
                continue
            dtype = jnp.dtype(module.dtype)
            kernel = module.kernel.get_value()
            if dtype not in (jnp.bfloat16, jnp.float16) or kernel.dtype == dtype:
                continue
            if isinstance(kernel, jax.ShapeDtypeStruct):
                module.kernel.set_value(jax.ShapeDtypeStruct(kernel.shape, dtype, sharding=kernel.sharding))
            else:
                todo.setdefault(dtype, []).append(module)
    for dtype, modules in todo.items():
        for module, kernel in zip(modules, _cast_all([m.kernel.get_value() for m in modules], dtype)):
            module.kernel.set_value(kernel)


@jax.jit(static_argnums=1)
def _cast_all(arrays: list, dtype) -> list:
    """`arrays` cast to `dtype`, in one program (compiled once per set of shapes, not per call or per shape)."""
    return [a.astype(dtype) for a in arrays]


def linear(i: int, o: int, bias: bool, policy: Policy, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(i, o, use_bias=bias, dtype=policy.dtype, param_dtype=policy.param_dtype, rngs=rngs)


def conv(i: int, o: int, kernel: int, policy: Policy, rngs: nnx.Rngs, *, stride: int = 1,
         padding: int | tuple = None, bias: bool = True) -> nnx.Conv:
    """A Conv2d with PyTorch's symmetric padding (default kernel // 2); never flax's "SAME", which pads
    strided convolutions on the other side."""
    p = kernel // 2 if padding is None else padding
    pad = ((p, p), (p, p)) if isinstance(p, int) else p
    return nnx.Conv(i, o, (kernel, kernel), strides=stride, padding=pad, use_bias=bias, dtype=policy.dtype,
                    param_dtype=policy.param_dtype, rngs=rngs)


def group_norm(c: int, groups: int, eps: float, policy: Policy, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(c, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=policy.dtype,
                         param_dtype=policy.param_dtype, rngs=rngs)


def layer_norm(c: int, eps: float, policy: Policy, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(c, epsilon=eps, use_fast_variance=False, dtype=policy.dtype,
                         param_dtype=policy.param_dtype, rngs=rngs)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` (time_scale_shift "default"); no time projection when temb_channels is None."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float, *,
                 output_scale_factor: float = 1.0, policy: Policy, rngs: nnx.Rngs):
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(cin, groups, eps, policy, rngs)
        self.conv1 = conv(cin, cout, 3, policy, rngs)
        self.time_emb_proj = linear(temb_channels, cout, True, policy, rngs) if temb_channels else None
        self.norm2 = group_norm(cout, groups, eps, policy, rngs)
        self.conv2 = conv(cout, cout, 3, policy, rngs)
        self.conv_shortcut = conv(cin, cout, 1, policy, rngs) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """Stride-2 3×3 conv. padding=0 is the VAE's form: pad one pixel right and bottom, as diffusers does."""

    def __init__(self, c: int, padding: int, policy: Policy, rngs: nnx.Rngs):
        self.conv = conv(c, c, 3, policy, rngs, stride=2, padding=padding if padding else ((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling to `size` (default 2×), PyTorch's `interpolate(mode="nearest")` indexing."""
    h, w = x.shape[1:3]
    oh, ow = size or (2 * h, 2 * w)
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    def __init__(self, c: int, policy: Policy, rngs: nnx.Rngs):
        self.conv = conv(c, c, 3, policy, rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        return self.conv(upsample_nearest(x, size))

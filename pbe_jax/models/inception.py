"""The Inception-v3 of FID (pytorch-fid's `InceptionV3([3])`, the TensorFlow graph of 2015-12-05), NHWC.

torchvision's `Inception3(num_classes=1008, aux_logits=False)` with pytorch-fid's patched blocks: Mixed_5b–5d
and Mixed_6b–6e average-pool without counting the padding, Mixed_7b likewise, Mixed_7c max-pools in its pool
branch; Mixed_6a and Mixed_7a are torchvision's plain blocks. The features are the 2048-d output of the final
global average pool; the classifier (`fc`) is not part of this port.

Input: images in [0, 1] (float, or uint8 divided by 255), NHWC, any size: they are resized to 299×299 as
PyTorch's `interpolate(mode="bilinear", align_corners=False)` does (no antialiasing, even when shrinking),
then scaled to [-1, 1]. Attribute paths mirror the PyTorch module paths (`Mixed_5b.branch1x1.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ...), so the state dict converts by the generic walk of
`pbe_jax.convert.mapping`; the BatchNorm statistics are `nnx.BatchStat`s named as PyTorch names them.

Numerics: float32 by default (FID is reported in float32); a bfloat16 `Policy.dtype` moves the features by
~0.6 % of their range. Matmul/conv precision is the caller's (`jax_default_matmul_precision`): GPUs default to
TF32, as PyTorch's cuDNN convolutions do unless `torch.backends.cudnn.allow_tf32` is turned off.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax.models.layers import Policy

SIZE = 299  # the input size of the network
FEATURES = 2048
_BN_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """pytorch-fid's `resize_input` and `normalize_input` (both on for FID). Without the resize the input must
    already be 299×299 in the caller's own resampling; without the normalisation it must be in [-1, 1]."""

    resize_input: bool = True
    normalize_input: bool = True


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BatchNormInference(nnx.Module):
    """`nn.BatchNorm2d` in eval mode: the stored running statistics, never batch statistics. `scale` and
    `bias` convert to PyTorch's `weight` and `bias`; the statistics keep PyTorch's names."""

    def __init__(self, c: int, eps: float, policy: Policy):
        self.eps, self.dtype = eps, policy.dtype
        self.scale = nnx.Param(jnp.ones((c,), policy.param_dtype))
        self.bias = nnx.Param(jnp.zeros((c,), policy.param_dtype))
        self.running_mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((c,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # One multiply-add per element, folded in float32: (x - mean) / sqrt(var + eps) * w + b.
        mul = self.scale[...].astype(jnp.float32) * jax.lax.rsqrt(self.running_var[...].astype(jnp.float32)
                                                                  + self.eps)
        add = self.bias[...].astype(jnp.float32) - self.running_mean[...].astype(jnp.float32) * mul
        return x * mul.astype(x.dtype) + add.astype(x.dtype)


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | Sequence[int], policy: Policy, rngs: nnx.Rngs, *,
                 stride: int = 1, padding: int | Sequence[int] = 0):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                             use_bias=False, dtype=policy.dtype, param_dtype=policy.param_dtype, rngs=rngs)
        self.bn = BatchNormInference(cout, _BN_EPS, policy)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """`F.max_pool2d` (padding counts as -inf; floor mode)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
    """`F.avg_pool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)`: each window's sum over the
    real pixels it covers, divided by their count (4 in corners, 6 on edges, 9 inside)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    h, w = x.shape[1:3]
    count = np.ones((h, w), np.float32)
    count = np.pad(count, 1)
    count = sum(count[i:i + h, j:j + w] for i in range(3) for j in range(3))  # host constant
    return total / jnp.asarray(count[None, :, :, None], x.dtype)


class FIDInceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool (padding excluded)→1×1."""

    def __init__(self, cin: int, pool_features: int, policy: Policy, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, policy, rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, policy, rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, policy, rngs, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, policy, rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, policy, rngs, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, policy, rngs, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_exclude_pad(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (torchvision's block): 3×3/2 | 1×1→3×3→3×3/2 | max-pool 3/2."""

    def __init__(self, cin: int, policy: Policy, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, policy, rngs, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, policy, rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, policy, rngs, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, policy, rngs, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, 3, 2),
        ], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b–6e: factorised 7×7 convolutions; avg-pool with padding excluded."""

    def __init__(self, cin: int, c7: int, policy: Policy, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, policy, rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, policy, rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), policy, rngs, padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), policy, rngs, padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, policy, rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), policy, rngs, padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), policy, rngs, padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), policy, rngs, padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), policy, rngs, padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d7 = layer(d7)
        return jnp.concatenate([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool_exclude_pad(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (torchvision's block): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool 3/2."""

    def __init__(self, cin: int, policy: Policy, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, policy, rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, policy, rngs, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, policy, rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), policy, rngs, padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), policy, rngs, padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, policy, rngs, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b (`pool="avg"`, padding excluded) and Mixed_7c (`pool="max"`, pytorch-fid's FIDInceptionE_2)."""

    def __init__(self, cin: int, pool: str, policy: Policy, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', not {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, policy, rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, policy, rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), policy, rngs, padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), policy, rngs, padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, policy, rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, policy, rngs, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), policy, rngs, padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), policy, rngs, padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1, policy, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, 1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], axis=-1)


def bilinear_source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours and weights of bilinear sampling with half-pixel centres (align_corners=False), negative
    positions clamped to 0, computed in float32 as PyTorch's float32 kernel computes them (rounded positions).
    Not bit-identical to that kernel on every shape (up to ~1e-5 of the pixel range measured), but never
    farther from it than PyTorch's own float64 kernel is (up to ~8e-5 in float64)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w1 = np.clip(src - lo.astype(np.float32), 0, 1).astype(np.float32)
    return lo, hi, w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W, C) → (B, size[0], size[1], C) as `F.interpolate(mode="bilinear", align_corners=False)` with
    no antialiasing (`jax.image.resize` antialiases when shrinking, which pytorch-fid does not): two gathers
    and lerps, along the width first, then the height, as PyTorch's kernel sums."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    y0, y1, wy = bilinear_source_index(size[0], h)
    x0, x1, wx = bilinear_source_index(size[1], w)
    wx = jnp.asarray(wx, x.dtype)[None, None, :, None]
    wy = jnp.asarray(wy, x.dtype)[None, :, None, None]
    cols = x[:, :, x0] * (1 - wx) + x[:, :, x1] * wx
    return cols[:, y0] * (1 - wy) + cols[:, y1] * wy


class FIDInceptionV3(nnx.Module):
    """Images (B, H, W, 3) in [0, 1] → FID features (B, 2048) float32 (pytorch-fid's `InceptionV3([3])`)."""

    def __init__(self, config: InceptionConfig = InceptionConfig(), *, policy: Policy = Policy(),
                 rngs: nnx.Rngs):
        self.config, self.dtype = config, policy.dtype
        p = policy
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, p, rngs, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, p, rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, p, rngs, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, p, rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, p, rngs)
        self.Mixed_5b = FIDInceptionA(192, 32, p, rngs)
        self.Mixed_5c = FIDInceptionA(256, 64, p, rngs)
        self.Mixed_5d = FIDInceptionA(288, 64, p, rngs)
        self.Mixed_6a = InceptionB(288, p, rngs)
        self.Mixed_6b = FIDInceptionC(768, 128, p, rngs)
        self.Mixed_6c = FIDInceptionC(768, 160, p, rngs)
        self.Mixed_6d = FIDInceptionC(768, 160, p, rngs)
        self.Mixed_6e = FIDInceptionC(768, 192, p, rngs)
        self.Mixed_7a = InceptionD(768, p, rngs)
        self.Mixed_7b = FIDInceptionE(1280, "avg", p, rngs)
        self.Mixed_7c = FIDInceptionE(2048, "max", p, rngs)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """[0, 1] images (uint8 taken as /255) → the network's 299×299 input in [-1, 1], float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images (B, H, W, 3), got shape {images.shape}")
        x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
        if self.config.resize_input:
            x = resize_bilinear(x, (SIZE, SIZE))
        return 2.0 * x - 1.0 if self.config.normalize_input else x

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.preprocess(images).astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def fid_features(model: FIDInceptionV3, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) images in [0, 1] (or uint8) → (B, 2048) float32 pool features. Jit it with the model
    split at the boundary (`nnx.split` once, `nnx.merge` inside) for batches of one shape."""
    return model(images)

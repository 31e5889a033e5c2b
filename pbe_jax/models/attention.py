"""Scaled dot-product attention with a selectable backend, and the diffusers-style attention layer.

Layout (batch, length, heads, head_dim) throughout, as `jax.nn.dot_product_attention` takes it. Backends:
`xla` (materialised softmax), `cudnn` (flash attention on GPU), `splash` (the Pallas TPU splash-attention
kernel, for long self-attention; `pbe_jax.models.splash`), `auto` (cudnn on GPU, splash on TPU, else xla).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pbe_jax.models import splash
from pbe_jax.models.layers import Policy, linear, target_platform

BACKENDS = ("auto", "xla", "cudnn", "splash")


def resolve_backend(backend: str, q: jax.Array, kv_length: int | None = None) -> str:
    """The implementation `backend` means for a query like `q` and a key sequence of `kv_length` (default:
    self-attention), on the platform the program is compiled for (`target_platform`): `choose_backend`."""
    return choose_backend(backend, platform=target_platform(), dtype=q.dtype, head_dim=q.shape[-1],
                          length=q.shape[1], kv_length=q.shape[1] if kv_length is None else kv_length)


def choose_backend(backend: str, *, platform: str, dtype, head_dim: int, length: int, kv_length: int) -> str:
    """The implementation `backend` means on `platform` for queries of `length` tokens of `head_dim` in `dtype`
    against `kv_length` keys. "auto" takes cuDNN flash attention on a GPU when the dtype and head size allow it
    (half precision, head_dim a multiple of 8 up to 128), and splash on a TPU for self-attention of at least
    `splash.MIN_LENGTH` tokens. "splash" keeps shorter or cross-attention on xla, where a kernel would only add
    padding."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    long_self = length >= splash.MIN_LENGTH and kv_length == length
    if backend == "splash":
        return "splash" if long_self else "xla"
    if backend != "auto":
        return backend
    if platform == "tpu" and long_self:
        return "splash"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if platform == "gpu" and half and head_dim <= 128 and head_dim % 8 == 0 else "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto") -> jax.Array:
    """softmax(q kᵀ / √d) v for q (B, Lq, H, D), k and v (B, Lk, H, D).

    A one-token context is computed exactly without the softmax: over a single key the weights are all 1,
    so every query receives that key's value. That is Paint-by-Example's cross-attention and its mapper,
    and it spares the kernel a degenerate shape (cuDNN rejects a key length of 1 under differentiation).
    """
    if k.shape[1] == 1:
        return jnp.broadcast_to(v, q.shape[:2] + v.shape[2:]).astype(q.dtype)
    chosen = resolve_backend(backend, q, k.shape[1])
    if chosen == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if chosen == "splash":
        return splash.attention(q, k, v)
    return _xla_attention(q, k, v)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain batched matmuls in (B, H, L, D) order, logits and softmax in float32. Numerically what
    `jax.nn.dot_product_attention(implementation="xla")` computes, and on CPU markedly faster for small
    heads (the (B, L, H, D) contraction it lowers to transposes inside every product)."""
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = _logits(q, k) * (q.shape[-1] ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.matmul(probs, v).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """q kᵀ accumulated and returned in float32, whose gradient products take their operands in the inputs'
    dtype. Differentiated as it stands, the float32 cotangent would meet the bf16 q and k in mixed
    float32 × bf16 products (dq, dk) that a TPU runs at a fraction of the MXU's bf16 rate: the TPU compiler
    showed 12 such products in the full-size training step, the backward of the six self-attentions on
    `xla` (16² and 8² latents). Flash-attention kernels round the same cotangent (dS) to the inputs' dtype
    before those products; so does this. In float32 it is the plain product's gradient (to rounding: the
    products are ordered differently)."""
    return jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)


def _logits_fwd(q, k):
    return _logits(q, k), (q, k)


def _logits_bwd(res, g):
    q, k = res
    g = g.astype(q.dtype)
    dq = jnp.matmul(g, k, preferred_element_type=jnp.float32).astype(q.dtype)
    dk = jnp.matmul(g.swapaxes(-1, -2), q, preferred_element_type=jnp.float32).astype(k.dtype)
    return dq, dk


_logits.defvjp(_logits_fwd, _logits_bwd)


class Attention(nnx.Module):
    """diffusers' `Attention` (parameters to_q, to_k, to_v, to_out.0) on token sequences (B, L, C)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, *, context_dim: int | None = None,
                 bias: bool = False, policy: Policy, rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads, self.backend = heads, policy.attention_backend
        self.to_q = linear(query_dim, inner, bias, policy, rngs)
        self.to_k = linear(context_dim, inner, bias, policy, rngs)
        self.to_v = linear(context_dim, inner, bias, policy, rngs)
        self.to_out = nnx.List([linear(inner, query_dim, True, policy, rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, n = x.shape[:2]
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)  # noqa: E731
        o = dot_product_attention(split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
                                  backend=self.backend)
        return self.to_out[0](o.reshape(b, n, -1))

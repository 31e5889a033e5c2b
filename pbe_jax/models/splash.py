"""Self-attention through JAX's Pallas TPU splash-attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`): blockwise, never materialising the (L, L) logits, which
at 512² are 4096² × 8 heads ≈ 268 MB per sample per layer in bf16.

What the kernel needs and how it gets it:
- head dims that fill the TPU's 128 lanes: q, k and v are zero-padded to 128 below it (SD-1.x has 40 and 80;
  zero columns add nothing to q·k, and v's zero columns are sliced off the output); 160 passes as it is;
- sequence lengths that are multiples of the block: padded, with segment ids (0 = token, 1 = padding) so that
  no real query attends to a padding key; the padded queries' rows are dropped;
- the softmax scale: the kernel applies none, so q is multiplied by 1/√d (d the real head dim) first;
- batch: the kernel works on one example, so it is vmapped, and under a mesh (set with
  `jax.sharding.use_abstract_mesh`, as the train step and the pipeline do) it runs in `shard_map` over the
  mesh's batch axes (`data`, `fsdp`), each device on its own examples: a Mosaic kernel cannot be partitioned
  by the compiler.
For a TPU target it compiles through Mosaic (three `tpu_custom_call`s: forward, dq, dkv), also when the program is
compiled for a TPU topology from a CPU host (`pbe_jax.aot`): the target is the ambient mesh's platform, not
this process's backend. For any other target it runs in Pallas interpret mode, which checks the arithmetic (the
tests do, on the CPU) but is neither fast nor proof that the kernel compiles for a TPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pbe_jax.models.layers import target_platform

MIN_LENGTH = 1024  # self-attention at least this long takes the kernel; shorter is cheap enough on xla
LANES = 128
BLOCK = 512
BATCH_AXES = ("data", "fsdp")


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, length: int, block: int, interpret: bool):
    """The kernel for a full (non-causal) mask over `length` tokens; its block layout is computed on the host
    once per shape, as concrete arrays even when first asked for inside a trace (else the cache would keep
    that trace's tracers)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((length, length))] * heads)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _default_precision(fn):
    """`fn` (and its gradient) traced at the default matmul precision. Half-precision operands are exact in
    the MXU's float32 accumulation whatever precision is asked, and Mosaic rejects a bf16 matmul at fp32
    contract precision: a global jax_default_matmul_precision=highest (a parity run's setting) must not reach
    the kernels' bodies, forward or backward (whose kernels are traced when the gradient is taken)."""

    @jax.custom_vjp
    def run(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def forward(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)

    def backward(vjp, g):
        with jax.default_matmul_precision("default"):
            return vjp(g)

    run.defvjp(forward, backward)
    return run


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, length, heads, d = q.shape
    block = BLOCK if length >= BLOCK else _round_up(length, LANES)
    padded = _round_up(length, block)
    dp = LANES if d < LANES else d

    def prepare(t):  # (B, L, H, D) -> (B, H, L', D')
        return jnp.pad(t.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - length), (0, dp - d)))

    segments = (jnp.arange(padded) >= length).astype(jnp.int32)
    ids = sk.SegmentIds(q=segments, kv=segments)
    kernel = _kernel(heads, padded, block, interpret)
    scaled = (q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)).astype(q.dtype)
    run = jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=ids))
    if jnp.dtype(q.dtype).itemsize < 4:
        run = _default_precision(run)
    out = run(prepare(scaled), prepare(k), prepare(v))
    return out[:, :, :length, :d].transpose(0, 2, 1, 3).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool | None = None) -> jax.Array:
    """softmax(q kᵀ / √d) v for q, k, v (B, L, H, D) with the splash kernel; `interpret` defaults to True
    unless the program is compiled for a TPU (`target_platform`)."""
    interpret = target_platform() != "tpu" if interpret is None else interpret
    local = functools.partial(_local_attention, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names)
    if not axes or q.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return local(q, k, v)
    spec = P(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)

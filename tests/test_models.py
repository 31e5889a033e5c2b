"""Model-level properties: full-size parameter counts without allocation, attention, dtypes, the VAE posterior."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbe_jax.models import (AutoencoderKL, CLIPVisionConfig, PaintByExampleImageEncoder, Policy,
                            UNet2DConditionModel, UNetConfig, VAEConfig, dot_product_attention)
from pbe_jax.models.attention import resolve_backend
from pbe_jax.models.vae import DiagonalGaussian


@pytest.mark.parametrize("cls,config,count", [
    (UNet2DConditionModel, UNetConfig(), 859_535_364),
    (AutoencoderKL, VAEConfig(), 83_653_863),
    (PaintByExampleImageEncoder, CLIPVisionConfig(), 366_950_912),
])
def test_full_size_parameter_counts_match_pytorch(cls, config, count):
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert sum(math.prod(x.shape) for x in leaves) == count


def reference_attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def test_one_token_context_shortcut_is_exact():
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 37, 3, 8))
    k = jax.random.normal(kk, (2, 1, 3, 8)) * 10
    v = jax.random.normal(kv, (2, 1, 3, 8))
    out = dot_product_attention(q, k, v, backend="xla")
    assert out.shape == q.shape
    np.testing.assert_array_equal(out, jnp.broadcast_to(v, q.shape))
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-6)


def test_attention_matches_softmax_reference():
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (2, 11, 2, 8)) for key in (kq, kk, kv))
    np.testing.assert_allclose(dot_product_attention(q, k, v, backend="auto"), reference_attention(q, k, v),
                               atol=1e-5)


def test_attention_backend_choice():
    q32 = jnp.zeros((1, 4, 2, 64), jnp.float32)
    assert resolve_backend("xla", q32) == "xla"
    assert resolve_backend("cudnn", q32) == "cudnn"
    expected_auto = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert resolve_backend("auto", q32.astype(jnp.bfloat16)) == expected_auto
    assert resolve_backend("auto", q32) == "xla"  # cuDNN flash attention is half precision only
    assert resolve_backend("auto", jnp.zeros((1, 4, 1, 512), jnp.bfloat16)) == "xla"  # head too wide
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        resolve_backend("flash", q32)


def test_dtype_and_param_dtype_are_respected():
    cfg = UNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                     cross_attention_dim=8, norm_num_groups=8)
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, policy=Policy(jnp.bfloat16, jnp.bfloat16),
                                                           rngs=nnx.Rngs(0)))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    unet = UNet2DConditionModel(cfg, policy=Policy(jnp.bfloat16, jnp.float32), rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(unet, nnx.Param))} == {jnp.dtype(jnp.float32)}
    out = nnx.jit(lambda m, x, t, c: m(x, t, c))(unet, jnp.ones((1, 8, 8, 9)), jnp.array([3]), jnp.ones((1, 1, 8)))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 8, 8, 4)


def test_posterior_sampling_with_a_key():
    mean = jnp.linspace(-1, 1, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
    logvar = jnp.full_like(mean, 100.0)  # clamped to 20, as diffusers does
    post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    assert float(post.logvar.max()) == 20.0
    a, b = post.sample(jax.random.key(0)), post.sample(jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, post.sample(jax.random.key(1)))
    noise = jax.random.normal(jax.random.key(0), mean.shape)
    np.testing.assert_allclose(a, mean + math.exp(10.0) * noise, rtol=1e-6)
    np.testing.assert_array_equal(post.mode(), mean)


def test_vae_latent_scaling_roundtrip():
    vae = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig(scaling_factor=0.5, shift_factor=0.1), rngs=nnx.Rngs(0)))
    z = jnp.arange(4.0)
    np.testing.assert_allclose(vae.scale(z), (z - 0.1) * 0.5)
    np.testing.assert_allclose(vae.unscale(vae.scale(z)), z, rtol=1e-6)


def test_xla_attention_gradient_products_take_the_inputs_dtype():
    """The query-key product's gradient (dq, dk) rounds the float32 cotangent to the inputs' dtype before its
    products, as flash kernels do: no float32 × bf16 product in a bf16 backward pass; in float32 the gradient
    is autodiff's of the plain product."""
    from pbe_jax.models import attention

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 64, 4, 16)) for kk in keys)

    def plain(q, k, v):
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        logits = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) * 16 ** -0.5
        return jnp.matmul(jax.nn.softmax(logits, axis=-1).astype(v.dtype), v).transpose(0, 2, 1, 3)

    def grads(fn, *args):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32))), argnums=(0, 1, 2))(*args)

    with jax.default_matmul_precision("highest"):
        for ours, ref in zip(grads(attention._xla_attention, q, k, v), grads(plain, q, k, v)):
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    half = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    jaxpr = jax.make_jaxpr(lambda *a: grads(attention._xla_attention, *a))(*half)

    def products(eqns):
        for e in eqns:
            if e.primitive.name == "dot_general":
                yield tuple(str(x.aval.dtype) for x in e.invars)
            for p in e.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    yield from products(getattr(inner, "eqns", []))

    found = list(products(jaxpr.jaxpr.eqns))
    assert len(found) >= 6 and all(a == b == "bfloat16" for a, b in found), found
    mixed = [pair for pair in products(jax.make_jaxpr(lambda *a: grads(plain, *a))(*half).jaxpr.eqns)
             if len(set(pair)) > 1]
    assert mixed  # what autodiff of the plain product gives: float32 cotangent × bf16 operand

"""The `splash` attention backend (Pallas TPU splash attention), checked on the CPU in Pallas interpret mode
against the `xla` backend: forward and gradients at SD's head dims, lengths that are not block multiples,
inside a (data, fsdp) mesh on 8 fake devices, and a whole UNet. Interpret mode checks the arithmetic and the
padding, segment ids and shard_map around the kernel; it does not show that the kernel compiles for a TPU."""
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from pbe_jax.models import splash
from pbe_jax.models.attention import resolve_backend

from conftest import xla_env

ROOT = Path(__file__).resolve().parents[1]


def test_backend_choice():
    long, short = jax.ShapeDtypeStruct((1, 4096, 8, 40), "bfloat16"), jax.ShapeDtypeStruct((1, 256, 8, 40), "bfloat16")
    assert resolve_backend("splash", long) == "splash"
    assert resolve_backend("splash", short) == "xla"  # below splash.MIN_LENGTH
    assert resolve_backend("splash", long, kv_length=77) == "xla"  # cross-attention keeps its path
    assert splash.MIN_LENGTH == 1024
    assert resolve_backend("auto", long) == ("splash" if jax.default_backend() == "tpu" else
                                             "cudnn" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("flash", long)


MESH = r"""
import math, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import NamedSharding, PartitionSpec as P
from pbe_jax import parallel
from pbe_jax.models.attention import dot_product_attention

assert len(jax.devices()) == 8
mesh = parallel.make_mesh(2, 4)
sharding = NamedSharding(mesh, parallel.BATCH)

def rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())

def run(backend, q, k, v, weights):
    def loss(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out = dot_product_attention(q, k, v, backend=backend)
        return (out * weights).sum(), out
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(q, k, v)
    return fn, out, grads

for head_dim, length in ((40, 1100), (80, 1030), (160, 1500)):
    keys = jax.random.split(jax.random.key(head_dim), 4)
    q, k, v = (jax.device_put(jax.random.normal(key, (8, length, 2, head_dim)), sharding) for key in keys[:3])
    weights = jax.random.normal(keys[3], (8, length, 2, head_dim))
    fn, out, grads = run("splash", q, k, v, weights)
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v)), "splash must run per device under shard_map"
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    _, ref_out, ref_grads = run("xla", q, k, v, weights)
    errors = [rel(out, ref_out)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    print("head_dim", head_dim, "length", length, "rel. errors out, dq, dk, dv:", errors)
    assert max(errors) <= 1e-5, errors

# A whole UNet at 32x32 latents (1024 tokens at its first level), in the mesh, against xla on one device.
from pbe_jax.convert import init, mapping
from pbe_jax.models import Policy, UNet2DConditionModel, UNetConfig
from pbe_jax.parity import reference
config = UNetConfig.from_dict(dict(reference.TINY["sd"]["unet"], attention_head_dim=2), "tiny")
params = init.random_params(UNet2DConditionModel, config, Policy(), 0)
nets = {b: mapping.materialize(UNet2DConditionModel, config, Policy(attention_backend=b), params, b)
        for b in ("xla", "splash")}
x = jax.random.normal(jax.random.key(1), (8, 32, 32, 9))
t = jnp.arange(8) * 111
context = jax.random.normal(jax.random.key(2), (8, 1, 24))
reference_out = nets["xla"](x, t, context)

@jax.jit
def forward(x, t, context):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return nets["splash"](x, t, context)

out = forward(*jax.device_put((x, t, context), sharding))
print("UNet rel. error", rel(out, reference_out))
assert rel(out, reference_out) <= 1e-5
print("OK")
"""


def test_splash_equals_xla_forward_and_backward_in_the_mesh():
    env = xla_env(xla_force_host_platform_device_count=8)
    r = subprocess.run([sys.executable, "-c", MESH], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]

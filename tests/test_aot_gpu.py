"""Compiling for NVIDIA GPUs from this CPU host (the CUDA plugin, the [gpu] extra): the topology names, the FLOP
count of what the GPU compiler turns into library calls (cuDNN convolutions and fused attention) and loops, the
training step on one node with each attention backend and on two nodes, and the shipped sampler on a 24 GB card.
No GPU is touched: the numbers are the GPU compiler's for that target, without autotuning."""
import json

import pytest

from pbe_jax import aot

pytestmark = pytest.mark.skipif(not aot.have_compiler("h100-8"),
                                reason="the [gpu] extra (the CUDA plugin) is not installed")


@pytest.mark.parametrize("name, generation, shape", [
    ("h100-8", "h100", (1, 8)), ("h100-1", "h100", (1, 1)), ("H100:2x8", "h100", (2, 8)), ("h100-16", "h100", (2, 8)),
    ("h200-8", "h200", (1, 8)), ("a100-80gb-8", "a100-80gb", (1, 8)), ("l4-1", "l4", (1, 1)),
])
def test_gpu_topology_names(name, generation, shape):
    assert aot.parse_topology(name) == (generation, shape)


@pytest.mark.parametrize("name, message", [
    ("h100-12", "do not fill nodes of 8"), ("h100:1x9", "1 to 8 GPUs"), ("h300-8", "expected a Cloud TPU name"),
    ("a100-8", "expected a Cloud TPU name"),
])
def test_gpu_topology_errors(name, message):
    with pytest.raises(aot.TopologyError, match=message):
        aot.parse_topology(name)


def test_gpu_options_and_missing_plugin(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:  # nodes are in the name, not --slices
        aot.main(["train", "--topology", "h100-8", "--slices", "2"])
    assert e.value.code == 2 and "h100:2x8" in capsys.readouterr().err
    monkeypatch.setattr(aot.targets, "have_compiler", lambda text: False)
    assert aot.main(["train", "--topology", "h100-8"]) == 1
    assert '".[gpu]"' in capsys.readouterr().err


def test_gpu_targets_describe_their_gpus():
    """The devices the compiler describes: kind, count, one process per node; the memory each config gives."""
    aot.prepare_host()
    two = aot.topology("h100:2x8")
    assert len(two.devices) == 16 and {d.process_index for d in two.devices} == {0, 1}
    assert two.devices[0].device_kind == "NVIDIA H100 80GB HBM3" and two.devices[0].platform == "gpu"
    assert aot.topology("l4-1").devices[0].device_kind == "NVIDIA L4"
    gib = {name: gpu.hbm_bytes / aot.GiB for name, gpu in aot.GPUS.items()}
    assert gib["h100"] == pytest.approx(79.1, abs=0.1) and gib["h200"] == pytest.approx(141.0, abs=0.1)
    assert gib["a100-80gb"] == pytest.approx(79.3, abs=0.1) and gib["l4"] == pytest.approx(22.5, abs=0.1)


# ---- FLOPs the cost model does not see --------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_gpu():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    aot.prepare_host()
    topo = aot.topology("h100-1")
    sharding = NamedSharding(jax.sharding.Mesh(topo.devices, ("d",)), PartitionSpec())
    import jax.numpy as jnp

    def compile_(f, *shapes):
        specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in shapes]
        compiled = jax.jit(f).lower(*specs).compile()
        return compiled, aot.flop_count(compiled, topo), aot.custom_calls(compiled.as_text())
    return compile_


def test_matmul_and_scan_flops_on_a_gpu(one_gpu):
    """A plain matmul (a Triton gemm fusion, which the cost model counts) is 2n³; a scan's body is counted once
    per iteration (10 here), where the cost model counts it once."""
    import jax
    import jax.numpy as jnp

    _, flops, calls = one_gpu(lambda a, b: a @ b, (1024, 1024), (1024, 1024))
    assert flops["total"] == pytest.approx(2 * 1024 ** 3, rel=1e-6) and flops["custom_calls"] == 0
    assert any("gemm" in k for k in calls), calls

    def loop(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0]

    _, flops, _ = one_gpu(loop, (256, 256), (256, 256))
    assert flops["unknown_loops"] == 0
    assert flops["loop_iterations"] == 9 * 2 * 256 ** 3
    assert flops["total"] == pytest.approx(10 * 2 * 256 ** 3, rel=0.02)  # and the tanh's elementwise FLOPs


def test_fused_attention_flops_from_its_shapes(one_gpu):
    """cuDNN flash attention forward and backward: 4 and 10 FLOPs per (query, key, head-dim column) per head,
    the cost model's own count of the rest (the loss's sum) small beside them."""
    import jax
    import jax.numpy as jnp

    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32).sum()

    b, length, heads, dim = 2, 512, 4, 64
    _, flops, calls = one_gpu(jax.grad(f, argnums=(0, 1, 2)), *[(b, length, heads, dim)] * 3)
    assert calls["__cudnn$fmhaSoftmax"] == 1 and calls["__cudnn$fmhaSoftmaxBackward"] == 1
    assert flops["custom_calls"] == (4 + 10) * b * heads * length * length * dim
    assert 0 <= flops["cost_analysis"] < 1e-3 * flops["custom_calls"]


def test_cudnn_convolutions_count_as_the_cpu_compiler_counts_them(one_gpu):
    """Padded and strided convolutions and their gradients, which the GPU compiler makes cuDNN calls (forward,
    backward input, backward filter): their FLOPs from shapes equal the CPU compiler's cost analysis of the same
    program (plain convolutions there) to 3 % (elementwise work is counted differently). (A transposed
    convolution's filter gradient is not compared: the GPU program materialises its dilated input and multiplies
    the inserted zeros too, which the count from shapes rightly includes and the CPU's program does not do.)"""
    import jax
    import jax.numpy as jnp

    dn = ("NHWC", "HWIO", "NHWC")

    def convs(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        y = jax.lax.conv_general_dilated(y, w, (2, 2), ((0, 1), (0, 1)), dimension_numbers=dn)
        return (y.reshape(-1, 64) @ m).astype(jnp.float32).sum()

    shapes = (2, 32, 32, 64), (3, 3, 64, 64), (64, 64)
    grad = jax.grad(convs, argnums=(0, 1, 2))
    _, flops, calls = one_gpu(grad, *shapes)
    assert {"__cudnn$convForward", "__cudnn$convBackwardInput", "__cudnn$convBackwardFilter"} <= set(calls), calls
    cpu = jax.jit(grad).lower(*[jnp.zeros(s, jnp.bfloat16) for s in shapes]).compile().cost_analysis()["flops"]
    assert flops["custom_calls"] > 0.9 * flops["total"]
    assert flops["total"] == pytest.approx(cpu, rel=0.03)


# ---- the project's programs -----------------------------------------------------------------------------

TINY = ["--config", "tiny", "model.dtype=bfloat16", "data.image_size=32", "model.image_encoder.hidden_size=64"]


def _fmha(report):
    return {k: v for k, v in report["custom_calls"].items() if k.startswith("__cudnn$fmha")}


def _step(tmp_path, topology, *overrides):
    out = tmp_path / "r.json"
    assert aot.main(["train", "--topology", topology, "--json", str(out), *TINY, *overrides]) == 0
    return json.loads(out.read_text())


def _check_node_step(r, attention):
    assert (r["platform"], r["chips"], r["nodes"], r["mesh"]) == ("gpu", 8, 1, {"data": 8, "fsdp": 1})
    assert r["device_kind"] == "NVIDIA H100 80GB HBM3" and r["fits"] is True
    b = r["per_chip_bytes"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] + b["generated_code"] > 0
    assert r["donated_aliased_bytes"] >= 0.9 * r["state_bytes_per_chip"]  # the donated state is reused
    assert r["roofline_s"] == pytest.approx(r["flops_per_chip"] / 989e12)
    assert r["flops_detail"]["custom_calls"] > 0  # the convolutions are cuDNN calls
    assert any(k.startswith("__cudnn$conv") for k in r["custom_calls"])
    fmha = _fmha(r)
    if attention == "xla":
        assert not fmha
    else:  # the UNet's self-attentions (forward, backward) and the frozen tower's (forward only)
        assert fmha["__cudnn$fmhaSoftmax"] > fmha["__cudnn$fmhaSoftmaxBackward"] >= 2, fmha
    assert r["collectives"]["all-reduce"]["count"] >= 1  # the gradients, summed over the node


def test_tiny_step_on_an_h100_node_with_xla_attention(tmp_path):
    """The tiny config's step on 8 H100s, bf16, data parallel, xla attention: no fused attention at all. (The
    tower's width is raised to 64 so that its heads are 16 wide: cuDNN takes head dims that are multiples of 8
    up to 128.) Through train.py --compile-only, which takes GPU topologies as it takes TPU ones."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(root / "train.py"), *TINY, "model.attention=xla", "--compile-only",
                           "h100-8", "--json", str(out)], capture_output=True, text=True, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "library calls" in proc.stdout and "NVIDIA H100" in proc.stdout
    _check_node_step(json.loads(out.read_text()), "xla")


def test_tiny_step_with_cudnn_on_one_node_and_auto_on_two(tmp_path):
    """cudnn on 8 H100s: flash attention forward and backward. Then two nodes of 8, fsdp over a node's GPUs and
    data across nodes: the state split 8 ways, parameters gathered and gradients scattered; and `auto`, compiled
    on this CPU host for a GPU target, takes cuDNN flash attention wherever cudnn does."""
    cudnn = _step(tmp_path, "h100-8", "model.attention=cudnn")
    _check_node_step(cudnn, "cudnn")
    r = _step(tmp_path, "h100:2x8", "model.attention=auto", "mesh_fsdp=8", "data.batch_size=16")
    assert (r["chips"], r["nodes"], r["topology_shape"], r["mesh"]) == (16, 2, "1x2x8", {"data": 2, "fsdp": 8})
    assert r["per_chip_batch"] == 1 and r["state_bytes_per_chip"] < cudnn["state_bytes_per_chip"]
    assert r["collectives"]["all-gather"]["count"] >= 1 and r["collectives"]["reduce-scatter"]["count"] >= 1
    assert _fmha(r) == _fmha(cudnn)


def test_shipped_sampler_on_an_l4(tmp_path):
    """sample.py's generation for the shipped model on one 24 GB L4: cuDNN fused attention forward only, its
    scan counted per step, within the card's memory."""
    from pathlib import Path

    out = tmp_path / "r.json"
    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "synthetic"
    code = aot.main(["sample", "--topology", "l4-1", "--pretrained", str(shipped), "--batch-size", "4",
                     "--size", "64", "--steps", "20", "--sampler", "ddim", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert (r["device_kind"], r["chips"], r["per_chip_batch"], r["fits"]) == ("NVIDIA L4", 1, 4, True)
    fmha = _fmha(r)
    assert fmha.get("__cudnn$fmhaSoftmax") and "__cudnn$fmhaSoftmaxBackward" not in fmha, fmha
    assert r["flops_detail"]["unknown_loops"] == 0 and r["flops_detail"]["loop_iterations"] > 0
    assert r["images_per_s_per_chip"] == pytest.approx(4 / r["roofline_s"])
    assert r["peak_bf16_flops"] == 121e12 and r["hbm_bytes"] == 23034 * 2 ** 20


def test_the_plugin_stays_quiet_on_a_host_without_a_gpu():
    """With the [gpu] extra installed on a host without NVIDIA's driver, the CLIs (anything that imports pbe_jax
    before JAX starts) run on the CPU without the plugin's cuInit traceback."""
    import ctypes.util
    import os
    import subprocess
    import sys

    if ctypes.util.find_library("cuda") is not None:
        pytest.skip("this host has NVIDIA's driver")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-c", "import pbe_jax, jax; print(jax.default_backend())"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "cpu" and "Jax plugin configuration error" not in proc.stderr, proc.stderr[-2000:]

"""Cross-compiling for TPU slices from this CPU host (libtpu, the [tpu] extra): the topology names, the
report of the compiled training step and sampler, Mosaic kernels where splash is chosen, the FLOP count of
loops, the compiler's refusal of a program too large for HBM, and the command-line contracts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pbe_jax import aot
from pbe_jax.models import UNetConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "synthetic"


@pytest.mark.parametrize("name, generation, shape", [
    ("v5e-1", "v5e", (1, 1)), ("v5e-4", "v5e", (2, 2)), ("v5litepod-8", "v5e", (2, 4)),
    ("v5e-16", "v5e", (4, 4)), ("v5e-32", "v5e", (4, 8)), ("v6e-256", "v6e", (16, 16)),
    ("v4-8", "v4", (2, 2, 1)), ("v4-16", "v4", (2, 2, 2)), ("v5p-32", "v5p", (2, 2, 4)),
    ("v5p-128", "v5p", (4, 4, 4)), ("v5p:2x2x2", "v5p", (2, 2, 2)), ("v5e:2x4", "v5e", (2, 4)),
    ("V6E-8", "v6e", (2, 4)),
])
def test_topology_names(name, generation, shape):
    assert aot.parse_topology(name) == (generation, shape)


@pytest.mark.parametrize("name, message", [
    ("v9-8", "unknown TPU generation"), ("v4-7", "2 per chip"), ("v5e:2x2x2", "2 dimensions"),
    ("v5e-12", "standard slice"), ("tpu", "expected a Cloud TPU name"),
])
def test_topology_errors(name, message):
    with pytest.raises(aot.TopologyError, match=message):
        aot.parse_topology(name)


def test_bad_options_exit_2_and_no_libtpu_names_the_extra(monkeypatch, capsys):
    for argv in (["train", "--topology", "v9-8"], ["train", "--topology", "v5e-4", "--slices", "0"],
                 ["sample", "--topology", "v5e-4", "--config", "tiny", "--steps", "0"], ["sample", "--topology", "v5e-4"]):
        with pytest.raises(SystemExit) as e:
            aot.main(argv)
        assert e.value.code == 2, argv
    monkeypatch.setattr(aot.targets, "have_compiler", lambda text: False)
    assert aot.main(["train", "--topology", "v5e-4"]) == 1
    assert '".[tpu]"' in capsys.readouterr().err


# ---- the compiler's own numbers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_chip():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    aot.prepare_host()
    topo = aot.topology("v5e-1")
    return topo, NamedSharding(jax.sharding.Mesh(topo.devices, ("d",)), PartitionSpec())


def test_flop_count_follows_loops_and_matches_the_cost_analysis(one_chip):
    """The HLO count of convolutions and dots agrees with the compiler's cost analysis where there is no loop
    (which adds elementwise FLOPs: within 3 %), and counts a scan's body once per iteration where the cost
    analysis counts it once."""
    import jax
    import jax.numpy as jnp

    _, sharding = one_chip
    dn = ("NHWC", "HWIO", "NHWC")

    def convs(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        y = jax.lax.conv_general_dilated(y, w, (2, 2), ((0, 1), (0, 1)), dimension_numbers=dn)
        y = jax.lax.conv_transpose(y, w, (2, 2), "SAME", dimension_numbers=dn)
        return (y.reshape(-1, 64) @ m).astype(jnp.float32).sum()

    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)  # noqa: E731
    args = spec(2, 32, 32, 64), spec(3, 3, 64, 64), spec(64, 64)
    for f in (convs, jax.grad(convs, argnums=(0, 1, 2))):  # the backward pass: dilated and transposed convs
        compiled = jax.jit(f).lower(*args).compile()
        counted = aot.program_flops(compiled.as_text())
        assert 0.97 < counted["static_matmul"] / compiled.cost_analysis()["flops"] <= 1.0

    def loop(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0]

    compiled = jax.jit(loop).lower(spec(256, 256), spec(256, 256)).compile()
    counted = aot.program_flops(compiled.as_text())
    assert counted["static_matmul"] == 2 * 256 ** 3
    assert counted["executed_matmul"] == 10 * 2 * 256 ** 3 and counted["unknown_loops"] == 0
    assert compiled.cost_analysis()["flops"] < 1.1 * 2 * 256 ** 3  # what the cost analysis misses


def test_a_program_too_large_for_hbm_is_a_report_not_an_error(one_chip):
    """The compiler refuses 20 GiB of output on a 16 GiB v5e chip: `fits` false with what it said."""
    import jax
    import jax.numpy as jnp

    topo, sharding = one_chip
    x = jax.ShapeDtypeStruct((5 * 2 ** 28,), jnp.float32, sharding=sharding)
    fn = jax.jit(lambda v: (v * 2, v + 1, v - 1, v / 3), in_shardings=sharding, out_shardings=sharding)
    report = aot.compile_report(lambda: fn.lower(x), topo, "sample", 1, {})
    assert report["fits"] is False
    assert report["per_chip_bytes"]["total"] > 16 * aot.GiB
    assert 15 * aot.GiB < report["compiler_available_bytes"] <= 16 * aot.GiB
    assert aot.emit(report, None) == 3


def test_fsdp_gathers_each_weight_and_reduce_scatters_its_gradient():
    """Three fsdp-split layers over a v5e 2x4 slice: each weight all-gathered in bf16 (gather_params) once, or
    once more for the backward pass (the compiler's choice: it keeps them at this size), asynchronous gathers
    counted once however many fusions carry them, each gradient reduce-scattered onto the shards (the TPU
    compiler's all-reduce-scatter fusion), and no all-reduce of a whole gradient."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from pbe_jax import parallel

    mesh = parallel.make_mesh(1, 8, devices=aot.topology("v5e-8").devices)

    def loss(params, x):
        h = x.astype(jnp.bfloat16)
        for w in parallel.gather_params(params, jnp.bfloat16, lambda path, a: a.ndim >= 2):
            h = jax.nn.relu(h @ w)
        return jnp.mean(jnp.square(h.astype(jnp.float32)))

    def step(params, x):
        with parallel.abstract_mesh(mesh):
            return jax.tree.map(lambda p, g: p - 1e-3 * g, params, jax.grad(loss)(params, x))

    w = jax.ShapeDtypeStruct((2048, 2048), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    x = jax.ShapeDtypeStruct((64, 2048), jnp.float32, sharding=NamedSharding(mesh, parallel.BATCH))
    found = aot.collectives(jax.jit(step, donate_argnums=0).lower([w] * 3, x).compile().as_text())
    gathers = found["all-gather"]["count"]
    assert 3 <= gathers <= 6 and found["all-gather"]["bytes"] == gathers * 2048 * 2048 * 2
    assert found["reduce-scatter"] == {"count": 3, "bytes": 3 * 2048 * 2048 * 2 // 8}
    assert found["all-reduce"]["count"] == found["all-to-all"]["count"] == 0


# ---- the project's programs ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_mesh_report(tmp_path_factory):
    """train.py --compile-only: the tiny config's step over a v5e 2x2 slice, data parallel, bf16 compute, xla
    attention, at 32² (64 latent tokens; the TPU compile takes three quarters of its time at the config's 64²)."""
    out = tmp_path_factory.mktemp("aot") / "data.json"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", "unused",
                           "--compile-only", "v5e-4", "--json", str(out), "model.attention=xla",
                           "model.dtype=bfloat16", "data.image_size=32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fits" in proc.stdout and "Mosaic kernels" in proc.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def short_splash():
    """splash, and auto's choice of it on a TPU, from 64 tokens instead of splash.MIN_LENGTH (1024): the tiny and
    shipped models then take the kernel at 32² and 64² (8² and 16² latents), where their TPU compiles take a
    fraction of the time they take at 128²."""
    from pbe_jax.models import splash

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(splash, "MIN_LENGTH", 64)
        yield


@pytest.fixture(scope="module")
def fsdp_report(tmp_path_factory, short_splash):
    """Two v5e 2x2 slices, fsdp 4 within a slice and data across them, splash at 64 latent tokens (32²)."""
    out = tmp_path_factory.mktemp("aot") / "fsdp.json"
    code = aot.main(["train", "--topology", "v5e-4", "--slices", "2", "--config", "tiny", "--json", str(out),
                     "mesh_fsdp=4", "data.batch_size=8", "model.attention=splash", "data.image_size=32"])
    assert code == 0
    return json.loads(out.read_text())


def test_train_step_on_a_data_mesh(data_mesh_report):
    r = data_mesh_report
    assert (r["topology"], r["chips"], r["program"], r["mesh"]) == ("v5e-4", 4, "train", {"data": 4, "fsdp": 1})
    assert r["device_kind"].startswith("TPU v5") and r["fits"] is True
    b = r["per_chip_bytes"]
    assert b["total"] == b["arguments"] + b["temporaries"] + b["outputs"] + b["generated_code"] > 0
    assert b["arguments"] >= r["state_bytes_per_chip"]  # the state is an argument, besides the batch
    assert r["donated_aliased_bytes"] >= r["state_bytes_per_chip"] * 0.9  # the donated state is reused
    assert r["flops_per_chip"] > 0 and r["roofline_s"] == pytest.approx(r["flops_per_chip"] / 197e12)
    assert r["samples_per_s_per_chip"] == pytest.approx(2 / r["roofline_s"])
    assert not [k for k in r["mosaic_kernels"] if k.startswith("splash")]  # xla attention: no splash kernel
    # a bf16 step's products take bf16 operands: no float32 × bf16 product into float32 (the attention's
    # query-key gradient was one), which a TPU runs at a fraction of the bf16 rate
    mixed = {k: n for k, n in r["dtypes"].items() if "bf16,f32->f32" in k or "f32,bf16->f32" in k}
    assert r["dtypes"]["convolution bf16,bf16->bf16"] > 100 and not mixed, r["dtypes"]
    assert r["collectives"]["all-reduce"]["count"] >= 1  # the gradients, summed over the data axis
    assert r["compile_s"] > 0


def test_fsdp_over_two_slices_shards_the_state_and_runs_splash_through_mosaic(data_mesh_report, fsdp_report):
    r = fsdp_report
    assert (r["chips"], r["slices"], r["mesh"]) == (8, 2, {"data": 2, "fsdp": 4})
    # the tiny model's arrays of at least 2**16 elements (parallel.param_spec) are split four ways
    assert r["state_bytes_per_chip"] < data_mesh_report["state_bytes_per_chip"]
    assert r["per_chip_bytes"]["arguments"] < data_mesh_report["per_chip_bytes"]["arguments"]
    assert r["collectives"]["all-gather"]["count"] >= 1  # fsdp gathers the parameters whole at their use
    assert r["collectives"]["reduce-scatter"]["count"] >= 1  # and scatters their gradients back onto the shards
    assert r["collectives"]["all-to-all"]["count"] == 0  # no layer split over the fsdp axis like its weights
    kernels = r["mosaic_kernels"]
    for kind in ("fwd", "dq", "dkv"):  # forward, and both halves of the backward pass
        assert any(k.startswith(f"splash_mha_{kind}") for k in kernels), kernels
    assert r["flops_detail"]["mosaic_kernels"] > 0


def test_sampler_of_the_shipped_model(tmp_path, short_splash):
    """sample.py's whole generation for the shipped model at 64² (256 latent tokens: with short_splash, auto
    takes splash on a TPU), its scan's FLOPs counted per step."""
    out = tmp_path / "sample.json"
    code = aot.main(["sample", "--topology", "v5e-4", "--pretrained", str(SHIPPED), "--batch-size", "6",
                     "--size", "64", "--steps", "20", "--sampler", "ddim", "--attention", "auto",
                     "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert (r["program"], r["batch_size"], r["chips_per_host"], r["per_chip_batch"]) == ("sample", 6, 4, 2)
    assert [k for k in r["mosaic_kernels"] if k.startswith("splash_mha_fwd")]  # auto on a TPU: splash
    assert not [k for k in r["mosaic_kernels"] if "dkv" in k]  # and no backward pass
    detail = r["flops_detail"]
    assert detail["unknown_loops"] == 0 and detail["loop_iterations"] > 0
    assert r["images_per_s_per_chip"] == pytest.approx(2 / r["roofline_s"])
    # data parallel, and guidance's doubled batch keeps each sample's rows on its chip: nothing crosses chips
    # (with [uncond; cond] stacked, 5 all-to-alls and 5 collective-permutes ran inside the loop)
    assert not any(c["count"] for c in r["collectives"].values()), r["collectives"]


def test_sampler_models_of_a_training_config_are_its_networks_as_shapes():
    """`aot sample --config NAME`: the networks train.py builds for the config (model.dtype and attention as
    asked), shapes only, their kernels in the half-precision compute dtype as the pipeline stores them."""
    import jax
    from flax import nnx

    from pbe_jax.aot.report import sample_models
    from pbe_jax.train import config as config_lib

    models = sample_models(None, "tiny", "bfloat16", "xla")
    state = dict(nnx.to_flat_state(nnx.state(models.unet)))
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in state.values())
    assert models.unet.config == UNetConfig.from_dict(config_lib.load("tiny").model.unet, "tiny")
    kernels = {p[-2:]: v.get_value().dtype for p, v in state.items() if p[-1] in ("kernel", "bias")}
    assert kernels[("conv_in", "kernel")] == "bfloat16" and kernels[("conv_in", "bias")] == "float32"


def test_bf16_splash_compiles_through_mosaic_at_highest_matmul_precision(one_chip):
    """The suite runs at jax_default_matmul_precision=highest (conftest), as parity runs do; Mosaic refuses a
    bf16 matmul at fp32 precision, so the kernels, forward and backward, are traced at the default one."""
    import jax
    import jax.numpy as jnp

    from pbe_jax import parallel
    from pbe_jax.models import splash

    assert jax.config.jax_default_matmul_precision == "highest"
    topo, _ = one_chip
    mesh = parallel.data_mesh(topo.devices)
    x = jax.ShapeDtypeStruct((1, 1024, 2, 40), jnp.bfloat16,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def f(q, k, v):
        with parallel.abstract_mesh(mesh):
            return splash.attention(q, k, v).astype(jnp.float32).sum()

    kernels = aot.mosaic_kernels(jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text())
    assert {k.split("_segmented")[0] for k in kernels} == {"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}


def test_fsdp_parameters_are_gathered_whole_in_the_compute_dtype():
    """parallel.gather_params (the train step's use of fsdp-split parameters): the UNet's kernels cast to the
    compute dtype and constrained whole, everything else only constrained, nothing changed without fsdp."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, AxisType

    from pbe_jax import parallel
    from pbe_jax.train.step import _unet_matrix

    tree = {"unet": {"conv_in": {"kernel": jnp.ones((3, 3, 9, 320)), "bias": jnp.ones((320,))}},
            "image_encoder": {"proj_out": {"kernel": jnp.ones((768, 768))}}}
    gather = lambda t: parallel.gather_params(t, jnp.bfloat16, _unet_matrix)  # noqa: E731
    assert jax.tree.map(lambda x: x.dtype, jax.eval_shape(gather, tree)) == jax.tree.map(lambda x: x.dtype, tree)
    for fsdp, cast in ((1, False), (4, True)):
        mesh = AbstractMesh((2, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
        with jax.sharding.use_abstract_mesh(mesh):
            out = jax.eval_shape(gather, tree)
        assert out["unet"]["conv_in"]["kernel"].dtype == (jnp.bfloat16 if cast else jnp.float32)
        assert out["unet"]["conv_in"]["bias"].dtype == jnp.float32
        assert out["image_encoder"]["proj_out"]["kernel"].dtype == jnp.float32

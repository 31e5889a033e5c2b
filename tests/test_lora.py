"""LoRA of the UNet (pbe_jax.lora): the targets, an adapter at its start computes the base model exactly, and
the file in diffusers' SD LoRA layout: diffusers' UNet with it loaded through peft computes what our merged
export computes, and what our JAX UNet with the adapter merged computes."""
import json

import numpy as np
import pytest
import torch

from pbe_jax import lora
from pbe_jax.convert import load, mapping, save
from pbe_jax.convert.weights import save_safetensors


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    folder = tiny_folder("sd")
    return folder, load(folder)


def moved(adapter, seed=1, size=0.2):
    """The adapter after some training: B no longer zero."""
    rng = np.random.default_rng(seed)
    return {n: {"A": f["A"], "B": rng.normal(0, size, f["B"].shape).astype(np.float32)} for n, f in adapter.items()}


def test_targets_and_a_fresh_adapter_computes_the_base_exactly(tiny):
    _, models = tiny
    params = mapping.module_params(models.unet)
    attention = lora.target_layers(params, lora.LoRAConfig(rank=2))
    assert attention and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")
                             for n in attention)
    assert all(".transformer_blocks." in n for n in attention)  # the attention of every transformer block
    everything = lora.target_layers(params, lora.LoRAConfig(rank=2, targets=("attention", "proj", "ff", "conv")))
    assert set(attention) < set(everything) and any(n.endswith("resnets.0.conv1") for n in everything)
    with pytest.raises(lora.LoRAError, match="to_z names no layer"):
        lora.target_layers(params, lora.LoRAConfig(rank=2, targets=("to_q", "to_z")))
    with pytest.raises(lora.LoRAError, match="vae is not a part that trains beside an adapter"):
        lora.part_prefixes(("conv_in", "vae"))

    cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=("attention", "conv"))
    adapter = lora.init(params, cfg, seed=0)
    name = next(n for n in adapter if n.endswith("attn1.to_q"))
    fan_in = adapter[name]["A"].shape[1]
    assert adapter[name]["A"].shape == (3, fan_in) and np.abs(adapter[name]["A"]).max() <= 1 / np.sqrt(fan_in)
    assert all(not f["B"].any() for f in adapter.values())
    merged = lora.merge(params, adapter, cfg.scale)
    assert all(np.array_equal(merged[p], params[p]) for p in params)  # step 0 is the base model, bit for bit
    assert lora.check(params, adapter) == 3
    assert not all(np.array_equal(a, b) for a, b in zip(lora.merge(params, moved(adapter), 2.0).values(),
                                                          params.values()))


def test_the_peft_file_in_diffusers_equals_our_merged_export_and_our_unet(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from pbe_jax.parity import compare as cmp

    folder, _ = tiny
    models = load(folder)
    cfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=("attention", "ff", "conv"))  # scale 2: alpha must be read
    adapter = moved(lora.init(mapping.module_params(models.unet), cfg, seed=0))
    path = lora.save_peft(adapter, cfg, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"

    lora.apply(models.unet, adapter, cfg.scale)
    save(models, tmp_path / "merged", format="diffusers")

    rng = np.random.default_rng(0)
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    x = rng.standard_normal((2, unet_config["in_channels"], 16, 16)).astype(np.float32)
    t = np.array([10, 700])
    ctx = rng.standard_normal((2, 1, unet_config["cross_attention_dim"])).astype(np.float32)

    def run(unet):
        with torch.no_grad():
            out = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx))
        return out.sample.numpy()

    adapted = UNet2DConditionModel.from_pretrained(folder / "unet")
    base_out = run(adapted)
    # diffusers reads the rank and alpha from the file's metadata when given the folder and the file's name (given
    # the file's path alone it assumes alpha = rank: right for the default alpha, not for this one)
    adapted.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet")
    assert adapted.peft_config["default_0"].lora_alpha == 8.0
    theirs = run(adapted)
    exported = run(UNet2DConditionModel.from_pretrained(tmp_path / "merged" / "unet"))
    ours = np.asarray(cmp.jitted(models.unet, lambda m, *a: m(*a))(x.transpose(0, 2, 3, 1), t, ctx))
    ours = ours.transpose(0, 3, 1, 2)

    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()  # noqa: E731
    assert rel(theirs, base_out) > 1e-2  # the adapter matters
    assert rel(exported, theirs) <= 1e-5
    assert rel(ours, theirs) <= 1e-5

    back, cfg_back, other = lora.load_peft(tmp_path / "lora")
    assert (cfg_back.rank, cfg_back.alpha, other) == (4, 8.0, []) and back.keys() == adapter.keys()
    assert all(np.array_equal(back[n][k], adapter[n][k]) for n in adapter for k in "AB")


def test_files_made_elsewhere_and_mistakes(tiny, tmp_path):
    _, models = tiny
    params = mapping.module_params(models.unet)
    adapter = moved(lora.init(params, lora.LoRAConfig(rank=2), seed=0))
    name = sorted(adapter)[0]
    tensors = {f"unet.{n}.lora_{k}.weight": f[k] for n, f in adapter.items() for k in "AB"}
    # kohya-style per-layer alpha and a text-encoder adapter beside it, no metadata
    extra = {f"unet.{n}.alpha": np.array(1.0, np.float32) for n in adapter}
    extra["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((2, 8), np.float32)
    save_safetensors({**tensors, **extra}, tmp_path / "other.safetensors")
    back, cfg, other = lora.load_peft(tmp_path / "other.safetensors")
    assert cfg.alpha == 1.0 and cfg.scale == 0.5
    assert other == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    # no alpha at all: diffusers' assumption, alpha = rank
    save_safetensors(tensors, tmp_path / "plain.safetensors")
    assert lora.load_peft(tmp_path / "plain.safetensors")[1].scale == 1.0

    wrong = dict(tensors)
    wrong[f"unet.{name}.lora_A.weight"] = np.zeros((2, 5), np.float32)
    save_safetensors(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(lora.LoRAError, match=f"{name}: lora_A \\(2, 5\\) and lora_B .* do not fit the layer"):
        lora.check(params, lora.load_peft(tmp_path / "wrong.safetensors")[0])
    ranks = dict(tensors)
    ranks[f"unet.{name}.lora_A.weight"] = np.zeros((3, adapter[name]["A"].shape[1]), np.float32)
    ranks[f"unet.{name}.lora_B.weight"] = np.zeros((adapter[name]["B"].shape[0], 3), np.float32)
    save_safetensors(ranks, tmp_path / "ranks.safetensors")
    with pytest.raises(lora.LoRAError, match="needs one rank, this one has \\[2, 3\\]"):
        lora.load_peft(tmp_path / "ranks.safetensors")
    save_safetensors({"unet.nowhere.to_q.lora_A.weight": np.zeros((2, 4), np.float32),
                      "unet.nowhere.to_q.lora_B.weight": np.zeros((4, 2), np.float32)}, tmp_path / "alien.safetensors")
    with pytest.raises(lora.LoRAError, match="nowhere.to_q: no such layer in this UNet"):
        lora.check(params, lora.load_peft(tmp_path / "alien.safetensors")[0])
    save_safetensors({"text_encoder.x.lora_A.weight": np.zeros((2, 4), np.float32)}, tmp_path / "te.safetensors")
    with pytest.raises(lora.LoRAError, match="no UNet LoRA factors .* start with text_encoder"):
        lora.load_peft(tmp_path / "te.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(lora.LoRAError, match="not a safetensors LoRA file"):
        lora.load_peft(tmp_path / "junk.safetensors")
    meta = json.loads(_metadata(lora.save_peft(adapter, lora.LoRAConfig(rank=2, alpha=4), tmp_path / "m.safetensors")))
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 4.0
    assert sorted(meta["unet.target_modules"]) == sorted(adapter)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()[lora.METADATA_KEY]


def test_an_adapter_used_without_merging_by_the_pipeline_and_sample_py(tmp_path):
    """PaintByExample.from_pretrained(base, lora=FILE, lora_scale=S) and sample.py --lora FILE --lora-scale S
    edit as the folder with the adapter merged at S · alpha / rank does, bit for bit; a bad file is one line."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from pbe_jax.pipeline import PaintByExample

    root = Path(__file__).resolve().parents[1]
    shipped, example = root / "checkpoints" / "synthetic", root / "examples" / "synthetic"
    models = load(shipped)
    cfg = lora.LoRAConfig(rank=2, alpha=4.0)
    adapter = moved(lora.init(mapping.module_params(models.unet), cfg, seed=3), size=0.05)
    path = lora.save_peft(adapter, cfg, tmp_path / "adapter")
    lora.apply(models.unet, adapter, cfg.scale * 0.5)
    save(models, tmp_path / "merged", format="jax")

    inputs = [np.asarray(Image.open(example / f"{n}.png")) for n in ("source", "mask", "reference")]
    kw = dict(steps=4, sampler="ddim", height=64, width=64, seed=5)
    with_lora = PaintByExample.from_pretrained(shipped, lora=path, lora_scale=0.5)(*inputs, **kw)
    np.testing.assert_array_equal(with_lora, PaintByExample.from_pretrained(tmp_path / "merged")(*inputs, **kw))
    assert not np.array_equal(with_lora, PaintByExample.from_pretrained(shipped)(*inputs, **kw))

    run = lambda *a: subprocess.run([sys.executable, str(root / "sample.py"), *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=root)
    r = run("--lora", str(tmp_path / "adapter"), "--lora-scale", "0.5", "--steps", "4", "--sampler", "ddim",
            "--seed", "5", "--out", str(tmp_path / "out.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), with_lora[0])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    r = run("--lora", str(tmp_path / "bad.safetensors"))
    assert r.returncode == 1 and "not a safetensors LoRA file" in r.stderr and "Traceback" not in r.stderr


def test_lora_training_starts_at_the_base_moves_only_the_adapter_and_exports_both_ways(tmp_path):
    """train.py model.lora.rank=R: the first step's loss is the base model's, bit for bit; only the adapter's
    factors change (the whole base is frozen, storable in bf16); the export is the merged folder and
    lora/pytorch_lora_weights.safetensors, which PaintByExample.from_pretrained(base, lora=…) reads back into
    the same model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pbe_jax import parallel
    from pbe_jax.pipeline import PaintByExample
    from pbe_jax.train import config as config_lib
    from pbe_jax.train.loop import make_loader
    from pbe_jax.train.trainer import build_trainer, models_of
    from pbe_jax.train.step import StepConfig, loss_fn
    from pbe_jax.diffusion import NoiseSchedule

    micro = ["data.size=64", "data.image_size=32", "data.batch_size=4", "optim.warmup_steps=1", "optim.lr=1e-2",
             "cond_drop=0.0", "model.dtype=float32"]
    base_cfg = config_lib.override(config_lib.load("tiny"), micro)
    cfg = config_lib.override(base_cfg, ["model.lora.rank=4", "model.lora.alpha=8",
                                         "model.lora.targets=['attention','ff']", "model.lora.train=['bottleneck']"])
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    models = models_of(base_cfg)
    trainer = build_trainer(cfg, models=models, mesh=mesh)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainer.state.params)}
    adapter_names = {n for n in names if n.startswith("lora.factors.")}
    assert adapter_names and all(n.endswith((".A", ".B")) for n in adapter_names)
    assert names - adapter_names == {n for n in names if n.startswith(lora.PARTS["bottleneck"])}  # and the bottleneck
    frozen = {".".join(map(str, p)).split(".")[0] for p, _ in nnx.to_flat_state(trainer.state.frozen)}
    assert frozen == {"unet", "vae", "image_encoder"}  # the rest of the base model
    small = build_trainer(config_lib.override(cfg, ["model.frozen_dtype=bfloat16"]), models=models_of(base_cfg),
                          mesh=mesh)
    assert {x.dtype for x in jax.tree.leaves(small.state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(small.state.params)} == {jnp.dtype(jnp.float32)}

    with make_loader(cfg, seed=0) as loader:
        batch = jax.tree.map(jnp.asarray, next(loader))
    key = jax.random.key(7)
    # scale 0 skips the merge: the frozen base UNet as loaded
    loss = lambda t, scale: jax.jit(lambda p, f: loss_fn(p, f, t.graphdef, batch, key, NoiseSchedule(),  # noqa: E731
                                                         StepConfig(cond_drop=0.0, lora_scale=scale)))(
        t.state.params, t.state.frozen)
    assert float(loss(trainer, 2.0)) == float(loss(trainer, 0.0))  # B = 0: the base model exactly
    frozen0 = jax.tree.map(np.asarray, trainer.state.frozen)
    params0 = dict(nnx.to_flat_state(jax.tree.map(np.asarray, trainer.state.params)))
    for _ in range(3):
        trainer.state, metrics = trainer.step_fn(trainer.state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), frozen0, trainer.state.frozen))
    moved_b = [p for p, v in nnx.to_flat_state(trainer.state.params)
               if p[-1] == "B" and not np.array_equal(params0[p].get_value(), np.asarray(v.get_value()))]
    assert moved_b
    assert float(loss(trainer, 2.0)) != float(loss(trainer, 0.0))

    trainer.export(tmp_path / "export")
    assert (tmp_path / "export" / "lora" / lora.FILE_NAME).is_file()
    assert (tmp_path / "export" / "lora" / lora.PARTS_FILE).is_file()
    adapter, file_cfg, other = lora.load_peft(tmp_path / "export" / "lora")
    assert (file_cfg.rank, file_cfg.alpha, other) == (4, 8.0, [])
    save(trainer.models().__class__(models.unet, models.vae, models.image_encoder, dict(trainer.extra_configs)),
         tmp_path / "base", format="diffusers")  # the base, as the run started from it
    merged = PaintByExample.from_pretrained(tmp_path / "export")
    via_file = PaintByExample.from_pretrained(tmp_path / "base", lora=tmp_path / "export" / "lora")
    for component in ("unet", "image_encoder"):
        ours, theirs = (mapping.module_params(getattr(p.models, component)) for p in (merged, via_file))
        for path, a in ours.items():
            np.testing.assert_array_equal(a, theirs[path], err_msg=f"{component} {path}")
    key = ("proj_out", "kernel")  # the bottleneck trained beside the adapter
    assert not np.array_equal(mapping.module_params(merged.models.image_encoder)[key],
                              mapping.module_params(models.image_encoder)[key])


def test_a_lora_step_with_remat_computes_the_step_without_it():
    """model.remat=True (the 24 GB card's setting) with LoRA: nnx.remat writes back into the frozen UNet's
    variables, which must belong to the gradient's trace (it failed to trace before); recomputing changes
    nothing in the step's loss and the adapter's update."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pbe_jax import parallel
    from pbe_jax.train import config as config_lib
    from pbe_jax.train.loop import make_loader
    from pbe_jax.train.trainer import build_trainer, models_of

    micro = ["data.size=64", "data.image_size=32", "data.batch_size=2", "optim.warmup_steps=1", "optim.lr=1e-2",
             "model.dtype=float32", "model.lora.rank=2", "ema_decay=0"]
    cfg = config_lib.override(config_lib.load("tiny"), micro)
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    with make_loader(cfg, seed=0) as loader:
        batch = jax.tree.map(jnp.asarray, next(loader))
    out = {}
    for remat in (False, True):
        trainer = build_trainer(config_lib.override(cfg, [f"model.remat={remat}"]), models=models_of(cfg), mesh=mesh)
        state, metrics = trainer.step_fn(trainer.state, batch)
        out[remat] = float(metrics["loss"]), dict(nnx.to_flat_state(jax.tree.map(np.asarray, state.params)))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for path, v in out[False][1].items():
        np.testing.assert_allclose(out[True][1][path].get_value(), v.get_value(), rtol=1e-5, atol=1e-7,
                                   err_msg=str(path))

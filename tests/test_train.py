"""Training: config, initialisation, the step, sharding (8 fake devices, two processes), checkpoints that
survive SIGKILL and SIGTERM (preemption) in a bucket and on two processes, NaN handling and train.py end to
end."""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbe_jax import parallel
from pbe_jax.convert.build import build_models
from pbe_jax.convert.source import ModelSource
from pbe_jax.train import config as config_lib

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["data.size=64", "data.image_size=32", "data.batch_size=4", "log_every=1", "optim.warmup_steps=1",
         "optim.lr=1e-3"]


def micro_config(*extra):
    return config_lib.override(config_lib.load("tiny"), MICRO + list(extra))


def run_train(workdir, *extra, timeout=600, wait=True):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(workdir), *MICRO, *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def final_params_of(folder):
    from pbe_jax.convert import load, mapping

    return {k: mapping.module_params(m) for k, m in load(folder).components().items()}


def final_params(workdir):
    return final_params_of(Path(workdir) / "export")


def test_config_overrides_and_errors():
    cfg = config_lib.override(config_lib.load("tiny"), ["data.batch_size=4", "optim.lr=2e-4",
                                                        "model.unet.norm_num_groups=4", "model.trainable=['unet']"])
    assert cfg.data.batch_size == 4 and cfg.optim.lr == 2e-4 and cfg.model.unet["norm_num_groups"] == 4
    assert cfg.model.trainable == ("unet",)
    # A list of bare words, as the shell passes `model.lora.train=[conv_in,bottleneck]` unquoted, is a tuple of them.
    words = config_lib.override(cfg, ["model.lora.train=[conv_in, bottleneck]", "data.extra_colours=pink",
                                      "model.lora.targets=[]"])
    assert words.model.lora.train == ("conv_in", "bottleneck") and words.data.extra_colours == ("pink",)
    assert words.model.lora.targets == ()
    with pytest.raises(ValueError, match="unknown config key 'data.batchsize'"):
        config_lib.override(cfg, ["data.batchsize=3"])
    with pytest.raises(FileNotFoundError, match="named configs: .*tiny"):
        config_lib.load("nope")
    assert config_lib.load("sd14").model.init == "sd"
    # from_dict inverts to_dict (through JSON, as a checkpoint stores it), tuples included.
    for name in ("tiny", "synthetic", "sd14"):
        saved = json.loads(json.dumps(config_lib.to_dict(config_lib.load(name))))
        assert config_lib.from_dict(saved) == config_lib.load(name)
    assert config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match=r"config.optim: unknown keys lrate"):
        config_lib.from_dict({"optim": {"lrate": 1.0}})
    changed = config_lib.override(cfg, ["optim.lr=1e-3", "model.unet.norm_num_groups=8", "bezier_mask_p=0.0"])
    assert config_lib.differences(saved, saved) == []
    assert config_lib.differences(config_lib.to_dict(cfg), config_lib.to_dict(changed)) == [
        "bezier_mask_p: 0.5 → 0.0", "model.unet.norm_num_groups: 4 → 8", "optim.lr: 0.0002 → 0.001"]


def test_init_from_stable_diffusion(tmp_path):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    from pbe_jax.convert import mapping
    from pbe_jax.convert.init import from_stable_diffusion
    from pbe_jax.parity import reference

    torch.manual_seed(0)
    unet_cfg = {**reference.TINY["sd"]["unet"], "in_channels": 4}
    sd_unet = UNet2DConditionModel(**unet_cfg)
    sd_unet.save_pretrained(tmp_path / "sd" / "unet")
    AutoencoderKL(**reference.TINY["sd"]["vae"]).save_pretrained(tmp_path / "sd" / "vae")
    vision = {k: v for k, v in reference.TINY["sd"]["image_encoder"].items() if k != "projection_dim"}
    clip = CLIPModel(CLIPConfig(vision_config=vision, projection_dim=12, text_config=dict(
        hidden_size=16, intermediate_size=20, num_attention_heads=2, num_hidden_layers=1, vocab_size=50000)))
    clip.save_pretrained(tmp_path / "clip")

    models = from_stable_diffusion(tmp_path / "sd", tmp_path / "clip")
    source = ModelSource(init="sd", sd_folder=str(tmp_path / "sd"), clip_folder=str(tmp_path / "clip"))
    assert_same_networks(build_models(source), build_models(source, abstract=True))
    kernel = np.asarray(models.unet.conv_in.kernel[...])  # HWIO
    assert kernel.shape[2] == 9 and np.all(kernel[:, :, 4:] == 0)
    np.testing.assert_array_equal(kernel[:, :, :4], sd_unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert models.image_encoder.config.projection_dim == 24  # the UNet's cross-attention width
    enc = mapping.module_params(models.image_encoder)
    q = clip.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(enc[("model", "vision_model", "encoder", "layers", 0, "self_attn", "q_proj",
                                       "kernel")], q.T)
    assert np.abs(enc[("proj_out", "kernel")]).max() > 0  # the bottleneck is initialised, not zero
    with pytest.raises(ValueError, match="in_channels is 9"):
        from_stable_diffusion(reference.save_tiny(tmp_path / "pbe", "sd"), tmp_path / "clip")


def assert_same_networks(models, shapes):
    """Two builds of the same networks (one may be shapes only) agree: configs, extra configs, every
    parameter's path, shape and dtype."""
    assert models.extra_configs == shapes.extra_configs
    for name, module in models.components().items():
        other = shapes.components()[name]
        assert module.config == other.config, name
        flat = lambda m: {p: (tuple(v.get_value().shape), v.get_value().dtype)  # noqa: E731
                          for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
        assert flat(module) == flat(other), name


def test_one_builder_for_every_init_with_weights_or_shapes(tiny_folder):
    """convert.build_models: a Paint-by-Example folder, its components under a new UNet, a config from scratch
    (SD v1.x: test_init_from_stable_diffusion), built with weights and from shapes alone, agree; bad inits and
    sources are errors that name the keys."""
    folder = Path(tiny_folder("sd"))  # a tiny Paint-by-Example pipeline in SD-1.x's layout
    micro = micro_config().model
    for source in (ModelSource.pretrained(folder), micro,
                   ModelSource(init="components", vae_folder=str(folder / "vae"), unet=micro.unet,
                               image_encoder_folder=str(folder / "image_encoder"))):
        shapes = build_models(source, abstract=True)
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(shapes.unet)))
        assert_same_networks(build_models(source), shapes)
    with pytest.raises(ValueError, match="model.init must be 'sd', 'pbe', 'components' or 'scratch', not 'bogus'"):
        build_models(ModelSource(init="bogus"), abstract=True)
    with pytest.raises(ValueError, match="model.pbe_folder and model.pbe_file, not both"):
        build_models(ModelSource(init="pbe", pbe_folder="a", pbe_file="b"))


def test_step_updates_only_trainable_parts_and_learns():
    from pbe_jax.train.loop import make_loader
    from pbe_jax.train.trainer import build_trainer
    from pbe_jax.train.step import StepConfig, loss_fn

    cfg = micro_config("ema_decay=0.9", "cond_drop=0.0")
    trainer = build_trainer(cfg, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    batch = jax.tree.map(jnp.asarray, next(make_loader(cfg, seed=0)))
    frozen0 = jax.tree.map(np.asarray, trainer.state.frozen)
    params0 = jax.tree.map(np.asarray, trainer.state.params)
    from pbe_jax.diffusion import NoiseSchedule

    probe = jax.jit(lambda p, f: loss_fn(p, f, trainer.graphdef, batch, jax.random.key(123), NoiseSchedule(),
                                         StepConfig(cond_drop=0.0)))
    before = float(probe(trainer.state.params, trainer.state.frozen))
    for _ in range(15):
        trainer.state, metrics = trainer.step_fn(trainer.state, batch)
    after = float(probe(trainer.state.params, trainer.state.frozen))
    assert after < 0.8 * before, (before, after)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), frozen0, trainer.state.frozen))
    before_flat = dict(nnx.to_flat_state(params0))
    unchanged = {".".join(map(str, p)) for p, v in nnx.to_flat_state(trainer.state.params)
                 if np.array_equal(np.asarray(before_flat[p].get_value()), np.asarray(v.get_value()))}
    # With a one-token context the cross-attention's query cannot change the output (softmax over one key),
    # so norm2 gets no gradient; its zero bias stays zero even under weight decay. Everything else moves.
    assert unchanged and all(n.endswith("norm2.bias") for n in unchanged), unchanged
    assert not jax.tree.all(jax.tree.map(lambda e, p: np.array_equal(np.asarray(e), np.asarray(p)),
                                         trainer.state.ema, trainer.state.params))
    assert int(trainer.state.step) == 15
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainer.state.params)}
    assert any(n.startswith("image_encoder.mapper.") for n in names)
    assert not any(n.startswith(("vae.", "image_encoder.model.")) for n in names)


def test_step_compiled_from_shapes_alone_runs_on_the_real_state():
    """abstract_trainer: the real step lowered from shapes (how bench/full_size_cpu.py compiles SD-1.4 size
    without weights) accepts the state build_trainer makes, and its memory analysis counts exactly it."""
    from pbe_jax.train.loop import make_loader
    from pbe_jax.train.trainer import abstract_trainer, batch_spec, build_trainer

    cfg = micro_config("model.remat=True", "model.frozen_dtype=bfloat16")
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    shapes = abstract_trainer(cfg, mesh=mesh)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes.state))
    real = build_trainer(cfg, mesh=mesh)
    assert jax.tree.structure(shapes.state) == jax.tree.structure(real.state)
    assert ([(x.shape, x.dtype) for x in jax.tree.leaves(shapes.state)]
            == [(x.shape, x.dtype) for x in jax.tree.leaves(real.state)])
    assert {x.dtype for x in jax.tree.leaves(real.state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    with make_loader(cfg, seed=0) as loader:
        batch = jax.tree.map(jnp.asarray, next(loader))
    spec = batch_spec(cfg)
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    compiled = shapes.step_fn.lower(shapes.state, spec).compile()
    nbytes = sum(x.nbytes for x in jax.tree.leaves((real.state, batch)))
    assert compiled.memory_analysis().argument_size_in_bytes == nbytes
    state, metrics = compiled(real.state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_condition_dropout():
    from pbe_jax.diffusion import NoiseSchedule
    from pbe_jax.train.loop import make_loader
    from pbe_jax.train.trainer import models_of
    from pbe_jax.train.state import Nets
    from pbe_jax.train.step import StepConfig, prepare

    cfg = micro_config()
    nets = Nets(models_of(cfg))
    batch = jax.tree.map(jnp.asarray, next(make_loader(cfg, seed=0)))
    uncond = np.asarray(nets.image_encoder.uncond(4))
    for p, group in ((1.0, 1), (1.0, 4), (0.0, 1)):
        _, _, cond, _ = prepare(nets, batch, jax.random.key(0), NoiseSchedule(), StepConfig(p, group))
        same = np.all(np.isclose(np.asarray(cond), uncond), axis=(1, 2))
        assert same.all() == (p == 1.0) and (not same.any()) == (p == 0.0)
    # cond_drop_group=2: rows (0, 1) and (2, 3) each share one decision (the original: one per GPU batch);
    # per sample (1) the rows of a batch differ for some key
    decisions = {1: set(), 2: set()}
    for group in decisions:
        for seed in range(12):
            _, _, cond, _ = prepare(nets, batch, jax.random.key(seed), NoiseSchedule(), StepConfig(0.5, group))
            decisions[group].add(tuple(np.all(np.isclose(np.asarray(cond), uncond), axis=(1, 2))))
    assert all(d[0] == d[1] and d[2] == d[3] for d in decisions[2]) and len(decisions[2]) > 1
    assert any(d[0] != d[1] or d[2] != d[3] for d in decisions[1])


def test_ablation_switches_turn_the_augmentations_off():
    """bezier_mask_p=0: the mask is the extended box; reference_augment=False: the condition is the plain
    resized reference's. Both then stop depending on the step's key; with them on, they do depend on it."""
    from pbe_jax.data.augment import NO_AUGMENTATION, augment_references
    from pbe_jax.diffusion import NoiseSchedule
    from pbe_jax.train.loop import make_loader
    from pbe_jax.train.trainer import models_of
    from pbe_jax.train.state import Nets
    from pbe_jax.train.step import StepConfig, prepare

    cfg = micro_config()
    nets = Nets(models_of(cfg))
    batch = jax.tree.map(jnp.asarray, next(make_loader(cfg, seed=0)))

    def keep_and_cond(step_cfg, seed):
        x, _, cond, _ = prepare(nets, batch, jax.random.key(seed), NoiseSchedule(), step_cfg)
        return np.asarray(x[..., -1]), np.asarray(cond)

    off = StepConfig.from_train_config(micro_config("cond_drop=0.0", "bezier_mask_p=0.0", "reference_augment=False"))
    keep, cond = keep_and_cond(off, 0)
    keep_other, cond_other = keep_and_cond(off, 1)
    np.testing.assert_array_equal(keep, keep_other)
    np.testing.assert_array_equal(cond, cond_other)
    import torch
    import torch.nn.functional as F

    s = batch["image"].shape[1]
    centres = np.arange(s) + 0.5
    for b, (x0, y0, x1, y1) in enumerate(np.asarray(batch["box_ext"])):
        inside = (centres[None, :] >= x0) & (centres[None, :] < x1) & (centres[:, None] >= y0) & (centres[:, None] < y1)
        # at latent size as the original resizes it (torchvision's bilinear Resize of the tensor)
        expected = F.interpolate(torch.from_numpy(1.0 - inside.astype(np.float32))[None, None], size=keep.shape[1:],
                                 mode="bilinear", align_corners=False, antialias=False)[0, 0].numpy()
        np.testing.assert_allclose(keep[b], expected, atol=1e-6)
    plain = augment_references(jax.random.key(0), batch["reference"], size=nets.image_encoder.config.image_size,
                               **NO_AUGMENTATION)
    np.testing.assert_allclose(cond, np.asarray(nets.image_encoder.bottleneck(nets.image_encoder.model(plain)[1])),
                               atol=1e-5)

    on = StepConfig(cond_drop=0.0, bezier_mask_p=1.0, reference_augment=True)
    keep, cond = keep_and_cond(on, 0)
    keep_other, cond_other = keep_and_cond(on, 1)
    assert not np.array_equal(keep, keep_other) and not np.allclose(cond, cond_other, atol=1e-5)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {root!r})
from tests.test_train import micro_config
from pbe_jax import parallel
from pbe_jax.convert.build import build_models
from pbe_jax.convert.source import ModelSource
from pbe_jax.train.loop import make_loader
from pbe_jax.train.trainer import build_trainer
assert len(jax.devices()) == 8
# The state is born on the mesh (params placed, frozen towers cast as placed, AdamW's moments, EMA, step and
# RNG made by one jit with the state's shardings as outputs): exactly the state created whole on the host and
# then placed, leaf for leaf and bit for bit, in bf16 frozen towers and with EMA.
from pbe_jax.train import state as train_state
from pbe_jax.train.trainer import models_of
cfg = micro_config("model.frozen_dtype=bfloat16", "ema_decay=0.9")
t = build_trainer(cfg, mesh=parallel.make_mesh(1, 8))
_, params, frozen = train_state.split(models_of(cfg), cfg.model.trainable)
whole = train_state.create(params, jax.tree.map(lambda a: a.astype(jnp.bfloat16), frozen),
                           train_state.make_optimizer(cfg.optim), ema=True, seed=cfg.seed)
assert jax.tree.structure(whole) == jax.tree.structure(t.state)
for a, b, s in zip(jax.tree.leaves(whole), jax.tree.leaves(t.state), jax.tree.leaves(t.shardings)):
    assert b.sharding == s and a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(t.state.opt_state))
batches = [next(it) for it in [make_loader(micro_config("data.batch_size=8"), seed=0)] for _ in range(2)]
# data parallel over 2 and fsdp over 4 at once: the batch split one way, the parameters the other (a pure
# data-parallel mesh is the same program with fsdp 1, and its gradient all-reduce is this one's over "data").
# Full fine-tuning, and LoRA, whose adapter's B·A is merged into the frozen UNet's fsdp-split weights.
for lora in ([], ["model.lora.rank=2"]):
    cfg = micro_config("data.batch_size=8", *lora)
    results = {{}}
    for name, data, fsdp in (("single", 1, 1), ("fsdp", 2, 4)):
        devices = jax.devices()[:1] if name == "single" else jax.devices()
        t = build_trainer(cfg, mesh=parallel.make_mesh(data, fsdp, devices=devices))
        losses = []
        for b in batches:
            t.state, m = t.step_fn(t.state, parallel.global_batch(b, t.mesh))
            losses.append(float(m["loss"]))
        results[name] = (losses, jax.tree.map(np.asarray, t.state.params))
        if name == "fsdp":
            split = t.state.frozen if lora else t.state.params  # LoRA: the frozen UNet is what is large
            specs = {{str(x.sharding.spec) for x in jax.tree.leaves(split)}}
            assert any("fsdp" in s for s in specs), specs
    (ref_l, ref_p), (l, p) = results["single"], results["fsdp"]
    np.testing.assert_allclose(l, ref_l, rtol=1e-4)
    err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p, ref_p)))
    assert err < 1e-4, (lora, err)
    print("OK", lora, ref_l)
"""


def test_sharded_step_equals_single_device():
    from conftest import xla_env  # here, not at the top: the subprocess imports this module without tests/ on its path

    env = xla_env(xla_force_host_platform_device_count=8)
    r = subprocess.run([sys.executable, "-c", SHARDED.format(root=str(ROOT))], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0 and r.stdout.count("OK") == 2, r.stdout[-2000:] + r.stderr[-3000:]


def assert_same_params(a, b):
    for comp in a:
        assert a[comp].keys() == b[comp].keys()
        for path in a[comp]:
            np.testing.assert_array_equal(a[comp][path], b[comp][path], err_msg=f"{comp} {path}")


def wait_for(path, proc, seconds=300):
    """Until `path` exists (polled afresh: gcsfs caches listings), or fail with what the process printed."""
    from pbe_jax import storage

    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        storage.refresh(path)
        if storage.path(path).exists():
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"{path} never appeared: {proc.communicate()[1][-3000:]}")


def tensorboard_steps(data: bytes) -> int:
    """The last step of a TensorBoard event file, read record by record (length, crc, event, crc)."""
    from tensorboard.compat.proto import event_pb2

    last, at = -1, 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        last = max(last, event_pb2.Event.FromString(data[at + 12:at + 12 + length]).step)
        at += 12 + length + 4
    assert at == len(data)
    return last


def preempted_step(stdout: str) -> int:
    return int(stdout.split("preempted: checkpoint at step ")[1].split()[0])


# The interrupted runs train "forever"; how far they got is known only once they stop, so the run they must
# reproduce is made afterwards, to the same step (the total step count and the checkpoint cadence change
# nothing in the training).
FOREVER = ["steps=1000", "ckpt_every=8", "sample_every=0"]


LORA = ["model.lora.rank=2", "model.lora.alpha=4"]


def test_killed_then_preempted_in_a_bucket_resumes_bit_identically(bucket_dir, tmp_path):
    """train.py --workdir gs://…: SIGKILL after a checkpoint; --resume from the bucket, SIGTERM twice (the second
    during the save): a checkpoint at the interrupted step, exit 0, the resume command; --resume to the end and
    the export in the bucket equal an uninterrupted run bit for bit. With LoRA on (model.lora.rank): the adapter
    is part of the checkpointed state, and the adapter file of the export is bit-identical too (full
    fine-tuning is resumed by the two-process test below)."""
    from pbe_jax import storage

    run = str(bucket_dir / "run")
    proc = run_train(run, *LORA, *FOREVER, wait=False)
    wait_for(f"{run}/checkpoints/8/commit_success.txt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from pbe_jax.train.loop import train

    with pytest.raises(FileExistsError, match="already has checkpoints; pass --resume"):  # nothing touched
        train(micro_config(*LORA, *FOREVER), run)

    proc = run_train(run, *LORA, *FOREVER, "--resume", wait=False)
    wait_for(f"{run}/checkpoints/16/commit_success.txt", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # while the step finishes or the checkpoint is written
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from step 8" in out
    step = preempted_step(out)
    assert step >= 16, out
    assert f"saved in {run}/checkpoints; resume with: python train.py" in out and out.rstrip().endswith("--resume")
    storage.refresh(run)
    assert storage.path(f"{run}/checkpoints/{step}/commit_success.txt").exists()
    metrics = [json.loads(x) for x in storage.path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == step  # the metrics in the bucket reach the checkpoint

    end = f"steps={step + 3}"
    resumed = run_train(run, *LORA, end, "ckpt_every=8", "sample_every=0", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step}" in resumed.stdout
    assert f"config differs from the one saved with step {step}: steps: 1000 → {step + 3}" in resumed.stdout
    whole = run_train(tmp_path / "whole", *LORA, end, "ckpt_every=1000", "sample_every=0")
    assert whole.returncode == 0, whole.stderr[-3000:]
    storage.refresh(run)
    assert_same_params(final_params(tmp_path / "whole"), final_params_of(f"{run}/export"))
    from pbe_jax import lora

    a, b = (lora.load_peft(f"{folder}/export/lora")[0] for folder in (run, tmp_path / "whole"))
    assert a.keys() == b.keys() and all(np.array_equal(a[n][k], b[n][k]) for n in a for k in "AB")
    assert any(b[n]["B"].any() for n in b)  # the adapter trained
    # TensorBoard: one event file per session in the bucket, complete records, the last one at the last step.
    events = sorted(storage.names(f"{run}/tensorboard"))
    assert len(events) == 3 and all(name.startswith("events.out.tfevents.") for name in events)
    assert max(tensorboard_steps(storage.path(f"{run}/tensorboard/{name}").read_bytes()) for name in events) == step + 3


def run_two(workdir, *extra):
    """train.py on two processes on localhost (gloo), the parameters split over both (fsdp)."""
    from conftest import free_port

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
           "JAX_NUM_PROCESSES": "2"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(workdir), *MICRO,
           "distributed=True", "mesh_data=1", "mesh_fsdp=2", *extra]
    return [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]


def finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def folder_with_bad_files_in_one_share(root, n=24):
    """n small photos with one box each, as a JSONL folder; in the second half (process 1's share of two) a
    missing file, a truncated JPEG, a decompression bomb and an image whose box lies outside it."""
    from bad_images import bomb_png, truncated_jpeg
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"{i}.jpg", quality=90)
        rows.append({"path": f"{i}.jpg", "boxes": [[4, 5, 40, 36]]})
    (root / "13.jpg").unlink()
    (root / "15.jpg").write_bytes(truncated_jpeg(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)))
    (root / "17.jpg").write_bytes(bomb_png())
    rows[19]["boxes"] = [[60, 50, 90, 80]]
    (root / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ["data.source=folder", f"data.folder={root}", f"data.annotations={root / 'ann.jsonl'}"]


def batch_log(workdir, process):
    rows = [json.loads(x) for x in (Path(workdir) / "batches" / f"process_{process}.jsonl").read_text().splitlines()]
    return {r["step"]: r["sha256"] for r in rows}


def last_metrics(workdir):
    return json.loads((Path(workdir) / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_processes_preempted_agree_on_the_step_and_resume_bit_identically(tmp_path):
    """Two processes, parameters split over both, reading a folder where process 1's share has a missing file, a
    truncated JPEG, a decompression bomb and an image without a usable box, so the processes' data positions
    differ. SIGTERM (twice) to one process only: both checkpoint the same step (JAX's preemption sync point) and
    exit 0. Resumed to the end with another number of data workers (with a sample grid drawn by process 0 from
    weights gathered on both, and the export), each process's batches equal an uninterrupted two-process run's,
    batch for batch, the skip counters summed over both processes equal too, and the parameters bit for bit."""
    data = [*folder_with_bad_files_in_one_share(tmp_path / "photos"), "log_batches=True"]
    procs = run_two(tmp_path / "run", *data, *FOREVER)
    wait_for(tmp_path / "run" / "checkpoints" / "8" / "commit_success.txt", procs[0])
    procs[1].send_signal(signal.SIGTERM)
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    steps = [preempted_step(out) for out in finish(procs)]
    assert steps[0] == steps[1] and steps[0] >= 8, steps
    assert (tmp_path / "run" / "checkpoints" / str(steps[0]) / "commit_success.txt").is_file()
    end = steps[0] + 3
    finish(run_two(tmp_path / "run", *data, f"steps={end}", "ckpt_every=8", f"sample_every={end}", "sample_steps=2",
                   "data.workers=1", "--resume"))
    assert (tmp_path / "run" / "samples" / f"step_{end:07d}.png").is_file()
    finish(run_two(tmp_path / "whole", *data, f"steps={end}", "ckpt_every=1000", "sample_every=0"))
    for process in range(2):
        resumed, whole = batch_log(tmp_path / "run", process), batch_log(tmp_path / "whole", process)
        assert sorted(resumed) == list(range(1, end + 1))
        assert resumed == whole, f"process {process}: batches differ at steps " \
                                 f"{[s for s in whole if resumed.get(s) != whole[s]]}"
    counts = {k: v for k, v in last_metrics(tmp_path / "whole").items() if k.startswith("data/")}
    assert {k: v for k, v in last_metrics(tmp_path / "run").items() if k.startswith("data/")} == counts
    for reason in ("missing", "unreadable", "decompression_bomb", "no_box"):  # all from process 1's share
        assert counts[f"data/rejected_{reason}"] >= 1, counts
    assert_same_params(final_params(tmp_path / "whole"), final_params(tmp_path / "run"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    r = run_train(tmp_path / "run", "steps=20", "ckpt_every=1", "optim.lr=1e30", "optim.clip_norm=0")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "last good checkpoint is step" in r.stderr
    good = int(r.stderr.split("last good checkpoint is step")[1].split()[0])
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == good


def test_train_cli_writes_metrics_samples_and_a_loadable_export(tmp_path, monkeypatch):
    r = run_train(tmp_path / "run", "steps=4", "ckpt_every=2", "sample_every=4", "sample_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all(np.isfinite(x["loss"]) for x in lines)
    assert "samples_per_s" in lines[-1] and "data/examples" in lines[-1]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "samples" / "step_0000004.png").is_file()
    again = run_train(tmp_path / "run", "steps=4")
    assert again.returncode == 1 and "pass --resume" in again.stderr

    from pbe_jax.pipeline import PaintByExample

    pipe = PaintByExample.from_pretrained(tmp_path / "run" / "export")
    assert pipe.default_size == 32  # the export records the size it was trained at (data.image_size)
    vae = json.loads((tmp_path / "run" / "export" / "vae" / "config.json").read_text())
    unet = json.loads((tmp_path / "run" / "export" / "unet" / "config.json").read_text())
    assert (vae["sample_size"], unet["sample_size"]) == (32, 32 // 2 ** (len(vae["block_out_channels"]) - 1))
    rgb = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    out = pipe(rgb, mask, rgb, steps=2, height=32, width=32)
    assert out.shape == (1, 32, 32, 3)

    # --export rebuilds the model from the config saved with a checkpoint: the latest gives the run's own export
    # bit for bit, an earlier step other weights. The networks are built from shapes only (as a resumed run's
    # are): every array, the frozen towers included, comes from the checkpoint.
    from pbe_jax.train import trainer as trainer_lib
    from pbe_jax.train.loop import export_checkpoint

    built, build = [], trainer_lib.build_models
    monkeypatch.setattr(trainer_lib, "build_models", lambda *a, **k: built.append(k["abstract"]) or build(*a, **k))
    assert export_checkpoint(tmp_path / "run", out=tmp_path / "again") == (4, tmp_path / "again")
    assert export_checkpoint(tmp_path / "run", step=2) == (2, tmp_path / "run" / "export_2")
    assert built == [True, True]
    at_end, again, at_2 = (final_params(tmp_path / "run"), final_params_of(tmp_path / "again"),
                           final_params_of(tmp_path / "run" / "export_2"))
    flat = lambda params: {(c, k): v for c, p in params.items() for k, v in p.items()}  # noqa: E731
    assert flat(again).keys() == flat(at_end).keys() == flat(at_2).keys()
    assert all(np.array_equal(v, flat(again)[k]) for k, v in flat(at_end).items())
    unet = [k for k in flat(at_end) if k[0] == "unet"]
    assert not all(np.array_equal(flat(at_end)[k], flat(at_2)[k]) for k in unet)
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path / "run"), "--export", "3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "no checkpoint at step 3 (there are: 2, 4)" in bad.stderr


def test_train_cli_trains_from_prepared_shards(tmp_path):
    """A folder of photos prepared into shards (`python -m pbe_jax.data.prepare folder`), then train.py with
    data.source=shards: the run trains, and counts no rejected item (prepare kept only usable ones). Its
    checkpoint's data positions belong to those shards: --resume on other data is refused with one line, before
    the model is built."""
    from pbe_jax.data import prepare

    folder_with_bad_files_in_one_share(tmp_path / "photos")
    out = tmp_path / "shards"
    assert prepare.main(["folder", "--images", str(tmp_path / "photos"), "--annotations",
                         str(tmp_path / "photos" / "ann.jsonl"), "--out", str(out), "--min-side", "16",
                         "--images-per-shard", "8", "--min-box-area", "0.01"]) == 0
    r = run_train(tmp_path / "run", "data.source=shards", f"data.path={out}", "steps=2", "sample_every=0",
                  "export=False")
    assert r.returncode == 0, r.stderr[-3000:]
    m = last_metrics(tmp_path / "run")
    assert m["step"] == 2 and math.isfinite(m["loss"]) and m["data/examples"] == 8
    assert all(v == 0 for k, v in m.items() if k.startswith("data/rejected_"))
    r = run_train(tmp_path / "run", "data.source=synthetic", "steps=3", "--resume")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: cannot resume from step 2: data.path: '{out}' → ''; data.source: 'shards' → 'synthetic' since then, "
        f"so the saved data positions do not apply; resume with the saved values or use a new workdir")

"""The training loop: build or resume the sharded state, stream batches from the data pipeline, step,
log, checkpoint, draw sample grids, export. `train.py` is a thin CLI over `train()`."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import convert, lora, parallel, storage
from pbe_jax.batch import save_png
from pbe_jax.convert import init as initialise
from pbe_jax.convert.diffusers import read_config, read_json
from pbe_jax.convert.ldm_file import default_extras
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.models import CLIPVisionConfig, Policy, UNet2DConditionModel, UNetConfig, VAEConfig
from pbe_jax.train import state as train_state
from pbe_jax.train.checkpoint import Checkpoints, abstract
from pbe_jax.train.config import TrainConfig, differences, from_dict, to_dict
from pbe_jax.storage import Path, PathLike
from pbe_jax.train.metrics import MetricsWriter
from pbe_jax.train.preemption import Preempted, PreemptionWatch
from pbe_jax.train.step import StepConfig, train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says which step and which checkpoint is the last good one."""


def _init_source(m) -> str:
    """The folder or single file that model.init=sd|pbe starts from (exactly one of the two must be given)."""
    folder, file = (m.sd_folder, m.sd_file) if m.init == "sd" else (m.pbe_folder, m.pbe_file)
    if bool(folder) == bool(file):
        raise ValueError(f"model.init={m.init} needs one of model.{m.init}_folder and model.{m.init}_file"
                         + (f", not both ({folder}, {file})" if folder else ""))
    return folder or file


def build_models(cfg: TrainConfig) -> convert.PaintByExampleModels:
    m = cfg.model
    policy = Policy(dtype=jnp.dtype(m.dtype), attention_backend=m.attention)
    if m.init in ("sd", "pbe"):
        source = _init_source(m)
        if m.init == "sd":
            return initialise.from_stable_diffusion(source, m.clip_folder, policy=policy, seed=cfg.seed,
                                                    ema=m.ema)
        return initialise.from_paint_by_example(source, policy=policy, ema=m.ema)
    if m.init == "components":
        return convert.PaintByExampleModels(
            initialise.random_module(UNet2DConditionModel, UNetConfig.from_dict(m.unet, "model.unet"), policy,
                                     cfg.seed),
            convert.load_component(m.vae_folder, "vae", policy=policy),
            convert.load_component(m.image_encoder_folder, "image_encoder", policy=policy),
            _scratch_extras(cfg))
    if m.init == "scratch":
        return initialise.from_scratch(UNetConfig.from_dict(m.unet, "model.unet"),
                                       VAEConfig.from_dict(m.vae, "model.vae"),
                                       CLIPVisionConfig.from_dict(m.image_encoder, "model.image_encoder"),
                                       policy=policy, seed=cfg.seed, extra_configs=_scratch_extras(cfg))
    raise ValueError(f"model.init must be 'sd', 'pbe', 'components' or 'scratch', not {m.init!r}")


def _scratch_extras(cfg: TrainConfig) -> dict:
    """Sampling configs for a model trained here: the PLMS scheduler and the reference preprocessing."""
    return default_extras(cfg.data.reference_size)


def make_source(cfg: TrainConfig):
    from pbe_jax.data import sources

    d = cfg.data
    if d.source == "shards":
        from pbe_jax.data.shards import ShardSource

        if not d.path:
            raise ValueError("data.source=shards needs data.path: a folder written by python -m pbe_jax.data.prepare")
        return ShardSource(d.path)
    if d.source == "tfds":
        return sources.TfdsSource(d.name, d.split, data_dir=d.data_dir)
    if d.source == "folder":
        return sources.FolderSource(d.folder, annotations=d.annotations, box_frame=d.box_frame,
                                    max_short_side=d.max_short_side or None)
    if d.source == "synthetic":
        from pbe_jax.data.synthetic import SyntheticSource

        return SyntheticSource(d.size, seed=cfg.seed, image_size=d.scene_size or d.image_size,
                               extra_colours=d.extra_colours)
    raise ValueError(f"data.source must be 'shards', 'tfds', 'folder' or 'synthetic', not {d.source!r}")


# The data settings that decide which items each process reads, in which order: a data position saved under
# other values means nothing (data.workers, the batch size or the pair settings may change).
DATA_IDENTITY = ("source", "path", "name", "split", "data_dir", "folder", "annotations", "size", "scene_size",
                 "extra_colours")


class CannotResume(ValueError):
    """The checkpoint's data positions cannot be used with this run's settings; the message says what changed."""


def check_data_resumable(saved: dict, cfg: TrainConfig, step: int) -> None:
    """Before anything is built: the settings in DATA_IDENTITY (and the seed) must be those saved with `step`."""
    keys = {"seed", *(f"data.{k}" for k in DATA_IDENTITY)}
    changed = [d for d in differences(saved, to_dict(cfg)) if d.split(":")[0] in keys]
    if changed:
        raise CannotResume(f"cannot resume from step {step}: {'; '.join(changed)} since then, so the saved data "
                           f"positions do not apply; resume with the saved values or use a new workdir")


def own_data_state(saved: dict, step: int) -> dict:
    """This process's data position from the checkpoint's states of all processes."""
    states = saved.get("processes")
    if states is None:
        raise CannotResume(f"cannot resume from step {step}: its data position was saved by an older version "
                           f"(one for all processes); resume with that version or use a new workdir")
    if len(states) != jax.process_count():
        raise CannotResume(f"cannot resume from step {step}: it was saved by {len(states)} processes and this run "
                           f"has {jax.process_count()}; each process's data position belongs to its own share of "
                           f"the data, so resume with {len(states)} processes")
    return states[jax.process_index()]


def all_processes(value: Any) -> list:
    """`value` (JSON) from every process, in order; with several processes, a collective."""
    return parallel.gather_json(value) if jax.process_count() > 1 else [value]


def make_loader(cfg: TrainConfig, seed: int):
    from pbe_jax.data.loader import make_loader as loader

    d = cfg.data
    n = jax.process_count()
    if d.batch_size % n:
        raise ValueError(f"data.batch_size {d.batch_size} is not divisible by the {n} processes")
    return loader(make_source(cfg), batch_size=d.batch_size // n, seed=seed, image_size=d.image_size,
                  reference_size=d.reference_size, process_index=jax.process_index(), process_count=n,
                  worker_count=d.workers)


@dataclasses.dataclass
class Trainer:
    """Everything a run holds: the jitted step, the sharded state, the mesh."""

    cfg: TrainConfig
    graphdef: Any
    state: train_state.TrainState
    mesh: jax.sharding.Mesh
    step_fn: Any
    shardings: Any
    extra_configs: dict
    sampler: Any = None  # the PaintByExample that draws sample grids

    def models(self, use_ema: bool = True, nets=None) -> convert.PaintByExampleModels:
        """The trained models. With a mesh over several processes the weights are first gathered onto each
        process's own device, so that one process can sample or export alone; that gather is a collective,
        so every process must call this."""
        nets = nets if nets is not None else self._nets(use_ema)
        if hasattr(nets, "lora"):  # the adapter merged into the UNet: the model it trains
            lora.apply(nets.unet, self.adapter(use_ema, nets), self.cfg.model.lora.config().scale)
        # The size it was trained at becomes the model's default size (the configs' sample_size), so that an
        # export of a 64² model is not sampled at 512² by default.
        size = self.cfg.data.image_size
        factor = 2 ** (len(nets.vae.config.block_out_channels) - 1)
        nets.vae.config = dataclasses.replace(nets.vae.config, sample_size=size)
        nets.unet.config = dataclasses.replace(nets.unet.config, sample_size=size // factor)
        return convert.PaintByExampleModels(nets.unet, nets.vae, nets.image_encoder, dict(self.extra_configs))

    def adapter(self, use_ema: bool = True, nets=None) -> "lora.Adapter | None":
        """The trained LoRA adapter (numpy, float32), or None when the run trains no adapter. Like `models`, a
        collective."""
        nets = nets if nets is not None else self._nets(use_ema)
        if not hasattr(nets, "lora"):
            return None
        return {n: {k: np.asarray(v, np.float32) for k, v in f.items()} for n, f in nets.lora.adapter().items()}

    def _nets(self, use_ema: bool):
        params = self.state.ema if (use_ema and self.state.ema is not None) else self.state.params
        params, frozen = parallel.gather((params, self.state.frozen), self.mesh)
        return nnx.merge(self.graphdef, params, frozen)

    def export(self, out: PathLike) -> None:
        """The trained model as a diffusers folder at `out` (replaced whole, once complete); with LoRA, the
        adapter merged, and the adapter itself in `out`/lora/pytorch_lora_weights.safetensors (diffusers' SD
        LoRA layout). A collective: every process calls it, process 0 writes."""
        nets = self._nets(True)
        adapter = self.adapter(True, nets)
        models = self.models(True, nets)

        def write(target):
            if adapter is not None:
                lora.save_peft(adapter, self.cfg.model.lora.config(), storage.path(target) / "lora")
                lora.save_parts(models, tuple(self.cfg.model.lora.train), storage.path(target) / "lora")
            convert.save(models, target, format="diffusers")  # the index file last

        if jax.process_index() == 0:
            storage.replace_folder(out, write)


def build_trainer(cfg: TrainConfig, models: convert.PaintByExampleModels | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> Trainer:
    return _trainer(cfg, models or build_models(cfg), mesh, abstract=False)


def abstract_models(cfg: TrainConfig) -> convert.PaintByExampleModels:
    """The networks `build_models(cfg)` builds, with shapes only (`convert.abstract`): their configs are read
    from the init's folders (config.json files) or single files (the tensors' shapes), never their weights."""
    m = cfg.model
    policy = Policy(dtype=jnp.dtype(m.dtype), attention_backend=m.attention)
    if m.init == "pbe":
        return convert.load_abstract(_init_source(m), policy=policy)
    if m.init == "sd":
        source = storage.path(_init_source(m))
        if m.sd_file:
            from pbe_jax.convert.ldm_file import read_configs

            configs, extras = read_configs(source, "sd1")
        else:
            configs = {name: read_json(source / name / "config.json") for name in ("unet", "vae")}
            scheduler = source / "scheduler" / "scheduler_config.json"
            extras = {"scheduler": read_json(scheduler)} if scheduler.is_file() else {}
        unet = UNetConfig.from_dict({**configs["unet"], "in_channels": 9}, "unet config")
        clip = storage.path(m.clip_folder)
        configs.update(unet=unet, image_encoder=CLIPVisionConfig.from_dict(
            {**read_json(clip / "config.json"), "projection_dim": unet.cross_attention_dim[0]}, str(clip)))
        for fe in (clip / "preprocessor_config.json", source / "feature_extractor" / "preprocessor_config.json"):
            if fe.is_file():
                extras["feature_extractor"] = read_json(fe)
                break
        return convert.abstract(configs, policy=policy, extra_configs=extras)
    if m.init == "components":
        configs = {"unet": UNetConfig.from_dict(m.unet, "model.unet"),
                   "vae": read_config(storage.path(m.vae_folder), "vae"),
                   "image_encoder": read_config(storage.path(m.image_encoder_folder), "image_encoder")}
        return convert.abstract(configs, policy=policy, extra_configs=_scratch_extras(cfg))
    if m.init == "scratch":
        configs = {"unet": UNetConfig.from_dict(m.unet, "model.unet"), "vae": VAEConfig.from_dict(m.vae, "model.vae"),
                   "image_encoder": CLIPVisionConfig.from_dict(m.image_encoder, "model.image_encoder")}
        return convert.abstract(configs, policy=policy, extra_configs=_scratch_extras(cfg))
    raise ValueError(f"model.init must be 'sd', 'pbe', 'components' or 'scratch', not {m.init!r}")


def abstract_trainer(cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """The Trainer `build_trainer(cfg)` makes, with shapes only: its state's leaves are `jax.ShapeDtypeStruct`s
    and no weight is read, drawn or allocated (`abstract_models`), so the real step can be lowered and compiled
    at full size (`trainer.step_fn.lower(trainer.state, batch_spec(cfg))`) on any machine, for any devices
    (a TPU topology: `pbe_jax.aot`)."""
    return _trainer(cfg, abstract_models(cfg), mesh, abstract=True)


def _trainer(cfg: TrainConfig, models: convert.PaintByExampleModels, mesh: jax.sharding.Mesh | None, *,
             abstract: bool) -> Trainer:
    """The state (trainable params, frozen towers in model.frozen_dtype, optimiser, EMA), its shardings and the
    jitted step; with `abstract` the state is shapes only (`jax.eval_shape`), otherwise placed on the mesh."""
    mesh = mesh or parallel.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    models.unet.remat = cfg.model.remat
    adapter, trainable = None, cfg.model.trainable
    if cfg.model.lora.rank:  # only the adapter trains; drawn on the host from the UNet's shapes
        shapes = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(models.unet, nnx.Param))}
        adapter = lora.init(shapes, cfg.model.lora.config(), seed=cfg.seed)
        trainable = ("lora", *lora.part_prefixes(tuple(cfg.model.lora.train)))
    graphdef, params, frozen = train_state.split(models, trainable, adapter)
    optimizer = train_state.make_optimizer(cfg.optim)
    frozen_dtype = jnp.dtype(cfg.model.frozen_dtype)

    def make(params, frozen):
        frozen = jax.tree.map(lambda a: a.astype(frozen_dtype), frozen)
        return train_state.create(params, frozen, optimizer, ema=cfg.ema_decay > 0, seed=cfg.seed)

    state = jax.eval_shape(make, params, frozen) if abstract else make(params, frozen)
    shardings = parallel.tree_shardings(state, mesh)
    if abstract:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    else:
        state = parallel.place(state, shardings)
    schedule = NoiseSchedule.from_config(models.extra_configs.get("scheduler"))
    batch_sharding = jax.sharding.NamedSharding(mesh, parallel.BATCH)
    step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
                             cfg=StepConfig.from_train_config(cfg))

    def step_in_mesh(state, batch):
        with parallel.abstract_mesh(mesh):
            return step(state, batch)

    step_fn = jax.jit(step_in_mesh, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                      donate_argnums=0)
    return Trainer(cfg, graphdef, state, mesh, step_fn, shardings, dict(models.extra_configs))


def batch_spec(cfg: TrainConfig, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one global training batch, as the data pipeline yields it."""
    b, s, r = batch_size or cfg.data.batch_size, cfg.data.image_size, cfg.data.reference_size
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
            "reference": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8),
            "box": jax.ShapeDtypeStruct((b, 4), jnp.float32), "box_ext": jax.ShapeDtypeStruct((b, 4), jnp.float32)}


def _sample_grid(trainer: Trainer, models: convert.PaintByExampleModels, batch: dict, steps: int) -> np.ndarray:
    """Rows of source | mask (the extended box) | reference | edit, for a fixed held-out batch."""
    from pbe_jax.batch import grid
    from pbe_jax.pipeline import PaintByExample

    if trainer.sampler is None:  # built once: later grids reuse its compiled generation
        trainer.sampler = PaintByExample(models)
    else:
        trainer.sampler.set_weights(models)
    pipe = trainer.sampler
    s = batch["image"].shape[1]
    masks = []
    for x0, y0, x1, y1 in batch["box_ext"]:
        m = np.zeros((s, s), np.float32)
        m[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 1.0
        masks.append(m)
    out = pipe(list(batch["image"]), masks, list(batch["reference"]), steps=steps, height=s, width=s)
    return np.concatenate([grid(i, m, r, o) for i, m, r, o in zip(batch["image"], masks, batch["reference"], out)])


def _pretrain(cfg: TrainConfig, workdir: Path) -> dict:
    from pbe_jax.train import pretrain

    writer = MetricsWriter(workdir)
    last = {}

    def log(step: int, metrics: dict) -> None:
        last.update(metrics)
        writer.write(step, metrics)
        print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    try:
        out = (pretrain.train_vae if cfg.mode == "vae" else pretrain.train_tower)(cfg, workdir, log)
    finally:
        writer.close()
    print(f"wrote {out}")
    return last


def open_workdir(workdir: PathLike) -> Path:
    """The run's folder, local or in a bucket, created if needed; an object store that cannot be reached (by
    epath, or by tensorstore, which writes orbax's arrays) is a clear error here rather than a hang later."""
    workdir = storage.path(workdir)
    storage.check_reachable(workdir)
    storage.check_checkpoint_store(workdir / "checkpoints")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def train(cfg: TrainConfig, workdir: PathLike, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) training in `workdir` (a local folder or gs://…); returns the final metrics. Raises
    TrainingDiverged on a non-finite loss, leaving the last good checkpoint in place, and Preempted after
    checkpointing the step at which a SIGTERM stopped the run (`PreemptionWatch`)."""
    from tqdm import tqdm

    if cfg.distributed:
        parallel.initialize_distributed()
    workdir = open_workdir(workdir)
    lead = jax.process_index() == 0
    if cfg.mode in ("vae", "tower"):
        return _pretrain(cfg, workdir)
    ckpt = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        ckpt.close()
        raise FileExistsError(f"{workdir / 'checkpoints'} already has checkpoints; pass --resume to continue "
                              f"or choose another workdir")
    start, saved = latest or 0, None
    if latest is not None:  # what would make the data positions meaningless, said before anything is built
        saved = ckpt.config(start)  # on every process: orbax synchronises them
        check_data_resumable(saved, cfg, start)
        data_state = own_data_state(ckpt.data(start), start)
    loader = make_loader(cfg, seed=cfg.seed)
    if latest is not None:
        loader.set_state(data_state)
    trainer = build_trainer(cfg)
    if latest is not None:
        trainer.state = ckpt.restore(start, abstract(trainer.state, trainer.shardings))
        changed = differences(saved, to_dict(cfg))
        if lead:
            print(f"resumed from step {start}")
            if changed:  # on purpose (more steps, another lr) or not (a forgotten override): said either way
                print(f"note: the config differs from the one saved with step {start}: {'; '.join(changed)}")
    sample_batch = None
    if cfg.sample_every and lead:
        with make_loader(cfg, seed=cfg.seed + 1) as held_out:
            sample_batch = next(held_out)
    writer = MetricsWriter(workdir, enabled=lead)
    batch_log = None
    if cfg.log_batches:
        (workdir / "batches").mkdir(parents=True, exist_ok=True)
        batch_log = storage.AppendLog(workdir / "batches" / f"process_{jax.process_index()}.jsonl")
    bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not (progress and lead))
    last_good, pending, metrics, t0, n0 = start, None, {}, time.perf_counter(), start
    preempted = None

    def check(step: int, m) -> dict:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(m["loss"]):
            raise TrainingDiverged(f"loss is {m['loss']} at step {step}; stopping. The last good checkpoint is "
                                   f"step {last_good} in {workdir / 'checkpoints'}")
        return m

    def save(step: int) -> None:
        ckpt.save(step, trainer.state, {"processes": all_processes(loader.get_state())}, to_dict(cfg))
        writer.flush()  # the metrics in storage reach at least as far as the checkpoint
        if batch_log is not None:
            batch_log.flush()

    def data_stats() -> dict:
        """The data counters summed over all processes (a collective)."""
        every = all_processes(loader.stats)
        return {f"data/{k}": sum(s[k] for s in every) for k in every[0]}

    try:
        with PreemptionWatch() as watch:
            for step in range(start, cfg.steps):
                local = next(loader)
                if batch_log is not None:
                    digest = hashlib.sha256(b"".join(local[k].tobytes() for k in sorted(local))).hexdigest()
                    batch_log.write(json.dumps({"step": step + 1, "sha256": digest}) + "\n")
                batch = parallel.global_batch(local, trainer.mesh)
                trainer.state, m = trainer.step_fn(trainer.state, batch)
                if pending is not None:  # read the previous step's loss while this one runs
                    metrics = check(*pending)
                pending = (step + 1, m)
                done = step + 1
                stop = watch.reached(done)
                if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.ckpt_every == 0 or stop:
                    metrics = check(*pending)
                    pending = None
                    dt = time.perf_counter() - t0
                    rate = (done - n0) / dt
                    log = {**metrics, "steps_per_s": rate, "samples_per_s": rate * cfg.data.batch_size,
                           **data_stats()}
                    writer.write(done, log)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_s=f"{rate:.2f}",
                                    samples_s=f"{rate * cfg.data.batch_size:.1f}")
                    t0, n0 = time.perf_counter(), done
                if done % cfg.ckpt_every == 0 or done == cfg.steps or stop:
                    save(done)
                    last_good = done
                if stop:
                    preempted = done
                    break
                if cfg.sample_every and done % cfg.sample_every == 0:
                    models = trainer.models()  # on every process (a collective); process 0 draws
                    if lead:
                        (workdir / "samples").mkdir(parents=True, exist_ok=True)
                        save_png(_sample_grid(trainer, models, sample_batch, cfg.sample_steps),
                                 workdir / "samples" / f"step_{done:07d}.png")
                bar.update(1)
    finally:
        bar.close()
        loader.close()
        ckpt.close()  # waits for the last save to be complete in storage
        writer.close()
        if batch_log is not None:
            batch_log.close()
    if preempted is not None:
        raise Preempted(preempted, str(workdir / "checkpoints"))
    if cfg.export:
        trainer.export(workdir / "export")  # on every process (a collective); process 0 writes
    return metrics


def export_checkpoint(workdir: PathLike, step: int | None = None, out: PathLike | None = None) -> tuple[int, Path]:
    """Write the models of checkpoint `step` (default: the latest) of the run in `workdir` as a diffusers
    folder, as the run's end does: for a run stopped before its end, or an earlier step. The model is built
    from the config saved with the checkpoint. `out` defaults to workdir/export for the latest checkpoint and
    workdir/export_<step> for another; it is replaced whole, and only once the new folder is complete.
    Returns (step, out). With several processes every process must call this (the weights are gathered)."""
    workdir = storage.path(workdir)
    storage.check_reachable(workdir)
    if not (workdir / "checkpoints").is_dir():  # before orbax would create it
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no such folder; nothing to export")
    ckpt = Checkpoints(workdir / "checkpoints")
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoints to export")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint at step {step} (there are: "
                                    f"{', '.join(map(str, steps))})")
        cfg = from_dict(ckpt.config(step), where=f"{workdir / 'checkpoints' / str(step)} config")
        trainer = build_trainer(cfg)
        trainer.state = ckpt.restore(step, abstract(trainer.state, trainer.shardings))
    finally:
        ckpt.close()
    out = storage.path(out) if out is not None else workdir / ("export" if step == steps[-1] else f"export_{step}")
    trainer.export(out)  # on every process (a collective); process 0 writes
    return step, out

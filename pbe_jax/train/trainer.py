"""What a run holds: the networks split into a train state born on the mesh (or its shapes alone, for compiling
ahead of time), its shardings and the jitted step. `train.loop` runs it; `pbe_jax.aot` compiles its step."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbe_jax import convert, lora, parallel, storage
from pbe_jax.convert.build import build_models
from pbe_jax.diffusion import NoiseSchedule
from pbe_jax.storage import PathLike
from pbe_jax.train import state as train_state
from pbe_jax.train.config import TrainConfig
from pbe_jax.train.step import StepConfig, train_step


def models_of(cfg: TrainConfig, *, abstract: bool = False) -> convert.PaintByExampleModels:
    """The networks a training config names: `build_models(cfg.model)` with the run's seed and reference size."""
    return build_models(cfg.model, seed=cfg.seed, reference_size=cfg.data.reference_size, abstract=abstract)


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
    """The Trainer for `cfg`, its state created on the mesh (`train_state.create_on_mesh`). `models` (default:
    built from `cfg`) give the weights; a caller that drops its reference afterwards frees them."""
    return _trainer(cfg, models or models_of(cfg), mesh, abstract=False)


def abstract_trainer(cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """The Trainer `build_trainer(cfg)` makes, with shapes only: its state's leaves are `jax.ShapeDtypeStruct`s
    and no weight is read, drawn or allocated, so the real step can be lowered and compiled at full size
    (`trainer.step_fn.lower(trainer.state, batch_spec(cfg))`) on any machine, for any devices (a TPU topology
    or GPU nodes: `pbe_jax.aot`)."""
    return _trainer(cfg, models_of(cfg, abstract=True), mesh, abstract=True)


def _trainer(cfg: TrainConfig, models: convert.PaintByExampleModels, mesh: jax.sharding.Mesh | None, *,
             abstract: bool) -> Trainer:
    """The state (trainable params, frozen towers in model.frozen_dtype, optimiser, EMA), its shardings and the
    jitted step; with `abstract` the state is shapes only, otherwise created on the mesh."""
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
    create = functools.partial(train_state.create, optimizer=optimizer, ema=cfg.ema_decay > 0, seed=cfg.seed)
    shapes = jax.eval_shape(lambda p, f: create(p, jax.tree.map(lambda a: a.astype(frozen_dtype), f)),
                            params, frozen)
    shardings = parallel.tree_shardings(shapes, mesh)
    if abstract:
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    else:
        state = train_state.create_on_mesh(params, frozen, create, shardings, frozen_dtype=frozen_dtype)
    extra_configs = dict(models.extra_configs)
    schedule = NoiseSchedule.from_config(extra_configs.get("scheduler"))
    batch_sharding = jax.sharding.NamedSharding(mesh, parallel.BATCH)
    step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
                             cfg=StepConfig.from_train_config(cfg))

    def step_in_mesh(state, batch):
        with parallel.abstract_mesh(mesh):
            return step(state, batch)

    step_fn = jax.jit(step_in_mesh, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                      donate_argnums=0)
    return Trainer(cfg, graphdef, state, mesh, step_fn, shardings, extra_configs)


def batch_spec(cfg: TrainConfig, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of one global training batch, as the data pipeline yields it."""
    b, s, r = batch_size or cfg.data.batch_size, cfg.data.image_size, cfg.data.reference_size
    return {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
            "reference": jax.ShapeDtypeStruct((b, r, r, 3), jnp.uint8),
            "box": jax.ShapeDtypeStruct((b, 4), jnp.float32), "box_ext": jax.ShapeDtypeStruct((b, 4), jnp.float32)}


__all__ = ["Trainer", "abstract_trainer", "batch_spec", "build_trainer", "models_of"]

"""The training loop: build or resume the sharded state, stream batches from the data pipeline, step, and run
the periodic actions (log, checkpoint, preemption, sample grid); export at the end. `train.py` is a thin CLI
over `train()`."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from pbe_jax import parallel, storage
from pbe_jax.images import grid, save_png
from pbe_jax.storage import Path, PathLike
from pbe_jax.train.checkpoint import Checkpoints
from pbe_jax.train.config import TrainConfig, differences, from_dict, to_dict
from pbe_jax.train.metrics import MetricsWriter
from pbe_jax.train.preemption import Preempted, PreemptionWatch
from pbe_jax.train.trainer import Trainer, abstract_trainer, build_trainer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says which step and which checkpoint is the last good one."""


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


def restored_trainer(cfg: TrainConfig, ckpt: Checkpoints, step: int) -> Trainer:
    """The Trainer of checkpoint `step`: built from shapes (`abstract_trainer`: no weight read, drawn or
    allocated), its whole state, the frozen towers included, then read from the checkpoint onto its shardings."""
    trainer = abstract_trainer(cfg)
    trainer.state = ckpt.restore(step, trainer.state)
    return trainer


@dataclasses.dataclass(frozen=True)
class Periodic:
    """A named action run after a step: every `every` steps (for each nonzero entry), at the run's last step
    (`at_end`), and at the step a preemption stops the run (`on_stop`)."""

    name: str
    run: Callable[[int], None]
    every: tuple[int, ...] = ()
    at_end: bool = False
    on_stop: bool = False

    def due(self, done: int, last: int, stop: bool) -> bool:
        return any(n and done % n == 0 for n in self.every) or (self.at_end and done == last) or (self.on_stop and stop)


class Run:
    """One run's resources (checkpoints, loader, trainer, metrics) and what the periodic actions act on; the
    resources close with `closing` (an ExitStack)."""

    def __init__(self, cfg: TrainConfig, workdir: Path, resume: bool, closing: contextlib.ExitStack,
                 progress: bool):
        from tqdm import tqdm

        self.cfg, self.workdir, self.lead = cfg, workdir, jax.process_index() == 0
        self.ckpt = Checkpoints(workdir / "checkpoints", keep=cfg.keep_checkpoints)
        closing.callback(self.ckpt.close)  # waits for the last save to be complete in storage
        latest = self.ckpt.latest_step()
        if latest is not None and not resume:
            raise FileExistsError(f"{workdir / 'checkpoints'} already has checkpoints; pass --resume to continue "
                                  f"or choose another workdir")
        self.start = latest or 0
        if latest is not None:  # what would make the data positions meaningless, said before anything is built
            saved = self.ckpt.config(self.start)  # on every process: orbax synchronises them
            check_data_resumable(saved, cfg, self.start)
            data_state = own_data_state(self.ckpt.data(self.start), self.start)
        self.loader = closing.enter_context(make_loader(cfg, seed=cfg.seed))
        if latest is not None:
            self.loader.set_state(data_state)
        self.trainer: Trainer = build_trainer(cfg) if latest is None else restored_trainer(cfg, self.ckpt, self.start)
        if latest is not None:
            changed = differences(saved, to_dict(cfg))
            if self.lead:
                print(f"resumed from step {self.start}")
                if changed:  # on purpose (more steps, another lr) or not (a forgotten override): said either way
                    print(f"note: the config differs from the one saved with step {self.start}: {'; '.join(changed)}")
        self.writer = MetricsWriter(workdir, enabled=self.lead)
        closing.callback(self.writer.close)
        self.batch_log = None
        if cfg.log_batches:
            (workdir / "batches").mkdir(parents=True, exist_ok=True)
            self.batch_log = storage.AppendLog(workdir / "batches" / f"process_{jax.process_index()}.jsonl")
            closing.callback(self.batch_log.close)
        self.sample_batch, self.sampler = None, None
        if cfg.sample_every and self.lead:
            with make_loader(cfg, seed=cfg.seed + 1) as held_out:
                self.sample_batch = next(held_out)
        self.bar = closing.enter_context(tqdm(total=cfg.steps, initial=self.start, unit="step",
                                              disable=not (progress and self.lead)))
        self.last_good, self.pending, self.metrics = self.start, None, {}
        self.t0, self.n0 = time.perf_counter(), self.start

    def actions(self) -> list[Periodic]:
        """In the order they run after a step. The loss is read and logged before every checkpoint, so that a
        NaN is never saved."""
        c = self.cfg
        return [Periodic("log", self.log, (c.log_every, c.ckpt_every), at_end=True, on_stop=True),
                Periodic("checkpoint", self.checkpoint, (c.ckpt_every,), at_end=True, on_stop=True),
                Periodic("preemption", self.preempted, on_stop=True),
                Periodic("sample grid", self.sample_grid, (c.sample_every,))]

    def step(self, step: int) -> int:
        """One training step (from `step` to `step` + 1); the previous step's loss is read while it runs."""
        local = next(self.loader)
        if self.batch_log is not None:
            digest = hashlib.sha256(b"".join(local[k].tobytes() for k in sorted(local))).hexdigest()
            self.batch_log.write(json.dumps({"step": step + 1, "sha256": digest}) + "\n")
        batch = parallel.global_batch(local, self.trainer.mesh)
        self.trainer.state, m = self.trainer.step_fn(self.trainer.state, batch)
        self.settle()
        self.pending = (step + 1, m)
        return step + 1

    def settle(self) -> None:
        """The last pending step's metrics read and checked: a non-finite loss raises TrainingDiverged."""
        if self.pending is None:
            return
        step, m = self.pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(m["loss"]):
            raise TrainingDiverged(f"loss is {m['loss']} at step {step}; stopping. The last good checkpoint is "
                                   f"step {self.last_good} in {self.workdir / 'checkpoints'}")
        self.metrics, self.pending = m, None

    def log(self, done: int) -> None:
        self.settle()
        rate = (done - self.n0) / (time.perf_counter() - self.t0)
        samples = rate * self.cfg.data.batch_size
        self.writer.write(done, {**self.metrics, "steps_per_s": rate, "samples_per_s": samples, **self.data_stats()})
        self.bar.set_postfix(loss=f"{self.metrics['loss']:.4f}", steps_s=f"{rate:.2f}", samples_s=f"{samples:.1f}")
        self.t0, self.n0 = time.perf_counter(), done

    def data_stats(self) -> dict:
        """The data counters summed over all processes (a collective)."""
        every = all_processes(self.loader.stats)
        return {f"data/{k}": sum(s[k] for s in every) for k in every[0]}

    def checkpoint(self, done: int) -> None:
        self.settle()
        self.ckpt.save(done, self.trainer.state, {"processes": all_processes(self.loader.get_state())},
                       to_dict(self.cfg))
        self.writer.flush()  # the metrics in storage reach at least as far as the checkpoint
        if self.batch_log is not None:
            self.batch_log.flush()
        self.last_good = done

    def preempted(self, done: int) -> None:
        """After the checkpoint of the step a SIGTERM stopped the run at: the run ends (`Preempted`)."""
        raise Preempted(done, str(self.workdir / "checkpoints"))

    def sample_grid(self, done: int) -> None:
        """Rows of source | mask (the extended box) | reference | edit for the held-out batch, in samples/."""
        from pbe_jax.pipeline import PaintByExample

        models = self.trainer.models()  # on every process (a collective); process 0 draws
        if not self.lead:
            return
        if self.sampler is None:  # built once: later grids reuse its compiled generation
            self.sampler = PaintByExample(models)
        else:
            self.sampler.set_weights(models)
        batch, s = self.sample_batch, self.sample_batch["image"].shape[1]
        masks = []
        for x0, y0, x1, y1 in batch["box_ext"]:
            m = np.zeros((s, s), np.float32)
            m[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))] = 1.0
            masks.append(m)
        out = self.sampler(list(batch["image"]), masks, list(batch["reference"]), steps=self.cfg.sample_steps,
                           height=s, width=s)
        rows = [grid(i, m, r, o) for i, m, r, o in zip(batch["image"], masks, batch["reference"], out)]
        (self.workdir / "samples").mkdir(parents=True, exist_ok=True)
        save_png(np.concatenate(rows), self.workdir / "samples" / f"step_{done:07d}.png")


def train(cfg: TrainConfig, workdir: PathLike, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) training in `workdir` (a local folder or gs://…); returns the final metrics. Raises
    TrainingDiverged on a non-finite loss, leaving the last good checkpoint in place, and Preempted after
    checkpointing the step at which a SIGTERM stopped the run (`PreemptionWatch`)."""
    if cfg.distributed:
        parallel.initialize_distributed()
    workdir = open_workdir(workdir)
    if cfg.mode in ("vae", "tower"):
        return _pretrain(cfg, workdir)
    with contextlib.ExitStack() as closing:
        run = Run(cfg, workdir, resume, closing, progress)
        watch = closing.enter_context(PreemptionWatch())
        actions = run.actions()
        for step in range(run.start, cfg.steps):
            done = run.step(step)
            stop = watch.reached(done)
            for action in actions:
                if action.due(done, cfg.steps, stop):
                    action.run(done)
            run.bar.update(1)
    if cfg.export:
        run.trainer.export(workdir / "export")  # on every process (a collective); process 0 writes
    return run.metrics


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
        trainer = restored_trainer(cfg, ckpt, step)
    finally:
        ckpt.close()
    out = storage.path(out) if out is not None else workdir / ("export" if step == steps[-1] else f"export_{step}")
    trainer.export(out)  # on every process (a collective); process 0 writes
    return step, out

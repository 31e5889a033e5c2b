"""Training parity: the JAX training step (`pbe_jax.train.step`) against the PyTorch reference of the
original release's step (`reference.TrainingReference`), on the same weights, batches and random draws.
`python -m pbe_jax.parity --train` runs it (see there).

One step on a fixed batch: the loss, every trainable parameter's gradient and every parameter's update
(after the optimiser's step; where it is well conditioned, see CONDITIONED) are compared tensor by tensor
as ‖jax − torch‖ / ‖torch‖; the frozen towers
must hold no gradient on either side. With `steps` > 1 both frameworks then train on the same sequence of
batches and draws and the two loss curves are compared step by step, with the final distance between the
parameters relative to the distance they travelled. `gradients_only` is the one step without the update,
holding one framework's networks at a time: what fits SD-1.4 size on one host.

Tolerances (float32 on the CPU, both sides at full matmul precision): the loss and the gradients to 1e-4
relative — a gradient is a sum over every element of every activation in forward and backward, and the
frameworks order those sums differently (convolution algorithms, attention reductions), which costs ~1e-6
per layer, not 1e-4; a wrong convention (a mask inverted, a latent scaled twice, a timestep shifted) costs
1e-1 or more. The update to 1e-3, where it is well conditioned (see CONDITIONED). The loss curve to 1e-3 relative at every step: the two runs drift apart as
rounding differences compound through the updates.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

TOLERANCES = {"loss": 1e-4, "grad": 1e-4, "update": 1e-3, "curve": 1e-3}
# Gradients that are zero in exact arithmetic — the queries and keys of an attention over one token (every
# cross-attention, the mapper's self-attention on the pooled token) and the LayerNorm before them — come out
# as rounding noise on one side and exact zeros on the other; below ZERO × the whole gradient's norm on
# both sides they count as zero and are listed, not compared (AdamW turns noise into lr-sized steps).
ZERO = 1e-6
# AdamW's first update is lr · g / (|g| + ε) per element: where |g| is near ε, a gradient difference of
# 1e-10 (rounding, at a relative 1e-6 of the tensor) moves it by a tenth of lr. Updates are compared where
# both sides' |g| ≥ CONDITIONED × ε (the fraction of elements is reported), and every parameter's largest
# difference is reported beside them.
CONDITIONED = 100


@dataclasses.dataclass(frozen=True)
class Settings:
    """The optimiser and step settings both sides use (the project's defaults, but for a warm-up short
    enough for a test to see the learning rate move, and a drop probability both rows of a batch can take)."""

    batch: int = 2
    lr: float = 1e-4
    warmup_steps: int = 0
    warmup_start: float = 1e-6
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 0.0
    cond_drop: float = 0.2
    cond_drop_group: int = 1
    seed: int = 0


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """‖ours − ref‖ / ‖ref‖ (the absolute difference where ref is all zero)."""
    diff = float(np.linalg.norm((np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).ravel()))
    scale = float(np.linalg.norm(np.asarray(ref, np.float64).ravel()))
    return diff / scale if scale > 0 else diff


def flat(tree) -> dict[str, np.ndarray]:
    """An nnx.State (or pytree) as {dotted path: numpy array}."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v) for p, v in leaves}


def torch_specs(torch_modules: dict[str, Any]) -> dict[str, tuple[dict, dict[str, tuple]]]:
    """What converting tensors named as the reference's needs of its networks: each one's config and its
    state dict's shapes (so that the networks themselves can be released first)."""
    return {name: (m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config),
                   {k: tuple(v.shape) for k, v in m.state_dict().items()})
            for name, m in torch_modules.items() if name in ("unet", "vae", "image_encoder")}


def torch_named_to_jax(specs: dict[str, tuple[dict, dict[str, tuple]]], named: dict[str, np.ndarray],
                       trainable) -> dict[str, np.ndarray]:
    """Tensors named as the reference's trainable parameters ("unet.conv_in.weight", …: gradients, or
    parameters) in the JAX port's layout and paths, through the conversion that loads weights (zeros for the
    names not given); `specs` from `torch_specs`."""
    from pbe_jax.convert import PaintByExampleModels
    from pbe_jax.convert.diffusers import from_state_dict
    from pbe_jax.train import state as train_state

    parts = {}
    for name, (config, shapes) in specs.items():
        sd = {k: named.get(f"{name}.{k}", np.zeros(shape, np.float32)) for k, shape in shapes.items()}
        parts[name] = from_state_dict(name, config, sd, source=f"PyTorch {name} (converted tensors)")
    _, params, _ = train_state.split(PaintByExampleModels(**parts), trainable)
    return flat(params)


def batches(image_size: int, reference_size: int, batch: int, count: int, seed: int) -> list[dict]:
    """`count` batches of the synthetic world at `image_size`, as the training loader yields them."""
    from pbe_jax.train import config as config_lib
    from pbe_jax.train.loop import make_loader

    cfg = config_lib.override(config_lib.load("tiny"), [
        "data.source=synthetic", f"data.size={max(64, batch * count)}", f"data.image_size={image_size}",
        f"data.reference_size={reference_size}", f"data.batch_size={batch}"])
    it = make_loader(cfg, seed=seed)
    return [next(it) for _ in range(count)]


class JaxSide:
    """The project's training step, split at the draws: `draw` as `train_step` calls it, then the loss, its
    gradient and the optimiser's update given those draws."""

    def __init__(self, models, settings: Settings, schedule, trainable, optimizer: bool = True):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from pbe_jax.train import state as train_state
        from pbe_jax.train.config import OptimConfig
        from pbe_jax.train.step import StepConfig, draw, loss_given

        s = settings
        self.graphdef, self.params, self.frozen = train_state.split(models, trainable)
        self.optimizer = train_state.make_optimizer(OptimConfig(
            lr=s.lr, warmup_steps=s.warmup_steps, warmup_start=s.warmup_start, weight_decay=s.weight_decay,
            b1=s.b1, b2=s.b2, eps=s.eps, clip_norm=s.clip_norm))
        self.opt_state = self.optimizer.init(self.params) if optimizer else None  # AdamW's moments: 2 × params
        self.cfg = StepConfig(cond_drop=s.cond_drop, cond_drop_group=s.cond_drop_group, dtype="float32")
        graphdef, cfg = self.graphdef, self.cfg

        def draws(params, frozen, batch, key):
            return draw(nnx.merge(graphdef, params, frozen), batch, key, schedule, cfg)

        def gradients(params, frozen, image, d):
            return jax.value_and_grad(loss_given)(params, frozen, graphdef, image, d, schedule, cfg)

        def step(params, opt_state, frozen, image, d):
            loss, grads = gradients(params, frozen, image, d)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return loss, grads, optax.apply_updates(params, updates), opt_state

        self._draws = jax.jit(draws)
        self._gradients = jax.jit(gradients)
        self._step = jax.jit(step)
        self._image = jax.jit(lambda b: b.astype(jnp.float32) / 127.5 - 1.0)

    def draws(self, batch: dict, key) -> dict[str, np.ndarray]:
        import jax

        return jax.tree.map(np.asarray, self._draws(self.params, self.frozen, batch, key))

    def image(self, batch: dict) -> np.ndarray:
        return np.asarray(self._image(batch["image"]))

    def gradients(self, image: np.ndarray, d: dict):
        loss, grads = self._gradients(self.params, self.frozen, image, d)
        return float(loss), grads

    def step(self, image: np.ndarray, d: dict):
        loss, grads, self.params, self.opt_state = self._step(self.params, self.opt_state, self.frozen, image, d)
        return float(loss), grads


def _setup(torch_modules, models, settings: Settings, steps: int, image_size, trainable, optimizer: bool):
    from pbe_jax.diffusion import NoiseSchedule
    from pbe_jax.parity import reference
    from pbe_jax.train.config import ModelConfig

    trainable = tuple(trainable or ModelConfig().trainable)
    schedule = NoiseSchedule()
    s = settings
    size = image_size or models.vae.config.sample_size
    data = batches(size, models.image_encoder.config.image_size, s.batch, steps, s.seed)
    ours = JaxSide(models, s, schedule, trainable, optimizer=optimizer)
    theirs = reference.TrainingReference(
        torch_modules, lr=s.lr, warmup_steps=s.warmup_steps, warmup_start=s.warmup_start,
        weight_decay=s.weight_decay, b1=s.b1, b2=s.b2, eps=s.eps, clip_norm=s.clip_norm,
        beta_start=schedule.beta_start, beta_end=schedule.beta_end, beta_schedule=schedule.beta_schedule,
        num_train_timesteps=schedule.num_train_timesteps)
    report: dict[str, Any] = {"settings": dataclasses.asdict(s), "image_size": size, "steps": steps,
                              "tolerances": TOLERANCES}
    return trainable, data, ours, theirs, report


def _first_draws(ours: JaxSide, batch: dict, key, settings: Settings) -> dict:
    import jax

    d = ours.draws(batch, jax.random.fold_in(key, 0))
    # both branches of the condition in the compared step: the learnable vector gets a gradient
    d["drop"] = np.arange(settings.batch) % 2 == 1
    return d


def _gradient_report(loss_j: float, loss_t: float, g_j: dict, g_t: dict, frozen_torch: list[str],
                     trainable) -> tuple[dict, dict]:
    """One step's loss and gradient comparison → (report entries, per-tensor errors)."""
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in g_t.values()))
    floor = ZERO * total
    zero = sorted(k for k in g_t if np.linalg.norm(g_t[k]) <= floor and np.linalg.norm(g_j.get(k, 0)) <= floor)
    grad_err = {k: rel(g_j[k], g_t[k]) for k in g_t if k not in zero and k in g_j}
    return {"loss_jax": loss_j, "loss_torch": loss_t, "loss_rel": abs(loss_j - loss_t) / abs(loss_t),
            "tensors": len(g_t), "missing": sorted(set(g_t) ^ set(g_j)), "grad_norm": total,
            "zero_grad_tensors": zero, "grad_rel_max": max(grad_err.values()), "grad_worst": _worst(grad_err),
            "frozen_with_grad_torch": frozen_torch,
            "frozen_in_jax_grads": [k for k in g_j if not k.startswith(trainable)]}, grad_err


def gradients_only(torch_modules: dict[str, Any], models, *, settings: Settings = Settings(),
                   image_size: int | None = None, trainable=None) -> dict:
    """One step's loss and gradients, without either side's optimiser state: the comparison that fits a
    full-size model on one host. PyTorch goes first; its gradients are taken into the port's layout, then its
    networks are released (`torch_modules` is emptied) before the JAX step runs, so that the host never holds
    both frameworks' networks beside both gradients (SD-1.4: 5.2 GB of float32 weights and 3.7 GB of
    trainable gradients per framework)."""
    import gc

    import jax

    trainable, data, ours, theirs, report = _setup(torch_modules, models, settings, 1, image_size, trainable,
                                                   optimizer=False)
    d = _first_draws(ours, data[0], jax.random.key(settings.seed), settings)
    image = ours.image(data[0])
    specs = torch_specs(torch_modules)
    loss_t, grads = theirs.gradients(image, d)
    frozen_torch = theirs.frozen_grads()
    del theirs
    torch_modules.clear()
    g_t = torch_named_to_jax(specs, grads, trainable)
    del grads
    gc.collect()
    loss_j, grads_j = ours.gradients(image, d)
    one, _ = _gradient_report(loss_j, loss_t, flat(grads_j), g_t, frozen_torch, trainable)
    report["one_step"] = {**one, "lr": None}  # no update compared (format_report says so)
    report["ok"] = ok(report)
    return report


def run(torch_modules: dict[str, Any], models, *, settings: Settings = Settings(), steps: int = 1,
        image_size: int | None = None, trainable=None, progress=None) -> dict:
    """The comparison (see the module's docstring) → a report: one step's loss, gradient and update errors
    (the five worst tensors named), the frozen gradients found, and with steps > 1 both loss curves."""
    import jax

    s = settings
    trainable, data, ours, theirs, report = _setup(torch_modules, models, s, max(steps, 1), image_size,
                                                   trainable, optimizer=True)
    specs = torch_specs(torch_modules)
    start = flat(ours.params)
    key = jax.random.key(s.seed)
    curve_jax, curve_torch = [], []
    for i, batch in enumerate(data):
        d = _first_draws(ours, batch, key, s) if i == 0 else ours.draws(batch, jax.random.fold_in(key, i))
        image = ours.image(batch)
        loss_j, grads_j = ours.step(image, d)
        loss_t, grads_t = theirs.step(image, d)
        curve_jax.append(loss_j)
        curve_torch.append(loss_t)
        if i == 0:
            g_j = flat(grads_j)
            g_t = torch_named_to_jax(specs, grads_t, trainable)
            after_t = torch_named_to_jax(specs, {k: p.detach().numpy() for k, p in theirs.trainable.items()},
                                         trainable)
            after_j = flat(ours.params)
            one, grad_err = _gradient_report(loss_j, loss_t, g_j, g_t, theirs.frozen_grads(), trainable)
            lr0 = s.lr * (s.warmup_start if s.warmup_steps > 0 else 1.0)
            visible = lr0 >= 1e-3 * s.lr  # a first step of lr × 1e-6 (the original's warm-up) moves no float32 weight
            update_err, conditioned, elements = {}, 0, 0
            for k in grad_err if visible else ():
                m = np.minimum(np.abs(g_j[k]), np.abs(g_t[k])) >= CONDITIONED * s.eps
                conditioned += int(m.sum())
                elements += m.size
                if m.any():
                    update_err[k] = rel((after_j[k] - start[k])[m], (after_t[k] - start[k])[m])
            report["one_step"] = {
                **one, "lr": lr0,
                "update_rel_max": max(update_err.values()) if visible else None, "update_worst": _worst(update_err),
                "update_elements_compared": conditioned / elements if elements else None,
                "param_abs_max": max(float(np.abs(after_j[k] - after_t[k]).max()) for k in start),
            }
        if progress:
            progress(i + 1, len(data))
    if steps > 1:
        end_j = flat(ours.params)
        end_t = torch_named_to_jax(specs, {k: p.detach().numpy() for k, p in theirs.trainable.items()}, trainable)
        dist = math.sqrt(sum(float(np.sum((end_j[k].astype(np.float64) - end_t[k]) ** 2)) for k in start))
        travelled = math.sqrt(sum(float(np.sum((end_t[k].astype(np.float64) - start[k]) ** 2)) for k in start))
        curve_rel = [abs(a - b) / abs(b) for a, b in zip(curve_jax, curve_torch)]
        report["curve"] = {"loss_jax": curve_jax, "loss_torch": curve_torch, "loss_rel_max": max(curve_rel),
                           "param_distance": dist, "param_travelled": travelled,
                           "param_distance_rel": dist / travelled if travelled else dist}
    report["ok"] = ok(report)
    return report


def _worst(errors: dict[str, float], n: int = 5) -> list[tuple[str, float]]:
    return sorted(errors.items(), key=lambda kv: -kv[1])[:n]


def ok(report: dict) -> bool:
    one = report["one_step"]
    good = (one["loss_rel"] <= TOLERANCES["loss"] and one["grad_rel_max"] <= TOLERANCES["grad"]
            and (one.get("update_rel_max") is None or one["update_rel_max"] <= TOLERANCES["update"])
            and not one["missing"]
            and not one["frozen_with_grad_torch"] and not one["frozen_in_jax_grads"])
    if "curve" in report:
        good = good and report["curve"]["loss_rel_max"] <= TOLERANCES["curve"]
    return good


def format_report(report: dict) -> str:
    one = report["one_step"]
    lines = [f"one step, batch {report['settings']['batch']} at {report['image_size']}²: "
             f"loss jax {one['loss_jax']:.7g} torch {one['loss_torch']:.7g} (rel {one['loss_rel']:.1e}, "
             f"limit {TOLERANCES['loss']:.0e})",
             f"gradients of {one['tensors']} trainable tensors (global norm {one['grad_norm']:.3g}): max rel "
             f"{one['grad_rel_max']:.1e} (limit {TOLERANCES['grad']:.0e}); worst:"]
    lines += [f"    {k}  {v:.1e}" for k, v in one["grad_worst"]]
    if one["zero_grad_tensors"]:
        lines.append(f"zero on both sides (≤ {ZERO:.0e} × the global norm; attention over one token): "
                     f"{len(one['zero_grad_tensors'])} tensors, e.g. {one['zero_grad_tensors'][0]}")
    if one["lr"] is None:
        lines.append("updates not compared: gradients only (--grads-only: no optimiser state on either side)")
    elif one["update_rel_max"] is None:
        lines.append(f"updates not compared: the first step's learning rate {one['lr']:.1e} (warm-up from "
                     f"{report['settings']['warmup_start']:g} × lr) moves no float32 weight; --warmup-steps 0 does")
    else:
        lines.append(f"updates after one AdamW step (lr {one['lr']:.1e}), where |g| ≥ {CONDITIONED} ε "
                     f"({100 * one['update_elements_compared']:.1f} % of the elements): max rel "
                     f"{one['update_rel_max']:.1e} (limit {TOLERANCES['update']:.0e}); every parameter: max |Δ| "
                     f"{one['param_abs_max']:.1e} = {one['param_abs_max'] / one['lr']:.2f} lr; worst:")
        lines += [f"    {k}  {v:.1e}" for k, v in one["update_worst"]]
    lines.append("frozen parts' gradients: torch " + (", ".join(one["frozen_with_grad_torch"][:5]) or "none")
                 + "; jax " + (", ".join(one["frozen_in_jax_grads"][:5]) or "none"))
    if one["missing"]:
        lines.append("tensors on one side only: " + ", ".join(one["missing"][:10]))
    if "curve" in report:
        c = report["curve"]
        lines.append(f"{report['steps']} steps: loss {c['loss_torch'][0]:.5g} → {c['loss_torch'][-1]:.5g} (torch), "
                     f"max rel difference {c['loss_rel_max']:.1e} (limit {TOLERANCES['curve']:.0e}); final "
                     f"parameters {c['param_distance']:.2e} apart, {c['param_distance_rel']:.1e} of the "
                     f"{c['param_travelled']:.2e} travelled")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Both loss curves and their relative difference, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report["curve"]
    steps = np.arange(1, len(c["loss_jax"]) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    top.plot(steps, c["loss_torch"], label="PyTorch reference (the original's step)", lw=2.5, alpha=0.6)
    top.plot(steps, c["loss_jax"], label="pbe-jax", lw=1, ls="--", color="k")
    top.set_ylabel("ε-MSE loss")
    top.legend()
    top.set_title(f"Training parity: {report['steps']} AdamW steps, batch {report['settings']['batch']}, "
                  f"{report['image_size']}²")
    diff = np.abs(np.array(c["loss_jax"]) - np.array(c["loss_torch"])) / np.abs(np.array(c["loss_torch"]))
    bottom.semilogy(steps, np.maximum(diff, 1e-12), color="C3")
    bottom.axhline(TOLERANCES["curve"], color="gray", ls=":", label="tolerance")
    bottom.set_ylim(top=10 * TOLERANCES["curve"])
    bottom.set_ylabel("|Δ loss| / loss")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    from pbe_jax import storage

    storage.write_with(storage.path(path), lambda local: fig.savefig(local, dpi=110))
    plt.close(fig)

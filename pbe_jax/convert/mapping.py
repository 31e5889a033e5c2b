"""The generic walk between a Flax module's parameters and a PyTorch state dict.

Module attribute paths mirror the PyTorch ones, so each parameter maps by name alone:
`kernel` ↔ `weight` with a transpose (Linear [out, in] ↔ [in, out]; Conv OIHW ↔ HWIO), `scale` and
`embedding` ↔ `weight` as they are, anything else (biases, class_embedding, uncond_vector) by its own name.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from flax import nnx

from pbe_jax.convert.weights import WeightsError
from pbe_jax.models import Policy

Path = tuple  # a parameter path in the module tree, e.g. ("down_blocks", 0, "resnets", 0, "conv1", "kernel")


def torch_name(path: Path) -> str:
    *modules, leaf = (str(p) for p in path)
    return ".".join(modules + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def flax_name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def parse_flax_name(name: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def to_flax_layout(path: Path, a: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    return a


def to_torch_layout(path: Path, a: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    return a


def torch_shape(path: Path, shape: tuple) -> tuple:
    """The PyTorch shape of a parameter of flax shape `shape`."""
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape[::-1])
    return tuple(shape)


class _ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when a module is built for its shapes alone: every stream gives the same key.
    With a real `nnx.Rngs` each draw updates a counter, and under tracing every update makes flax ask the
    traced counter for its sharding, an error whose message JAX builds by walking the whole trace: quadratic
    in the parameter count, seconds per model (5x the rest of the build). The keys never matter here."""

    def __getattr__(self, stream: str) -> "_ShapeOnlyRngs":
        return self

    def __call__(self) -> jax.Array:
        return jax.random.key(0)


@functools.lru_cache(maxsize=32)
def abstract_model(cls: type, config, policy: Policy) -> tuple[nnx.GraphDef, dict[Path, nnx.Variable]]:
    """The graph and parameter shapes of `cls(config, policy=policy)`, traced once and never allocated.
    (Tracing a module's construction costs a fraction of a second to seconds, so it is cached per
    configuration.)"""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, policy=policy, rngs=_ShapeOnlyRngs())))
    return graphdef, dict(nnx.to_flat_state(state))


def materialize(cls: type, config, policy: Policy, params: dict[Path, np.ndarray], source: str) -> nnx.Module:
    """Build `cls(config, policy=policy)` with the given parameters (flax layout), never running its random
    init. Every parameter must be given with its exact shape and nothing else may be: the error lists each
    missing, unexpected and mis-shaped parameter by name."""
    graphdef, flat = abstract_model(cls, config, policy)
    problems = [f"missing {flax_name(p)} (expected shape {tuple(v.get_value().shape)})"
                for p, v in flat.items() if p not in params]
    problems += [f"unexpected {flax_name(p)} {tuple(np.shape(a))}" for p, a in params.items() if p not in flat]
    problems += [f"{flax_name(p)}: shape {tuple(np.shape(a))} in the weights, {tuple(flat[p].get_value().shape)}"
                 f" in the model" for p, a in params.items() if p in flat
                 and tuple(np.shape(a)) != tuple(flat[p].get_value().shape)]
    if problems:
        raise WeightsError(_report(source, problems))
    # Cast on the host and transferred with device_put: a cast on the device, or jnp.asarray (which stages the
    # value through a jitted primitive), would compile a small program per parameter shape and dtype.
    state = [(p, v.replace(jax.device_put(np.asarray(params[p]).astype(v.get_value().dtype, copy=False))))
             for p, v in flat.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(state))


def module_params(module: nnx.Module) -> dict[Path, np.ndarray]:
    """The module's parameters as host numpy arrays, flax layout, keyed by path."""
    return {path: np.asarray(jax.device_get(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def from_torch(cls: type, config, policy: Policy, state_dict: dict[str, np.ndarray], source: str,
               ignore: Callable[[str], bool] = lambda k: False,
               given: dict[Path, np.ndarray] | None = None) -> nnx.Module:
    """Build `cls(config, policy=policy)` from a PyTorch state dict. Names the model has no parameter for
    are an error unless `ignore` says they are known buffers; nothing is dropped silently. `given` supplies
    parameters (flax layout) that the state dict does not have, e.g. freshly initialised new layers."""
    expected = {p: v.get_value() for p, v in abstract_model(cls, config, policy)[1].items()}
    by_torch = {torch_name(p): p for p in expected}
    params = dict(given or {})
    problems = []
    for key, a in state_dict.items():
        path = by_torch.get(key)
        if path is None:
            if not ignore(key):
                problems.append(f"unexpected {key} {tuple(a.shape)}: the model has no such parameter")
            continue
        want = expected[path].shape
        got = to_flax_layout(path, a)
        if tuple(got.shape) != tuple(want):
            problems.append(f"{key}: shape {tuple(a.shape)} in the weights, "
                            f"{torch_shape(path, want)} in the model")
            continue
        params[path] = got
    problems += [f"missing {k} (expected shape {torch_shape(p, expected[p].shape)})"
                 for k, p in by_torch.items() if k not in state_dict and p not in params]
    if problems:
        raise WeightsError(_report(source, problems))
    return materialize(cls, config, policy, params, source)


def to_torch(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters as a PyTorch state dict (names and layouts)."""
    return {torch_name(p): np.ascontiguousarray(to_torch_layout(p, a)) for p, a in module_params(module).items()}


def _report(source: str, problems: list[str], limit: int = 25) -> str:
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return (f"{source}: the weights do not fit the model built from its config "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems[:limit]) + more)

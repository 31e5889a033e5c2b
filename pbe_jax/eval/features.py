"""Feature networks (CLIP, Inception) run over many host images: fixed-size batches, jitted once per input
shape, each batch split over all local devices (a 1-D mesh over the batch axis, the weights replicated)."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class Extractor:
    """`Extractor(module)(arrays)`: `module(x)` over a list of (H, W, C) float arrays (or one (N, H, W, C)
    array) → (N, D) float32 numpy, in input order. Arrays of different shapes are run in groups (one compiled
    program per shape). `batch_size` is rounded up to a multiple of the local device count; a short last
    batch is padded with zeros, which never changes the other rows (every network here is per-sample)."""

    def __init__(self, module: nnx.Module, *, batch_size: int = 32,
                 apply: Callable[[nnx.Module, jax.Array], jax.Array] = lambda m, x: m(x)):
        devices = jax.local_devices()
        self.batch_size = -(-max(1, batch_size) // len(devices)) * len(devices)
        mesh = Mesh(np.array(devices), ("data",))
        self._rows = NamedSharding(mesh, PartitionSpec("data"))
        graphdef, state = nnx.split(module)
        self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self._fn = jax.jit(lambda s, x: apply(nnx.merge(graphdef, s), x).astype(jnp.float32))

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            pad = np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
            y = self._fn(self._state, jax.device_put(np.concatenate([chunk, pad]), self._rows))
            out.append(np.asarray(y)[:len(chunk)])
        return np.concatenate(out)

    def __call__(self, arrays: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        if len(arrays) == 0:
            raise ValueError("no images to compute features of")
        if isinstance(arrays, np.ndarray):
            return self._run(arrays.astype(np.float32, copy=False))
        shapes = [np.shape(a) for a in arrays]
        out: list[np.ndarray | None] = [None] * len(arrays)
        for shape in dict.fromkeys(shapes):
            where = [i for i, s in enumerate(shapes) if s == shape]
            for i, row in zip(where, self._run(np.stack([np.asarray(arrays[i], np.float32) for i in where]))):
                out[i] = row
        return np.stack(out)

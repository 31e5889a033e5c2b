"""Networks run over many host images: fixed-size batches, jitted once per input shape, each batch split over
all local devices (a 1-D mesh over the batch axis, the weights replicated). What the evaluation uses for CLIP
and Inception features and for passing images through an autoencoder."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _float32_output(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x).astype(jnp.float32)


class Extractor:
    """`Extractor(module)(arrays)`: `apply(module, x)` (default `module(x)` in float32) over a list of (H, W, C)
    arrays (or one (N, H, W, C) array) → the stacked per-row outputs as numpy, in input order (`rows` for
    outputs of several shapes, as a list). Arrays of
    different shapes are run in groups (one compiled program per shape). `batch_size` is rounded up to a
    multiple of the local device count; a short last batch is padded with zeros, which must not change the
    other rows (true of every per-sample network)."""

    def __init__(self, module: nnx.Module, *, batch_size: int = 32,
                 apply: Callable[[nnx.Module, jax.Array], jax.Array] = _float32_output):
        devices = jax.local_devices()
        self.batch_size = -(-max(1, batch_size) // len(devices)) * len(devices)
        mesh = Mesh(np.array(devices), ("data",))
        self._rows = NamedSharding(mesh, PartitionSpec("data"))
        graphdef, state = nnx.split(module)
        self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self._fn = jax.jit(lambda s, x: apply(nnx.merge(graphdef, s), x))

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i:i + self.batch_size]
            pad = np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)
            y = self._fn(self._state, jax.device_put(np.concatenate([chunk, pad]), self._rows))
            out.append(np.asarray(y)[:len(chunk)])
        return np.concatenate(out)

    def rows(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The output of each input array, in input order (outputs may differ in shape, as inputs may)."""
        if len(arrays) == 0:
            raise ValueError("no images to run the network on")
        shapes = [(np.shape(a), np.asarray(a).dtype) for a in arrays]
        out: list[np.ndarray | None] = [None] * len(arrays)
        for key in dict.fromkeys(shapes):
            where = [i for i, s in enumerate(shapes) if s == key]
            for i, row in zip(where, self._run(np.stack([np.asarray(arrays[i]) for i in where]))):
                out[i] = row
        return out

    def __call__(self, arrays: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """The outputs stacked: (N, ...) for outputs of one shape (features)."""
        if isinstance(arrays, np.ndarray) and len(arrays):
            return self._run(arrays)
        return np.stack(self.rows(arrays))

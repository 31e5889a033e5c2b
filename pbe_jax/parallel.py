"""One device mesh for the whole program and the shardings built on it (batch on `data`, the rest
replicated). The same code runs on one CPU, fake CPU devices, a GPU node or a TPU slice."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over the local devices (or the given ones)."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Put arrays on the mesh split along their first (batch) axis."""
    return jax.device_put(tree, NamedSharding(mesh, P("data")))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def pad_to_multiple(n: int, k: int) -> int:
    return -(-n // k) * k

"""One device mesh for the whole program and the shardings built on it. Axes: `data` (batch split, params
replicated) and `fsdp` (batch split too, params and optimiser state split along one axis). The same code
runs on one CPU, fake CPU devices, a GPU node or a TPU slice, single- or multi-host."""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = P(("data", "fsdp"))  # the batch axis is split over every device


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over the local devices (or the given ones): sampling's mesh."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices of all processes; -1 takes what the other axis leaves."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} × fsdp={fsdp} does not match the {n} devices")
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def param_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int = 2 ** 16) -> P:
    """FSDP rule: split the largest axis the fsdp size divides, for arrays of at least `min_size` elements;
    replicate the rest (biases, norms, scalars), whose traffic costs more than their memory."""
    n = mesh.shape.get("fsdp", 1)
    if n == 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs) by `param_spec`."""
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), mesh)), tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Put host arrays on a `data_mesh` split along their first (batch) axis (one process)."""
    return jax.device_put(tree, NamedSharding(mesh, P("data")))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assemble each process's local batch into global arrays split over the mesh (multi-host safe)."""
    sharding = NamedSharding(mesh, BATCH)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def pad_to_multiple(n: int, k: int) -> int:
    return -(-n // k) * k

"""One device mesh for the whole program and the shardings built on it. Axes: `data` (batch split, params
replicated) and `fsdp` (batch split too, params and optimiser state split along one axis). The same code
runs on one CPU, fake CPU devices, a GPU node or a TPU slice, single- or multi-host."""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = P(("data", "fsdp"))  # the batch axis is split over every device


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over the local devices (or the given ones): sampling's mesh."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices of all processes; -1 takes what the other axis leaves. On TPUs the
    devices are laid out along the slice's torus (`mesh_utils`), and over several slices (multislice) the
    `data` axis spans the slices through the data-centre network while `fsdp` stays inside each slice."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} × fsdp={fsdp} does not match the {n} devices")
    return Mesh(_device_grid((data, fsdp), devices), ("data", "fsdp"))


def _device_grid(shape: tuple[int, int], devices: list) -> np.ndarray:
    if devices[0].platform != "tpu":
        return np.asarray(devices).reshape(shape)
    from jax.experimental import mesh_utils

    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ValueError(f"mesh data={shape[0]} must be a multiple of the {slices} slices (the data axis spans "
                             f"them; fsdp={shape[1]} stays inside one)")
        return mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1]), (slices, 1), devices,
                                                    allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


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
    return put(tree, NamedSharding(mesh, P("data")))


def global_batch(local: Any, mesh: Mesh) -> Any:
    """Assemble each process's local batch into global arrays split over the mesh (multi-host safe)."""
    sharding = NamedSharding(mesh, BATCH)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def place(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """Arrays every process holds whole (host or local device) as global arrays with `shardings`, those of
    another dtype cast to `dtype` first if given (on the host, one array at a time: only one whole copy exists
    at once). With several processes each fills only its own shards from its copy: `jax.device_put` would
    instead check the copies equal across processes and compile a resharding per array, a collective and a
    compile per parameter."""
    def cast(x):
        if dtype is None or x.dtype == dtype:
            return x
        return np.asarray(jax.device_get(x)).astype(dtype)

    if jax.process_count() == 1:
        return jax.tree.map(lambda x, sharding: jax.device_put(cast(x), sharding), tree, shardings)

    def put(x, sharding):
        host = np.asarray(jax.device_get(cast(x)))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def gather(tree: Any, mesh: Mesh) -> Any:
    """Global arrays (possibly split over processes) as whole arrays on this process's first device: one
    compiled replication for the whole tree, then each process reads its own copy. A collective: every process
    must call it."""
    if jax.process_count() == 1:
        return tree
    replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), replicated)


def replicate(tree: Any, mesh: Mesh) -> Any:
    return put(tree, NamedSharding(mesh, P()))


def put(tree: Any, sharding: Any) -> Any:
    """`jax.device_put(tree, sharding)`, where shape-only leaves (`jax.ShapeDtypeStruct`, e.g. a program
    compiled ahead of time for devices this process does not have) take the sharding as an annotation."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree)


def gather_params(tree: Any, dtype: Any = None, cast: Callable[[str, Any], bool] | None = None) -> Any:
    """Sharded parameters as FSDP (ZeRO-3) uses them: each array gathered whole at its use and the batch kept
    split, rather than the compiler splitting the convolutions and matmuls over the fsdp axis like the
    weights (which it does when left to choose: rings of collective-permutes and all-to-alls around every
    layer, and a compile several times longer). Leaves where `cast(path, leaf)` holds are cast to `dtype`
    first — for those whose layer computes in `dtype` anyway, this is the same number, gathered at half the
    bytes. The gradient flows back as a reduce-scatter onto the shards. Identity outside a mesh with an fsdp
    axis larger than 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
        return tree

    def one(path, x):
        if dtype is not None and cast is not None and cast(jax.tree_util.keystr(path, simple=True, separator="."), x):
            x = x.astype(dtype)
        return jax.lax.with_sharding_constraint(x, P())

    return jax.tree_util.tree_map_with_path(one, tree)


def pad_to_multiple(n: int, k: int) -> int:
    return -(-n // k) * k


def abstract_mesh(mesh: Mesh | None):
    """Inside a jitted function: make `mesh` the ambient mesh while tracing, so that layers which run per device
    (the splash attention kernel, in `shard_map`) can find its batch axes. A no-op context without a mesh."""
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if mesh is not None else contextlib.nullcontext()


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` for a multi-host run. On TPU pod slices (and SLURM, Open MPI, ...) JAX
    finds the coordinator, the process count and this process's index by itself; elsewhere set
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPU the
    collectives go through gloo (how several processes on one machine stand in for hosts in the tests)."""
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    env = {k: os.environ.get(f"JAX_{k.upper()}") for k in ("num_processes", "process_id")}
    jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})


def gather_json(obj: Any) -> list:
    """`obj` (anything JSON can hold) from every process, in process order, on every process; a collective."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]

"""What the compilers compile for: Cloud TPU slices (libtpu) and NVIDIA GPU nodes (the CUDA plugin), named as
their users name them, each with its memory per device, its peak bf16 rate and the devices the compiler
describes for it (`jax.experimental.topologies`: compile-only devices, on any host)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any

GiB = 2 ** 30

# What `fits` leaves free of a TPU's HBM. The compiler has its own limit, what it says is available to a program
# (measured here, in GiB: 15.75 of v5e's 16, 30.75 of v4's 32, 31.25 of v6e's 32, 95.74 on v5p, whose 95 GB
# specification `hbm_bytes` keeps), and refuses larger programs (RESOURCE_EXHAUSTED: a report with fits false).
# At run time the HBM also holds what one program's buffer assignment does not count: the next batch,
# transferred while the step runs (8 images at 512² in uint8: 6 MB), the code of the other programs loaded
# (the sampler for the training grids: 0.1–0.4 GiB), and what the allocator loses to fragmentation between
# them. 5 % of the chip (0.8 GiB on v5e, 1.6 GiB on v4/v6e, 4.8 GB on v5p) covers the first two with room for
# the third; a program that fits only within the margin is one to try on the chip before counting on it.
MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: how Cloud TPU names count it, and what a chip has."""

    topology_prefix: str  # libtpu's topology names: "v5e:2x4"
    dims: int  # 2 (a v5e/v6e slice is a 2-D torus) or 3
    cores_per_name_unit: int  # v4-8 and v5p-8 count TensorCores (2 per chip); v5e-8, v6e-8 count chips
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per chip
    chips_per_host: int  # the largest single-host slice (v5e/v6e: 8 chips; v4/v5p: 4)
    platform = "tpu"
    margin = MARGIN
    reserve_bytes = 0


CHIPS = {
    "v4": Chip("v4", 3, 2, 32 * GiB, 275e12, 4),
    "v5p": Chip("v5p", 3, 2, 95 * 10 ** 9, 459e12, 4),
    "v5e": Chip("v5e", 2, 1, 16 * GiB, 197e12, 8),
    "v6e": Chip("v6e", 2, 1, 32 * GiB, 918e12, 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}

GPU_CONFIGS = Path(__file__).resolve().parent / "gpus"
# What `fits` leaves free of a GPU's memory, besides the program's buffers: a fixed reserve and a fraction.
# - The reserve, 1 GiB: what lives outside XLA's allocator or outside the compiled program's buffer assignment.
#   The CUDA context with cuBLAS's and cuDNN's handles (about half a GiB on a CUDA 12 Hopper with lazy module
#   loading, by NVIDIA's and JAX's GPU memory notes; not measured here, no GPU was lent), cuDNN's workspaces
#   (the deviceless compile records 0, nothing being autotuned; autotuned convolutions and fused attention take
#   tens to a few hundred MB), and NCCL's buffers on several GPUs (a few MiB per channel and peer: tens of MB).
# - The fraction, 5 % of the GPU, as for TPUs: the next batch, the other programs' code, and what the BFC
#   allocator loses to fragmentation.
# JAX's GPU client also preallocates only 75 % of the memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION): a
# program between that and the limit above fits once that variable is raised; the report says to what
# (`mem_fraction_needed`).
GPU_MARGIN = 0.05
GPU_RESERVE = GiB
JAX_DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU: its target configuration for the compiler (gpus/*.txtpb, which says where each number
    comes from), its dense bf16 peak (NVIDIA's datasheets: the tensor cores' rate without sparsity) and how many
    sit in a node."""

    config_file: str
    peak_bf16_flops: float
    gpus_per_node: int = 8
    platform = "gpu"
    margin = GPU_MARGIN
    reserve_bytes = GPU_RESERVE

    @property
    def config(self) -> str:
        return (GPU_CONFIGS / self.config_file).read_text()

    @property
    def hbm_bytes(self) -> int:
        """The device memory CUDA reports (the config's device_memory_size)."""
        return int(re.search(r"device_memory_size:\s*(\d+)", self.config).group(1))


GPUS = {
    "h100": Gpu("h100_sxm.txtpb", 989e12),  # H100 SXM: 989.4 TFLOP/s dense bf16
    "h200": Gpu("h200.txtpb", 989e12),  # H200 SXM: the H100's tensor cores
    "a100-80gb": Gpu("a100_sxm_80.txtpb", 312e12),
    "l4": Gpu("l4.txtpb", 121e12),  # one card per host is the common machine (a g2 or a workstation)
}


@dataclasses.dataclass
class Topology:
    name: str  # as given
    generation: str  # "v5e", "h100"
    shape: tuple[int, ...]  # a TPU slice's chip grid; (nodes, GPUs per node)
    slices: int
    devices: list

    @property
    def chip(self) -> Chip | Gpu:
        return GPUS[self.generation] if self.generation in GPUS else CHIPS[self.generation]

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def topology_name(self) -> str:
        if self.platform == "gpu":  # the CUDA plugin's: slices x hosts x GPUs per host
            return f"1x{self.shape[0]}x{self.shape[1]}"
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def usable_bytes(self) -> float:
        """A device's memory less the margin and reserve `fits` leaves free."""
        return self.chip.hbm_bytes * (1 - self.chip.margin) - self.chip.reserve_bytes


class TopologyError(ValueError):
    pass


def _shape_for(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for a number of chips: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, …; 3-D 2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, 4x4x8, … (each doubling doubles the last of the smallest sides)."""
    shape = [1, 1] if dims == 2 else [2, 2, 1]
    if dims == 2 and chips >= 4:
        shape = [2, 2]
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(k for k, v in enumerate(shape) if v == smallest)
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise TopologyError(f"{chips} chips do not make a standard slice; give the raw topology "
                            f"(e.g. {'v5p:4x4x20' if dims == 3 else 'v5e:4x8'})")
    return tuple(shape)


_EXAMPLES = ("a Cloud TPU name like v5e-8, v5p-8, v4-8, v6e-8, a TPU topology like v5e:2x4, v5p:2x2x2, or GPUs "
             "like h100-8 (one node of 8), h100:2x8 (2 nodes of 8), h200-8, a100-80gb-8, l4-1")


_GPU_NAME = re.compile(r"([a-z]\d+(?:-\d+gb)?)(?:-(\d+)|:(\d+)x(\d+))")


def is_gpu(text: str) -> bool:
    m = _GPU_NAME.fullmatch(text.strip().lower())
    return bool(m) and m.group(1) in GPUS


def _parse_gpu(text: str) -> tuple[str, tuple[int, int]]:
    m = _GPU_NAME.fullmatch(text.strip().lower())
    gpu = GPUS[m.group(1)]
    if m.group(3):
        nodes, per_node = int(m.group(3)), int(m.group(4))
    else:
        n = int(m.group(2))
        nodes, per_node = (1, n) if n <= gpu.gpus_per_node else (n // gpu.gpus_per_node, gpu.gpus_per_node)
        if nodes * per_node != n:
            raise TopologyError(f"--topology {text!r}: {n} GPUs do not fill nodes of {gpu.gpus_per_node}; give "
                                f"nodes × GPUs per node, e.g. {m.group(1)}:2x{gpu.gpus_per_node}")
    if not (nodes >= 1 and 1 <= per_node <= gpu.gpus_per_node):
        raise TopologyError(f"--topology {text!r}: a {m.group(1)} node holds 1 to {gpu.gpus_per_node} GPUs")
    return m.group(1), (nodes, per_node)


def parse_topology(text: str) -> tuple[str, tuple[int, ...]]:
    """(generation, shape) from a TPU name ("v5e-8", "v5litepod-16", "v4-8", "v5p:2x2x2", "v6e:4x4": the slice's
    chip grid) or a GPU one ("h100-8", "h100:2x8", "l4-1": (nodes, GPUs per node))."""
    if is_gpu(text):
        return _parse_gpu(text)
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", text.strip().lower())
    if not m:
        raise TopologyError(f"--topology {text!r}: expected {_EXAMPLES}")
    generation = ALIASES.get(m.group(1), m.group(1))
    if generation not in CHIPS:
        raise TopologyError(f"--topology {text!r}: unknown TPU generation {m.group(1)!r} (known: "
                            f"{', '.join([*CHIPS, *ALIASES])}; GPUs: {', '.join(GPUS)})")
    chip = CHIPS[generation]
    if m.group(3):
        shape = tuple(int(v) for v in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise TopologyError(f"--topology {text!r}: a {generation} slice has {chip.dims} dimensions")
        return generation, shape
    n = int(m.group(2))
    if n % chip.cores_per_name_unit:
        raise TopologyError(f"--topology {text!r}: {generation}-N counts TensorCores, 2 per chip")
    return generation, _shape_for(n // chip.cores_per_name_unit, chip.dims)


def check_slices(text: str, slices: int) -> None:
    """--slices: at least 1, and for TPUs only (GPU nodes are counted in the name: h100:2x8)."""
    if slices < 1:
        raise TopologyError(f"--slices {slices}: must be at least 1")
    if slices > 1 and is_gpu(text):
        raise TopologyError(f"--slices {slices}: GPU nodes are counted in the topology (e.g. h100:{slices}x8)")


def have_compiler(text: str) -> bool:
    """Whether the compiler for this topology is installed: libtpu (the `tpu` extra) or the CUDA plugin (`gpu`)."""
    return importlib.util.find_spec("jax_plugins.xla_cuda12" if is_gpu(text) else "libtpu") is not None


def missing_compiler(text: str) -> str:
    if is_gpu(text):
        return 'error: the GPU compiler (the CUDA plugin) is not installed; install the extra: pip install -e ".[gpu]"'
    return 'error: the TPU compiler (libtpu) is not installed; install the extra: pip install -e ".[tpu]"'


def quiet_libtpu() -> None:
    """libtpu, loaded on a host that is not a TPU VM, looks for the VM's own chips and workers and logs a page
    of errors when it finds none; the compiler does not need them. Set before libtpu loads; a TPU VM's own
    settings are kept. Several processes may load it at once (the tests' workers)."""
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_MIN_LOG_LEVEL", "3"), ("TPU_STDERR_LOG_LEVEL", "3"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-1"), ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)


def prepare_host() -> None:
    """Compile on this host's CPU backend only: a TPU VM's or GPU node's own devices (perhaps busy training)
    are never opened, and a CPU host does not try to start a TPU runtime. The CUDA plugin's version check
    calls cuInit, which fails where no driver is, and then the plugin is not registered at all: skipped, as
    nothing is run (set before JAX first looks for its plugins)."""
    import jax

    quiet_libtpu()
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    jax.config.update("jax_platforms", "cpu")


def topology(text: str, slices: int = 1) -> Topology:
    """The devices of the named TPU slice (or of `slices` such slices, joined by the data-centre network) or
    GPU nodes, as the compiler describes them; needs libtpu or the CUDA plugin, runs on any host."""
    generation, shape = parse_topology(text)
    check_slices(text, slices)
    from jax.experimental import topologies

    if generation in GPUS:
        name = f"1x{shape[0]}x{shape[1]}"
        try:
            desc = topologies.get_topology_desc(platform="cuda", target_config=GPUS[generation].config,
                                                topology=name)
        except NotImplementedError as e:  # the plugin failed its version check and was never registered
            raise TopologyError(f"the CUDA plugin is installed but not registered ({e}); set "
                               f"JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before JAX starts (pbe_jax.aot does)") from e
        return Topology(text, generation, shape, 1, list(desc.devices))
    quiet_libtpu()
    chip = CHIPS[generation]
    chips = math.prod(shape)
    kwargs: dict[str, Any] = {"num_slices": slices} if slices > 1 else {}
    if chip.dims == 3:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, both TensorCores (as JAX runs v4/v5p)
        kwargs["wrap"] = (min(shape) >= 4,) * 3  # a full cube of 4x4x4 or more closes into a torus
    else:
        kwargs["wrap"] = tuple(s >= 16 for s in shape) + (False,)
    if chips <= chip.chips_per_host:
        kwargs["chips_per_host_bounds"] = (*shape, 1) if chip.dims == 2 else shape
    name = f"{chip.topology_prefix}:{'x'.join(map(str, shape))}"
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    return Topology(text, generation, shape, slices, list(desc.devices))

"""Compile the training step or the sampler for a TPU slice from any machine, and report what the TPU compiler
says of it per chip: memory (its buffer assignment), FLOPs and the roofline time they imply, the Mosaic kernels
and the collectives in the compiled program. libtpu (`pip install -e ".[tpu]"`) compiles for a named topology
on a CPU host (`jax.experimental.topologies`); no TPU is touched, nothing is run.

    python -m pbe_jax.aot train --topology v5e-8 --config sd14 data.batch_size=64 model.remat=True
    python -m pbe_jax.aot train --topology v5p-8 --slices 2 --config sd14 data.batch_size=64 mesh_fsdp=4
    python -m pbe_jax.aot sample --topology v6e-8 --config sd14 --batch-size 64 --sampler dpmpp_2m --steps 20
    python -m pbe_jax.aot sample --topology v5e-4 --pretrained checkpoints/synthetic --batch-size 16 --json r.json

--topology is a Cloud TPU name (v4-8, v5p-8: TensorCores; v5e-8 = v5litepod-8, v6e-8: chips) or a raw
topology (v5e:2x4, v5p:2x2x2). Exit status 0 when the program fits in the chip's HBM, 3 when it does not (the
JSON is still written), 2 for a bad option, 1 for an error. The numbers are the compiler's for that topology,
not a run on a TPU: memory is its buffer assignment (before the allocator's fragmentation), the roofline is
FLOPs ÷ the chip's peak bf16 rate, a lower bound on the step's time, not a prediction of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: how Cloud TPU names count it, and what a chip has."""

    topology_prefix: str  # libtpu's topology names: "v5e:2x4"
    dims: int  # 2 (a v5e/v6e slice is a 2-D torus) or 3
    cores_per_name_unit: int  # v4-8 and v5p-8 count TensorCores (2 per chip); v5e-8, v6e-8 count chips
    hbm_bytes: int
    peak_bf16_flops: float  # dense, per chip
    chips_per_host: int  # the largest single-host slice (v5e/v6e: 8 chips; v4/v5p: 4)


CHIPS = {
    "v4": Chip("v4", 3, 2, 32 * GiB, 275e12, 4),
    "v5p": Chip("v5p", 3, 2, 95 * 10 ** 9, 459e12, 4),
    "v5e": Chip("v5e", 2, 1, 16 * GiB, 197e12, 8),
    "v6e": Chip("v6e", 2, 1, 32 * GiB, 918e12, 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# What `fits` leaves free of the HBM. The compiler has its own limit, what it says is available to a program
# (measured here, in GiB: 15.75 of v5e's 16, 30.75 of v4's 32, 31.25 of v6e's 32, 95.74 on v5p, whose 95 GB
# specification `hbm_bytes` keeps), and refuses larger programs (RESOURCE_EXHAUSTED: a report with fits false).
# At run time the HBM also holds what one program's buffer assignment does not count: the next batch,
# transferred while the step runs (8 images at 512² in uint8: 6 MB), the code of the other programs loaded
# (the sampler for the training grids: 0.1–0.4 GiB), and what the allocator loses to fragmentation between
# them. 5 % of the chip (0.8 GiB on v5e, 1.6 GiB on v4/v6e, 4.8 GB on v5p) covers the first two with room for
# the third; a program that fits only within the margin is one to try on the chip before counting on it.
MARGIN = 0.05


@dataclasses.dataclass
class Topology:
    name: str  # as given
    generation: str
    shape: tuple[int, ...]
    slices: int
    devices: list

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"


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


def parse_topology(text: str) -> tuple[str, tuple[int, ...]]:
    """(generation, slice shape) from "v5e-8", "v5litepod-16", "v4-8", "v5p:2x2x2", "v6e:4x4"."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", text.strip().lower())
    if not m:
        raise TopologyError(f"--topology {text!r}: expected a Cloud TPU name like v5e-8, v5p-8, v4-8, v6e-8 or a "
                            f"topology like v5e:2x4, v5p:2x2x2")
    generation = ALIASES.get(m.group(1), m.group(1))
    if generation not in CHIPS:
        raise TopologyError(f"--topology {text!r}: unknown TPU generation {m.group(1)!r} (known: "
                            f"{', '.join([*CHIPS, *ALIASES])})")
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


def have_libtpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def quiet_libtpu() -> None:
    """libtpu, loaded on a host that is not a TPU VM, looks for the VM's own chips and workers and logs a page
    of errors when it finds none; the compiler does not need them. Set before libtpu loads; a TPU VM's own
    settings are kept. Several processes may load it at once (the tests' workers)."""
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_MIN_LOG_LEVEL", "3"), ("TPU_STDERR_LOG_LEVEL", "3"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-1"), ("TPU_WORKER_HOSTNAMES", "localhost")):
        os.environ.setdefault(key, value)


def topology(text: str, slices: int = 1) -> Topology:
    """The devices of the named slice (or of `slices` such slices, joined by the data-centre network), as the
    TPU compiler describes them; needs libtpu, runs on any host."""
    generation, shape = parse_topology(text)
    if slices < 1:
        raise TopologyError(f"--slices {slices}: must be at least 1")
    quiet_libtpu()
    from jax.experimental import topologies

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


# ---- what the compiled program says ------------------------------------------------------------------

_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# FLOPs per (query row × key row × head-dim column) of each splash kernel, for the matmuls it runs on the MXU:
# forward q·kᵀ and p·v; dq recomputes q·kᵀ, then dp = do·vᵀ and dq = ds·k; dkv recomputes q·kᵀ, then dp,
# dv = pᵀ·do and dk = dsᵀ·q. Two FLOPs per multiply-add.
_SPLASH_FLOPS = {"fwd": 4, "dq": 6, "dkv": 8}


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def _nbytes(shapes) -> int:
    return int(sum(_BYTES[t] * math.prod(s) for t, s in shapes))


def _instructions(hlo: str):
    """(name, result type text, opcode, line) of every HLO instruction."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
    for line in hlo.splitlines():
        m = pattern.match(line)
        if m:
            yield m.group(1), m.group(2), m.group(3), line


def mosaic_kernels(hlo: str) -> dict[str, int]:
    """The compiled program's Mosaic kernels (`tpu_custom_call`s), counted by name."""
    counts: dict[str, int] = {}
    for name, _, op, line in _instructions(hlo):
        if op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
            base = re.sub(r"\.\d+$", "", name)
            counts[base] = counts.get(base, 0) + 1
    return dict(sorted(counts.items()))


def _kernel_flops(result: str, name: str) -> float:
    kind = next((k for k in _SPLASH_FLOPS if f"splash_mha_{k}" in name), None)
    if kind is None:
        return 0.0
    out = max((s for t, s in _shapes(result) if len(s) >= 3), key=math.prod)
    return float(_SPLASH_FLOPS[kind] * math.prod(out[:-1]) * out[-2] * out[-1])


def _taps(n: int, m: int, k: int, stride: int, lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Σ over the m output positions of one spatial dimension of the window taps that land on one of the n
    input elements (not on padding, not between dilated elements)."""
    last = (n - 1) * lhs_dilate
    total = 0
    for o in range(m):
        for j in range(k):
            p = o * stride - lo + j * rhs_dilate
            total += 0 <= p <= last and p % lhs_dilate == 0
    return total


def _conv_flops(line: str, result, lhs, rhs) -> float:
    """2 × the multiply-adds of one convolution: each output element sums the kernel's input features over
    the window taps that hit the input (padding and dilation holes excluded, as the compiler counts them)."""
    labels = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", line)
    if not labels or lhs is None or rhs is None:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    window = dict(re.findall(r"(\w+)=([\d_x\-]+)", (re.search(r"window=\{([^}]*)\}", line) or [None, ""])[1]))
    spatial = sorted(c for c in out_l if c.isdigit())

    def per_dim(key, default):
        values = window.get(key)
        return [default] * len(spatial) if values is None else values.split("x")

    size, stride = per_dim("size", "1"), per_dim("stride", "1")
    pad, ld, rd = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1
    for d, c in enumerate(spatial):
        taps *= _taps(lhs[lhs_l.index(c)], result[out_l.index(c)], int(size[d]), int(stride[d]),
                      int(pad[d].split("_")[0]), int(ld[d]), int(rd[d]))
    return 2.0 * result[out_l.index("b")] * result[out_l.index("f")] * rhs[rhs_l.index("i")] * taps


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry = current = None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if head:
            current = head.group(2)
            comps[current] = []
            entry = current if head.group(1) else entry
        elif current is None:
            continue
        elif line.rstrip() == "}":
            current = None
        elif re.match(r"^\s+(ROOT\s+)?%", line) or not comps[current]:
            comps[current].append(line)
        else:  # an attribute printed over several lines (a Mosaic kernel's configuration)
            comps[current][-1] += " " + line.strip()
    return comps, entry


def _trip_count(condition: list[str]) -> int | None:
    """The trip count of a counted loop (`i < N` on a counter from 0, as lax.scan and fori_loop compile)."""
    constants = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        m = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
        if m and m.group(1) in constants:
            return int(constants[m.group(1)])
    return None


def program_flops(hlo: str) -> dict[str, float]:
    """The compiled program's matrix FLOPs (convolutions and dots, which is how a TPU program holds its
    matmuls) and splash-kernel FLOPs, each counted once per instruction (`static`, as the compiler's cost
    analysis counts a loop's body) and once per execution (`executed`: a counted loop's body times its trip
    count). `unknown_loops` counts loops whose trip count could not be read (counted once)."""
    comps, entry = _computations(hlo)
    shapes: dict[str, tuple[int, ...]] = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]", line)
            if m:
                shapes[m.group(1)] = tuple(int(d) for d in m.group(3).split(",") if d)
    unknown = set()
    memo: dict[tuple[str, bool], tuple[float, float]] = {}

    def flops(comp: str, executed: bool) -> tuple[float, float]:
        if (comp, executed) in memo:
            return memo[comp, executed]
        memo[comp, executed] = (0.0, 0.0)  # recursion guard
        matmul = kernel = 0.0
        for name, result, op, line in _instructions("\n".join(comps.get(comp, []))):
            operands = re.findall(r"%([\w.\-]+)", line[line.index(op + "(") + len(op) + 1:].split(")")[0])
            if op == "convolution" and len(operands) >= 2:
                matmul += _conv_flops(line, shapes.get(name), shapes.get(operands[0]), shapes.get(operands[1]))
            elif op == "dot" and operands:
                dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                lhs = shapes.get(operands[0])
                if dims and lhs is not None and shapes.get(name) is not None:
                    inner = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d)
                    matmul += 2.0 * math.prod(shapes[name]) * inner
            elif op == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
                kernel += _kernel_flops(result, name)
            elif op == "while":
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                cond = re.search(r"condition=%([\w.\-]+)", line).group(1)
                trips = _trip_count(comps.get(cond, [])) if executed else 1
                if trips is None:
                    unknown.add(name)
                    trips = 1
                m, k = flops(body, executed)
                matmul, kernel = matmul + trips * m, kernel + trips * k
            else:
                called = re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line)
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                for c in called:
                    m, k = flops(c, executed)
                    matmul, kernel = matmul + m, kernel + k
                if branches:  # a conditional runs one branch: the costliest, for a bound that holds
                    costs = [flops(c, executed) for c in re.findall(r"%([\w.\-]+)", branches.group(1))]
                    m, k = max(costs, key=sum)
                    matmul, kernel = matmul + m, kernel + k
        memo[comp, executed] = (matmul, kernel)
        return matmul, kernel

    if entry is None:
        return {"static_matmul": 0.0, "static_kernels": 0.0, "executed_matmul": 0.0, "executed_kernels": 0.0,
                "unknown_loops": 0}
    (sm, sk), (em, ek) = flops(entry, False), flops(entry, True)
    return {"static_matmul": sm, "static_kernels": sk, "executed_matmul": em, "executed_kernels": ek,
            "unknown_loops": len(unknown)}


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the compiled program's collectives, bytes being the size of what each
    produces on one chip. Static counts: one inside a loop body counts once. Each collective counts once, by
    its channel id: the TPU compiler runs an asynchronous one from a start fusion through
    `async_collective_fusion`s (carried on beside the compute it overlaps with) to a done fusion, each holding
    a copy of it. A reduce-scatter is a custom fusion of an all-reduce and the slice each chip keeps
    (`calls=%all-reduce-scatter…`): it counts as a reduce-scatter, its inner all-reduce not at all."""
    comps, _ = _computations(hlo)
    fused = {name for name in comps if name.startswith("all-reduce-scatter")}
    inner = {line for name in fused for line in comps[name]}
    out = {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
    seen = set()
    for n, (_, result, op, line) in enumerate(_instructions(hlo)):
        called = re.search(r"calls=%([\w.\-]+)", line) if op == "fusion" else None
        kind = "reduce-scatter" if called and called.group(1) in fused else op.removesuffix("-start")
        if kind not in out or op.endswith("-done") or line in inner:
            continue
        channel = re.search(r"channel_id=(\d+)", line)
        key = (kind, channel.group(1)) if channel else n
        if key in seen:
            continue
        seen.add(key)
        shapes = [s for s in _shapes(result) if s[1]]  # less the scalar contexts of an async start
        if op.endswith("-start") and kind in ("all-gather", "collective-permute") and len(shapes) >= 2:
            shapes = shapes[len(shapes) // 2:]  # (operands, results): the results
        out[kind]["count"] += 1
        out[kind]["bytes"] += _nbytes(shapes)
    return out


def dtype_census(hlo: str) -> dict[str, int]:
    """The compiled program's convolutions and matrix products (inside fusions too; a TPU program has its dots
    as convolutions) counted by operand and result dtypes, "bf16,bf16->f32": float32 operands in a bfloat16
    step run at a fraction of the MXU's rate, or show a cast that went missing."""
    types = {}
    found = []
    for name, result, op, line in _instructions(hlo):
        types[name] = [t for t, _ in _shapes(result)]
        if op in ("convolution", "dot"):
            args = line[line.index(op + "(") + len(op) + 1:].split(")")[0]
            found.append((op, re.findall(r"%([\w.\-]+)", args), types[name]))
    out: dict[str, int] = {}
    for op, operands, result in found:
        key = f"{op} {','.join(types.get(o, ['?'])[0] for o in operands)}->{','.join(result)}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def analyse(compiled, topo: Topology, program: str, per_chip_batch: float, *, compile_s: float,
            extra: dict | None = None, hlo_path: str | None = None) -> dict:
    """The report of a compiled program (see the module's docstring); its HLO text written to `hlo_path`."""
    m = compiled.memory_analysis()
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    per_chip = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes, "outputs": outputs,
                "generated_code": m.generated_code_size_in_bytes}
    per_chip["total"] = m.argument_size_in_bytes + m.temp_size_in_bytes + outputs + m.generated_code_size_in_bytes
    hlo = compiled.as_text()
    if hlo_path:
        from pbe_jax import storage

        storage.write_text(storage.path(hlo_path), hlo)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    counted = float(cost.get("flops", 0.0))
    # The cost analysis counts a loop's body once (the sampler's whole scan as one step) and sees nothing
    # inside a Mosaic kernel: add the loops' other iterations and the kernels, from the compiled HLO.
    counts = program_flops(hlo)
    loops = counts["executed_matmul"] - counts["static_matmul"]
    kernels = counts["executed_kernels"]
    flops = counted + loops + kernels
    roofline = flops / topo.chip.peak_bf16_flops
    rate_key = "samples_per_s_per_chip" if program == "train" else "images_per_s_per_chip"
    report = _base(topo, program)
    report.update({
        "per_chip_bytes": per_chip, "per_chip_batch": per_chip_batch,
        "fits": per_chip["total"] <= topo.chip.hbm_bytes * (1 - MARGIN),
        "flops_per_chip": flops, "flops_detail": {"cost_analysis": counted, "loop_iterations": loops, "mosaic_kernels": kernels,
                         "unknown_loops": counts["unknown_loops"]},
        "roofline_s": roofline, rate_key: per_chip_batch / roofline if roofline else None,
        "mosaic_kernels": mosaic_kernels(hlo), "collectives": collectives(hlo), "dtypes": dtype_census(hlo),
        "donated_aliased_bytes": m.alias_size_in_bytes, "compile_s": round(compile_s, 1), **(extra or {})})
    return report


def _base(topo: Topology, program: str) -> dict:
    return {"topology": topo.name, "topology_shape": topo.topology_name, "slices": topo.slices,
            "chips": topo.chips, "device_kind": topo.devices[0].device_kind, "program": program,
            "hbm_bytes": topo.chip.hbm_bytes, "margin": MARGIN, "peak_bf16_flops": topo.chip.peak_bf16_flops}


def out_of_memory(error: Exception, topo: Topology, program: str, per_chip_batch: float, *, compile_s: float,
                  extra: dict | None = None) -> dict | None:
    """The report of a program the compiler refused because it does not fit in HBM (None for other errors):
    what it said it needed and had."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    numbers = re.findall(r"\(([\d.]+)([KMGT])\)", text)
    unit = {"K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40}
    required = available = None
    if len(numbers) >= 2:
        required, available = (int(float(v) * unit[u]) for v, u in numbers[:2])
    report = _base(topo, program)
    report.update({"per_chip_bytes": {"total": required}, "per_chip_batch": per_chip_batch, "fits": False,
                   "compiler_available_bytes": available, "compiler_message": text.strip().splitlines()[0][:500],
                   "compile_s": round(compile_s, 1), **(extra or {})})
    return report


def compile_report(lowered_fn, topo: Topology, program: str, per_chip_batch: float, extra: dict,
                   hlo_path: str | None = None) -> dict:
    """Lower and compile (`lowered_fn()` returns a jax Lowered) and analyse; a program too large for HBM
    is a report with `fits` false, not an error."""
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - jax raises XlaRuntimeError / JaxRuntimeError
        report = out_of_memory(e, topo, program, per_chip_batch, compile_s=time.perf_counter() - t0, extra=extra)
        if report is None:
            raise
        return report
    return analyse(compiled, topo, program, per_chip_batch, compile_s=time.perf_counter() - t0, extra=extra,
                   hlo_path=hlo_path)


# ---- the two programs ----------------------------------------------------------------------------------

def shape_config(cfg):
    """`cfg` as the compiler needs it: model.init=sd|pbe without any folder or file takes the SD-1.4 and CLIP
    ViT-L/14 shapes (the configs' defaults, what those inits load) rather than failing; (cfg, note)."""
    from pbe_jax.train import config as config_lib

    m = cfg.model
    given = (m.sd_folder, m.sd_file) if m.init == "sd" else (m.pbe_folder, m.pbe_file) if m.init == "pbe" else (1,)
    if any(given):
        return cfg, None
    note = f"model.init={m.init} without a folder or file: SD-1.4 / CLIP ViT-L/14 shapes"
    return config_lib.override(cfg, ["model.init=scratch"]), note


def train_report(cfg, topo: Topology, hlo_path: str | None = None) -> dict:
    """The training step `train.py` builds for `cfg` (shapes only: `abstract_trainer`), on its (data, fsdp)
    mesh over the topology's devices (data across slices), for the batch the loader yields."""
    from pbe_jax import parallel
    from pbe_jax.train.loop import abstract_trainer, batch_spec

    cfg, note = shape_config(cfg)
    n = topo.chips
    if cfg.data.batch_size % n:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is not a multiple of the {n} chips of {topo.name}"
                         + (f" × {topo.slices} slices" if topo.slices > 1 else ""))
    mesh = parallel.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, devices=topo.devices)
    trainer = abstract_trainer(cfg, mesh=mesh)
    m = cfg.model
    extra = {"batch_size": cfg.data.batch_size, "image_size": cfg.data.image_size,
             "mesh": dict(mesh.shape), "remat": m.remat, "frozen_dtype": m.frozen_dtype, "dtype": m.dtype,
             "attention": m.attention, "state_bytes_per_chip": state_bytes_per_chip(trainer.state),
             **({"note": note} if note else {})}
    return compile_report(lambda: trainer.step_fn.lower(trainer.state, batch_spec(cfg)), topo, "train",
                          cfg.data.batch_size / n, extra, hlo_path)


def state_bytes_per_chip(state) -> int:
    """The bytes of one chip's shards of a (shape-only) train state: exact, no compile needed."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return int(total)


def sample_report(models, topo: Topology, *, batch_size: int, sampler: str, steps: int, size: int,
                  guidance_scale: float = 5.0, settings: dict | None = None, hlo_path: str | None = None) -> dict:
    """The whole generation `sample.py` runs (reference and masked-image encoding, the sampler's scan,
    decoding) for `batch_size` images of size², split as sample.py splits it: over the devices of one host
    (each host of a slice samples its own share of the jobs)."""
    from pbe_jax import parallel
    from pbe_jax.pipeline import PaintByExample

    host = [d for d in topo.devices if d.process_index == topo.devices[0].process_index
            and getattr(d, "slice_index", 0) == getattr(topo.devices[0], "slice_index", 0)]
    pipe = PaintByExample(models, mesh=parallel.data_mesh(host))
    if size % pipe.vae_factor:
        raise ValueError(f"--size {size}: must be a multiple of {pipe.vae_factor}, this model's autoencoder factor")
    per_host = Topology(topo.name, topo.generation, topo.shape, 1, host)
    extra = {"batch_size": batch_size, "image_size": size, "sampler": sampler, "steps": steps,
             "guidance_scale": guidance_scale, **(settings or {}),
             "hosts_in_slice": len({d.process_index for d in topo.devices}), "chips_per_host": len(host)}
    report = compile_report(lambda: pipe.lower(batch_size, size, size, steps=steps, sampler=sampler,
                                               guidance_scale=guidance_scale), per_host, "sample",
                            parallel.pad_to_multiple(batch_size, len(host)) / len(host), extra, hlo_path)
    report["topology"] = topo.name
    return report


def sample_models(pretrained: str | None, config: str | None, dtype: str, attention: str):
    """Shapes only: a folder's (or single file's) configs, or a named training config's networks."""
    import jax.numpy as jnp

    from pbe_jax import convert
    from pbe_jax.models import Policy

    policy = Policy(dtype=jnp.dtype(dtype), attention_backend=attention)
    if pretrained:
        from pbe_jax.pipeline import resolve_pretrained

        return convert.load_abstract(resolve_pretrained(pretrained), policy=policy)
    from pbe_jax.train import config as config_lib
    from pbe_jax.train.loop import abstract_models

    cfg, _ = shape_config(config_lib.load(config))
    cfg = config_lib.override(cfg, [f"model.dtype={dtype}", f"model.attention={attention}"])
    return abstract_models(cfg)


# ---- output ----------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    """A short, human-readable summary of a report."""
    gib = lambda n: "?" if n is None else f"{n / GiB:.2f} GiB"  # noqa: E731
    b = report["per_chip_bytes"]
    rows = [("topology", f"{report['topology']} ({report['topology_shape']}, {report['slices']} slice(s), "
                         f"{report['chips']} chips, {report['device_kind']})"),
            ("program", f"{report['program']}, batch {report.get('batch_size')} "
                        f"({report['per_chip_batch']:g} per chip)")]
    if "arguments" in b:
        rows.append(("per chip", f"{gib(b['arguments'])} arguments + {gib(b['temporaries'])} temporaries + "
                                 f"{gib(b['outputs'])} outputs + {gib(b['generated_code'])} code = {gib(b['total'])}"))
    else:
        rows.append(("per chip", f"{gib(b['total'])} needed, {gib(report.get('compiler_available_bytes'))} "
                                 f"available (the compiler refused it)"))
    limit = report["hbm_bytes"] * (1 - report["margin"])
    rows.append(("fits", f"{'yes' if report['fits'] else 'NO'} (HBM {gib(report['hbm_bytes'])}, less "
                         f"{report['margin']:.0%}: {gib(limit)})"))
    if "flops_per_chip" in report:
        rate_key = "samples_per_s_per_chip" if report["program"] == "train" else "images_per_s_per_chip"
        rows.append(("FLOPs per chip", f"{report['flops_per_chip'] / 1e12:.3f} T (of which Mosaic kernels "
                                       f"{report['flops_detail']['mosaic_kernels'] / 1e12:.3f} T)"))
        rows.append(("roofline", f"{report['roofline_s'] * 1e3:.1f} ms at {report['peak_bf16_flops'] / 1e12:.0f} "
                                 f"TFLOP/s → ≤ {report[rate_key]:.2f} {rate_key.replace('_', ' ')} (a lower bound "
                                 f"on time)"))
        kernels = ", ".join(f"{k} ×{v}" for k, v in report["mosaic_kernels"].items()) or "none"
        rows.append(("Mosaic kernels", kernels))
        coll = ", ".join(f"{k} ×{v['count']} ({v['bytes'] / GiB:.2f} GiB)" for k, v in report["collectives"].items()
                         if v["count"]) or "none"
        rows.append(("collectives", coll))
    rows.append(("compile", f"{report['compile_s']} s"))
    if report.get("note"):
        rows.append(("note", report["note"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def emit(report: dict, json_path: str | None) -> int:
    """Print the table (and write the JSON); the exit status: 0 fits, 3 does not."""
    print(table(report), flush=True)
    if json_path:
        from pbe_jax import storage

        storage.write_text(storage.path(json_path), json.dumps(report, indent=1) + "\n")
    return 0 if report["fits"] else 3


def no_libtpu() -> int:
    print('error: the TPU compiler (libtpu) is not installed; install the extra: pip install -e ".[tpu]"',
          file=sys.stderr)
    return 1


def prepare_host() -> None:
    """Compile on this host's CPU backend only: a TPU VM's own chips (perhaps busy training) are never opened,
    and a CPU host does not try to start a TPU runtime."""
    import jax

    quiet_libtpu()
    jax.config.update("jax_platforms", "cpu")


def check_train(cfg, topology_name: str, slices: int = 1, json_path: str | None = None) -> int:
    """`train.py --compile-only`: the training step of `cfg` compiled for a topology; the exit status of `emit`."""
    if not have_libtpu():
        return no_libtpu()
    prepare_host()
    return emit(train_report(cfg, topology(topology_name, slices)), json_path)


def main(argv=None) -> int:
    from pbe_jax.diffusion import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m pbe_jax.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="program", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--topology", required=True, help="v5e-8, v5p-8, v4-8, v6e-8, …, or v5e:2x4, v5p:2x2x2")
    common.add_argument("--slices", type=int, default=1, help="slices joined by the data-centre network (default 1)")
    common.add_argument("--json", metavar="FILE", help="also write the report as JSON (local or gs://)")
    common.add_argument("--hlo", metavar="FILE", help="also write the compiled program's HLO text, to read")
    t = sub.add_parser("train", parents=[common], help="the training step train.py builds",
                       description="The training step of a config, as train.py builds it, shapes only.")
    t.add_argument("--config", default="tiny", help="a name in configs/ or a config file (default tiny)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as train.py takes them")
    s = sub.add_parser("sample", parents=[common], help="the generation sample.py runs",
                       description="The whole jitted generation of sample.py, shapes only (a folder's configs are "
                                   "read, its weights never).")
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", help="a Paint-by-Example folder or single file (its configs only)")
    source.add_argument("--config", help="a training config's networks (sd14: SD-1.4 size)")
    s.add_argument("--batch-size", type=int, default=8, help="images per call, over one host's chips (default 8)")
    s.add_argument("--sampler", choices=SAMPLERS, default="plms")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--size", type=int, default=None, help="image side (default: the model's, 512 for SD)")
    s.add_argument("--scale", type=float, default=5.0, help="guidance scale (default 5: two UNet rows per image)")
    s.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    s.add_argument("--attention", choices=["auto", "xla", "splash"], default="auto")
    args = p.parse_args(argv)
    try:
        parse_topology(args.topology)
        if args.slices < 1:
            raise TopologyError(f"--slices {args.slices}: must be at least 1")
    except TopologyError as e:
        p.error(str(e))
    if args.program == "sample" and (args.batch_size < 1 or args.steps < 1):
        p.error("--batch-size and --steps must be at least 1")
    if not have_libtpu():
        return no_libtpu()
    prepare_host()
    try:
        topo = topology(args.topology, args.slices)
        if args.program == "train":
            from pbe_jax.train import config as config_lib

            cfg = config_lib.override(config_lib.load(args.config), args.overrides)
            report = train_report(cfg, topo, args.hlo)
        else:
            models = sample_models(args.pretrained, args.config, args.dtype, args.attention)
            report = sample_report(models, topo, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                                   size=args.size or models.vae.config.sample_size, guidance_scale=args.scale,
                                   settings={"dtype": args.dtype, "attention": args.attention}, hlo_path=args.hlo)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return emit(report, args.json)


if __name__ == "__main__":
    sys.exit(main())

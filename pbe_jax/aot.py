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
# What `fits` leaves free of the HBM. The compiler's own limit is already below the HBM (it reported 15.75 of
# 16 GiB on v5e, 30.75 of 32 on v4, 31.25 of 32 on v6e, 95.74 GB of 95 GB... of v5p's, for its runtime); at
# run time the same HBM also holds the next batch, transferred while the step runs, the programs' code, and
# whatever the allocator loses to fragmentation between programs, none of which the buffer assignment of one
# program counts. 5 % of the chip (0.8 GiB on v5e) covers the batch and the code of these programs many times
# over; fragmentation is what it is for.
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


def topology(text: str, slices: int = 1) -> Topology:
    """The devices of the named slice (or of `slices` such slices, joined by the data-centre network), as the
    TPU compiler describes them; needs libtpu, runs on any host."""
    generation, shape = parse_topology(text)
    if slices < 1:
        raise TopologyError(f"--slices {slices}: must be at least 1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiles at once (the tests' workers)
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


def kernel_flops(hlo: str) -> float:
    """FLOPs of the splash-attention kernels, which the compiler's cost analysis does not see into (it counts
    a few MFLOP for a kernel that does GFLOPs): from each call's output shape (…, heads, length, head dim, the
    padded sizes the MXU works on), self-attention (as many keys as queries)."""
    total = 0.0
    for name, result, op, line in _instructions(hlo):
        if op != "custom-call" or 'custom_call_target="tpu_custom_call"' not in line:
            continue
        kind = next((k for k in _SPLASH_FLOPS if f"splash_mha_{k}" in name), None)
        if kind is None:
            continue
        out = max((s for t, s in _shapes(result) if len(s) >= 3), key=math.prod)
        length, dim = out[-2], out[-1]
        total += _SPLASH_FLOPS[kind] * math.prod(out[:-1]) * length * dim
    return total


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the compiled program's collectives (async ones counted at their start),
    bytes being the size of what each produces on one chip. Static counts: one inside a loop body counts once."""
    out = {k: {"count": 0, "bytes": 0} for k in _COLLECTIVES}
    for _, result, op, _ in _instructions(hlo):
        kind = op.removesuffix("-start")
        if kind not in out or op.endswith("-done"):
            continue
        shapes = _shapes(result)
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
            extra: dict | None = None) -> dict:
    """The report of a compiled program (see the module's docstring)."""
    m = compiled.memory_analysis()
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    per_chip = {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes, "outputs": outputs,
                "generated_code": m.generated_code_size_in_bytes}
    per_chip["total"] = m.argument_size_in_bytes + m.temp_size_in_bytes + outputs + m.generated_code_size_in_bytes
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    counted = float(cost.get("flops", 0.0))
    kernels = kernel_flops(hlo)
    flops = counted + kernels
    roofline = flops / topo.chip.peak_bf16_flops
    rate_key = "samples_per_s_per_chip" if program == "train" else "images_per_s_per_chip"
    report = _base(topo, program)
    report.update({
        "per_chip_bytes": per_chip, "per_chip_batch": per_chip_batch,
        "fits": per_chip["total"] <= topo.chip.hbm_bytes * (1 - MARGIN),
        "flops_per_chip": flops, "flops_detail": {"cost_analysis": counted, "mosaic_kernels": kernels},
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


def compile_report(lowered_fn, topo: Topology, program: str, per_chip_batch: float, extra: dict) -> dict:
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
    return analyse(compiled, topo, program, per_chip_batch, compile_s=time.perf_counter() - t0, extra=extra)


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


def train_report(cfg, topo: Topology) -> dict:
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
                          cfg.data.batch_size / n, extra)


def state_bytes_per_chip(state) -> int:
    """The bytes of one chip's shards of a (shape-only) train state: exact, no compile needed."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return int(total)


def sample_report(models, topo: Topology, *, batch_size: int, sampler: str, steps: int, size: int,
                  guidance_scale: float = 5.0, settings: dict | None = None) -> dict:
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
                            parallel.pad_to_multiple(batch_size, len(host)) / len(host), extra)
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

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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
            report = train_report(cfg, topo)
        else:
            models = sample_models(args.pretrained, args.config, args.dtype, args.attention)
            report = sample_report(models, topo, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                                   size=args.size or models.vae.config.sample_size, guidance_scale=args.scale,
                                   settings={"dtype": args.dtype, "attention": args.attention})
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return emit(report, args.json)


if __name__ == "__main__":
    sys.exit(main())

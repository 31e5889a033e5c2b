"""The report of a program compiled for a TPU slice or GPU nodes: per device, the compiler's buffer assignment
(memory) against the device's, FLOPs (the compiler's cost model, plus the loops' further iterations and the
kernels' and library calls' FLOPs it cannot see) and the roofline time they imply at the peak bf16 rate (a lower
bound on a step's time, not a prediction), the kernels, library calls and collectives in the program, and the
dtypes of its products; and the two programs the project compiles, the training step and the sampler."""
from __future__ import annotations

import json
import math
import re
import time

from pbe_jax.aot.hlo import collectives, custom_calls, dtype_census, mosaic_kernels, program_flops
from pbe_jax.aot.targets import GiB, JAX_DEFAULT_MEM_FRACTION, Topology

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
    detail = flop_count(compiled, topo, hlo)
    flops = detail.pop("total")
    roofline = flops / topo.chip.peak_bf16_flops
    rate_key = "samples_per_s_per_chip" if program == "train" else "images_per_s_per_chip"
    report = _base(topo, program)
    report.update({
        "per_chip_bytes": per_chip, "per_chip_batch": per_chip_batch,
        "fits": per_chip["total"] <= topo.usable_bytes, **_allocator(per_chip["total"], topo),
        "flops_per_chip": flops, "flops_detail": detail,
        "roofline_s": roofline, rate_key: per_chip_batch / roofline if roofline else None,
        "mosaic_kernels": mosaic_kernels(hlo), "custom_calls": custom_calls(hlo), "collectives": collectives(hlo),
        "dtypes": dtype_census(hlo),
        "donated_aliased_bytes": m.alias_size_in_bytes, "compile_s": round(compile_s, 1), **(extra or {})})
    return report


def flop_count(compiled, topo: Topology, hlo: str | None = None) -> dict:
    """FLOPs per device of one execution of a compiled program: `total`, and its parts. The compiler's cost
    analysis counts a loop's body once (the sampler's whole scan as one step) and sees nothing inside a Mosaic
    kernel or a cuBLAS/cuDNN call: the loops' other iterations and the kernels' and calls' FLOPs are added from
    the compiled HLO (`hlo.program_flops`)."""
    counted = cost_model_flops(compiled, topo)
    counts = program_flops(compiled.as_text() if hlo is None else hlo)
    loops = counts["executed_matmul"] - counts["static_matmul"]
    kernels = counts["executed_kernels"]
    return {"total": counted + loops + kernels, "cost_analysis": counted, "loop_iterations": loops,
            "unknown_loops": counts["unknown_loops"], "mosaic_kernels": kernels if topo.platform == "tpu" else 0.0,
            "custom_calls": kernels if topo.platform == "gpu" else 0.0}


def _base(topo: Topology, program: str) -> dict:
    return {"topology": topo.name, "topology_shape": topo.topology_name, "slices": topo.slices,
            "chips": topo.chips, "device_kind": topo.devices[0].device_kind, "program": program,
            "platform": topo.platform, "hbm_bytes": topo.chip.hbm_bytes, "margin": topo.chip.margin,
            "reserve_bytes": topo.chip.reserve_bytes, "peak_bf16_flops": topo.chip.peak_bf16_flops,
            **({"nodes": topo.shape[0]} if topo.platform == "gpu" else {})}


def _allocator(total: int | None, topo: Topology) -> dict:
    """GPU only: the share of the GPU's memory JAX's allocator must be allowed (XLA_PYTHON_CLIENT_MEM_FRACTION,
    default 0.75) to hold the program and the reserve, rounded up to a hundredth."""
    if topo.platform != "gpu" or total is None:
        return {}
    return {"mem_fraction_needed": math.ceil(100 * (total + topo.chip.reserve_bytes) / topo.chip.hbm_bytes) / 100,
            "jax_default_mem_fraction": JAX_DEFAULT_MEM_FRACTION}


def cost_model_flops(compiled, topo: Topology) -> float:
    """The compiler's own FLOP count of a compiled program. The GPU compiler offers none without a GPU
    (cost_analysis() is None): its optimised module is counted with the CPU backend's cost model, which reads the
    same HLO operations and counts each custom call (a cuBLAS or cuDNN call) as −1 FLOP; those are undone here
    and the calls counted from their shapes instead (`hlo.program_flops`)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        return float(cost.get("flops", 0.0))
    if topo.platform != "gpu":
        return 0.0
    import jax
    import jax.extend.backend
    from jax._src.lib import _jax

    cpu = jax.extend.backend.get_backend("cpu")
    total = 0.0
    for module in compiled.runtime_executable().hlo_modules():
        counted = _jax.hlo_module_cost_analysis(cpu, module).get("flops", 0.0)
        total += counted + module.to_string().count(" custom-call(")
    return float(total)


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
                   **_allocator(required, topo),
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
    from pbe_jax.train.trainer import abstract_trainer, batch_spec

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
    """Shapes only (`convert.build_models(…, abstract=True)`): a folder's (or single file's) configs, or a named
    training config's networks; their kernels stored as `PaintByExample.from_pretrained` stores them (in a
    half-precision compute dtype)."""
    from pbe_jax.convert.build import build_models
    from pbe_jax.convert.source import ModelSource
    from pbe_jax.models.layers import store_kernels_in_compute_dtype

    if pretrained:
        from pbe_jax.pipeline import resolve_pretrained

        source = ModelSource.pretrained(resolve_pretrained(pretrained), dtype=dtype, attention=attention)
        models = build_models(source, abstract=True)
    else:
        from pbe_jax.train import config as config_lib
        from pbe_jax.train.trainer import models_of

        cfg, _ = shape_config(config_lib.load(config))
        models = models_of(config_lib.override(cfg, [f"model.dtype={dtype}", f"model.attention={attention}"]),
                           abstract=True)
    store_kernels_in_compute_dtype(*models.components().values())
    return models


# ---- output ----------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    """A short, human-readable summary of a report."""
    gib = lambda n: "?" if n is None else f"{n / GiB:.2f} GiB"  # noqa: E731
    gpu = report.get("platform") == "gpu"
    unit, memory = ("GPU", "memory") if gpu else ("chip", "HBM")
    b = report["per_chip_bytes"]
    where = (f"{report['nodes']} node(s), {report['chips']} GPUs" if gpu else
             f"{report['slices']} slice(s), {report['chips']} chips")
    rows = [("topology", f"{report['topology']} ({report['topology_shape']}, {where}, {report['device_kind']})"),
            ("program", f"{report['program']}, batch {report.get('batch_size')} "
                        f"({report['per_chip_batch']:g} per {unit})")]
    if "arguments" in b:
        rows.append((f"per {unit}", f"{gib(b['arguments'])} arguments + {gib(b['temporaries'])} temporaries + "
                                    f"{gib(b['outputs'])} outputs + {gib(b['generated_code'])} code = "
                                    f"{gib(b['total'])}"))
    else:
        rows.append((f"per {unit}", f"{gib(b['total'])} needed, {gib(report.get('compiler_available_bytes'))} "
                                    f"available (the compiler refused it)"))
    reserve = report.get("reserve_bytes", 0)
    limit = report["hbm_bytes"] * (1 - report["margin"]) - reserve
    less = f"{report['margin']:.0%}" + (f" and {gib(reserve)}" if reserve else "")
    fits = f"{'yes' if report['fits'] else 'NO'} ({memory} {gib(report['hbm_bytes'])}, less {less}: {gib(limit)})"
    if gpu and report["fits"] and report["mem_fraction_needed"] > report["jax_default_mem_fraction"]:
        fits += f"; set XLA_PYTHON_CLIENT_MEM_FRACTION={report['mem_fraction_needed']:.2f} (JAX takes 0.75 by default)"
    rows.append(("fits", fits))
    if "flops_per_chip" in report:
        rate_key = "samples_per_s_per_chip" if report["program"] == "train" else "images_per_s_per_chip"
        part = ("cuBLAS/cuDNN calls", "custom_calls") if gpu else ("Mosaic kernels", "mosaic_kernels")
        rows.append((f"FLOPs per {unit}", f"{report['flops_per_chip'] / 1e12:.3f} T (of which {part[0]} "
                                          f"{report['flops_detail'][part[1]] / 1e12:.3f} T)"))
        rate = rate_key.replace("_", " ").replace("chip", unit)
        rows.append(("roofline", f"{report['roofline_s'] * 1e3:.1f} ms at {report['peak_bf16_flops'] / 1e12:.0f} "
                                 f"TFLOP/s → ≤ {report[rate_key]:.2f} {rate} (a lower bound on time)"))
        if gpu:
            rows.append(("library calls", ", ".join(f"{k} ×{v}" for k, v in report["custom_calls"].items()) or "none"))
        else:
            rows.append(("Mosaic kernels", ", ".join(f"{k} ×{v}" for k, v in report["mosaic_kernels"].items())
                         or "none"))
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

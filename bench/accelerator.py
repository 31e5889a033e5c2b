"""Every accelerator measurement in one prepared call: full-size parity, sampling, training, a profile.

    python bench/accelerator.py --out DIR [--budget SECONDS] [--dry-run | --smoke] [--only A,B] [--skip A,B]
                                [--size N] [--reps N] [--jobs N]
    python bench/accelerator.py --list

Each section runs in its own subprocess with its own time limit, so an out-of-memory error, a crash or a
slow compile in one loses nothing else; DIR/results.json and DIR/results.md (the numbers beside the
targets and the H100 anchors) are rewritten as each section finishes, and DIR/sections.log keeps every
section's output. Sections run in order of value (`--list`); with `--budget` a section whose estimate no
longer fits in what is left is skipped and says so, so a 9-minute call returns all it could.

Weights are random at SD-1.4 size, drawn with numpy on the host. JAX runs with bf16 compute (float32
parameters) and attention `auto`; the PyTorch reference (diffusers, fp16 sampling, bf16-autocast training)
runs in its own sections with JAX kept off the accelerator. Neither framework preallocates.
`--dry-run` runs every section at the tiny configuration on the CPU (a test does, so this cannot rot);
`--smoke --size 64` runs every full-size code path with small batches and 2 sampling steps (on a CPU, before
a lending); `--size` alone runs the real sections at another image side (e.g. parity at 128² on a CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    title: str
    estimate_s: float  # on one H100/H200 at 512², start-up and compilation included (a guess until measured)
    limit_s: float  # killed after this
    torch: bool = False  # the PyTorch reference: JAX is kept on the CPU
    dry_estimate_s: float = 15.0
    cpu_estimate_s: float | None = None  # full-size shapes on a 2-core CPU at --size 128; None: not measured


# In order of value: the speed and memory targets first; full-size parity, already measured at 512² on the
# CPU (docs/benchmarks.md), then checks the GPU's kernels; the profile explains what is left.
SECTIONS = (
    Section("sample_jax", "JAX sampling: 50 PLMS steps and DPM-Solver++ 20, guidance 5, batch 1 and 16", 160, 300),
    Section("sample_torch", "diffusers PaintByExamplePipeline, fp16, same settings", 100, 240, torch=True),
    Section("train_step", "JAX full training step, batch 16", 150, 300),
    Section("train_torch", "PyTorch reference step, batch 16 (and 32 with checkpointing)", 90, 240, torch=True),
    Section("train_24gb", "JAX step, batch 1, remat, bf16 frozen towers (a 24 GB card?)", 120, 300),
    Section("unet_only", "JAX UNet-only step (ready latents), batch 16", 110, 240),
    Section("train_remat32", "JAX step, batch 32, remat", 150, 300),
    Section("parity_f32", "full-size parity, float32, highest matmul precision (no TF32)", 100, 240,
            cpu_estimate_s=90),
    Section("parity_bf16", "full-size parity, bf16 port vs PyTorch bf16", 110, 240, cpu_estimate_s=90),
    Section("profile", "jax.profiler trace of one guided sampling step, batch 16: top ops", 70, 180),
)
BY_NAME = {s.name: s for s in SECTIONS}

# The reference numbers in ../shared/anchors (one H100 80GB HBM3, 2026-11-24; logs named per row).
# The multistep solver measured beside PLMS-50: sample.py's default setting (chosen from bench/quality_steps.py;
# docs/sampling.md "Samplers and steps").
FAST_SAMPLER = ("dpmpp_2m", 20)

ANCHORS = {
    "sample_bs16": "diffusers fp16 2.83 img/s; + torch.compile 3.41; Flax UNet+cuDNN 5.23 (UNet only)",
    "sample_bs1": "diffusers fp16 2.10 s; + torch.compile 1.03 s; Flax 0.52 s",
    "sample_first": "Flax 27.4 s (batch 1); torch.compile 71 s",
    "sample_peak": "diffusers fp16 12.0 GiB (batch 16)",
    "train_bs16": "PyTorch 31.05 samples/s (38.8 GiB); Flax full step without CLIP 76.4",
    "train_compile": "Flax full step 102.6 s",
    "unet_only": "Flax 67.3 samples/s; Flax+cuDNN 122.9",
    "train_bs32": "PyTorch with checkpointing 30.9 samples/s, 31.6 GiB; Flax without remat: out of memory",
}


# ---------------------------------------------------------------------------------------------------------
# The orchestrator


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/accelerator.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for results.json, results.md and sections.log (created)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole call; sections that would not fit are skipped (default: no limit)")
    p.add_argument("--dry-run", action="store_true", help="every section at the tiny configuration, on the CPU")
    p.add_argument("--smoke", action="store_true",
                   help="the full-size sections with batches of 1-2 and 2 sampling steps: every full-size code path "
                        "in minutes on a CPU (with --size 64), to check before a lending; no target applies")
    p.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    p.add_argument("--skip", default=None, help="comma-separated section names to leave out")
    p.add_argument("--size", type=int, default=None, help="image side of the full-size sections (default 512)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 3; 1 dry)")
    p.add_argument("--jobs", type=int, default=None,
                   help="sections run at once (default 2 for --dry-run, where each compile uses one core of a "
                        "CPU, else 1; more than 1 only for --dry-run)")
    p.add_argument("--list", action="store_true", help="print the sections in order of value and exit")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = p.parse_args(argv)
    if args.list:
        for s in SECTIONS:
            print(f"{s.name:<14} ~{s.estimate_s:>4.0f} s (limit {s.limit_s:.0f})  {s.title}")
        return 0
    args.jobs = args.jobs or (2 if args.dry_run else 1)
    if args.jobs > 1 and not args.dry_run:
        p.error("--jobs > 1 is for --dry-run only: measurements share the machine otherwise")
    args.size = args.size or 512  # the dry run's sections keep their tiny configurations' sizes
    args.reps = args.reps or (1 if args.dry_run else 3)
    if args.section:
        return run_here(args)
    if not args.out:
        p.error("--out DIR is required")
    picked = {}
    for opt in ("only", "skip"):
        picked[opt] = [n for n in (getattr(args, opt) or "").split(",") if n]
        for name in picked[opt]:
            if name not in BY_NAME:
                p.error(f"--{opt}: no section {name!r} (sections: {', '.join(BY_NAME)})")
    chosen = [s for s in SECTIONS if (s.name in picked["only"] or not picked["only"]) and s.name not in picked["skip"]]
    return orchestrate(chosen, args)


def orchestrate(sections: list[Section], args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sections.log").write_text("")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
              "mode": ("dry-run (tiny, CPU)" if args.dry_run else
                       f"smoke (full-size networks at {args.size}², batches of 1-2, 2 sampling steps)" if args.smoke
                       else f"full size, {args.size}²"),
              "budget_s": args.budget, "sections": {}}
    on_gpu = "gpu" in report["machine"]
    t_start = time.perf_counter()
    queue, lock = list(sections), threading.Lock()
    def say(msg: str) -> None:  # one write per line: workers may print at once
        sys.stdout.write(f"[{time.perf_counter() - t_start:6.0f} s] {msg}\n")
        sys.stdout.flush()


    def worker() -> None:  # takes the next section in order of value until none is left
        while True:
            with lock:
                if not queue:
                    return
                sec = queue.pop(0)
                left = None if args.budget is None else args.budget - (time.perf_counter() - t_start)
                estimate = sec.dry_estimate_s if args.dry_run else sec.estimate_s if on_gpu else sec.cpu_estimate_s
                if left is not None and (estimate is None or estimate > left):
                    why = (f"estimated {estimate:.0f} s, {left:.0f} s left" if estimate is not None else
                           "no CPU estimate: full size on a CPU takes far longer than a budget")
                    report["sections"][sec.name] = {"status": "skipped", "why": why}
                    write_report(out, report)
                    continue
            own = sec.limit_s * (1 if on_gpu or args.dry_run else 3)  # full-size networks on a CPU: slower
            limit = own if left is None else min(own, left)
            say(f"{sec.name}: {sec.title} (limit {limit:.0f} s)")
            entry = run_section(sec, args, limit, out)
            say(f"{sec.name}: {entry['status']} in {entry['seconds']} s")
            with lock:
                report["sections"][sec.name] = entry
                write_report(out, report)

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["sections"] = {s.name: report["sections"][s.name] for s in sections}  # in order of value
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    write_report(out, report)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if all(e["status"] in ("ok", "skipped") for e in report["sections"].values()) else 1


def run_section(sec: Section, args, limit: float, out: Path) -> dict:
    """One section in a subprocess (its own process group, killed at `limit`): the RESULT lines it printed
    before finishing, failing or being killed are kept. Its output streams to OUT/.NAME.log, which is
    appended to OUT/sections.log when the section ends."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", sec.name, "--size", str(args.size),
           "--reps", str(args.reps)] + (["--dry-run"] if args.dry_run else []) + (["--smoke"] if args.smoke else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1")}
    if sec.torch or args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"
    if args.dry_run:  # on the CPU, and compiled with less LLVM optimisation: the run time does not matter
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    if args.jobs > 1:  # one core each: several multi-threaded runtimes on few cores thrash
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip())
    result, tail = {}, []
    own_log = out / f".{sec.name}.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=ROOT)

    def read():
        with own_log.open("w") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if line.startswith("RESULT "):
                    try:
                        result.update(json.loads(line[len("RESULT "):]))
                        continue
                    except json.JSONDecodeError:
                        pass
                tail.append(line)
                del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit status {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        status = f"timeout after {limit:.0f} s"
    reader.join(timeout=10)
    with (out / "sections.log").open("a") as f:
        f.write(f"===== {sec.name}: {status} =====\n{own_log.read_text()}")
    own_log.unlink()
    entry = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "result": result}
    if status != "ok":
        entry["output_tail"] = "".join(tail[-12:])[-3000:]
    return entry


def machine() -> dict:
    info = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if q.returncode == 0 and q.stdout.strip():
            info["gpu"] = q.stdout.strip()
    return info


def write_report(out: Path, report: dict) -> None:
    """results.json and results.md, each replaced whole (written beside, then renamed)."""
    for name, text in (("results.json", json.dumps(report, indent=1)), ("results.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)


# ---------------------------------------------------------------------------------------------------------
# results.md


def _get(report: dict, section: str, *keys):
    x = report["sections"].get(section, {}).get("result", {})
    for k in keys:
        if not isinstance(x, dict) or k not in x:
            return None
        x = x[k]
    return x


def _verdict(value, target: float, higher_is_better: bool) -> str:
    if not isinstance(value, (int, float)):
        return ""
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "met"
    miss = (target - value) / target if higher_is_better else (value - target) / target
    return f"missed by {100 * miss:.0f} %"


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, float)):
        return f"{x:g}{unit}"
    return str(x)


def aot_prediction(devices: set, batch: int) -> float | None:
    """What `python -m pbe_jax.aot`, compiling on a CPU host for this GPU, said the training step needs per GPU at
    this batch per GPU (bench/results/gpu-aot/train-<gpu>-8-b<batch>.json, bench/gpu_aot.py: data parallel on a
    node of 8, so the same program plus the gradient all-reduce): the tool's number beside the device's own
    compile and peak, so that one can be checked against the other."""
    kind = next((k for k in ("h100", "h200") if any(k.upper() in str(d) for d in devices)), None)
    path = ROOT / "bench" / "results" / "gpu-aot" / f"train-{kind}-8-b{batch}.json"
    if kind is None or not path.exists():
        return None
    return round(json.loads(path.read_text())["per_chip_bytes"]["total"] / 2 ** 30, 2)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# bench/accelerator.py — {report['mode']}", "",
             f"Machine: {m.get('gpu', 'no GPU')}; {m.get('cpus')} CPUs; Python {m.get('python')}. "
             f"Started {report['started']}" + (f", budget {report['budget_s']:.0f} s" if report.get("budget_s") else "")
             + (f", took {report['seconds']} s." if "seconds" in report else " (in progress)."), ""]
    devices = {e["result"].get("device") for e in report["sections"].values() if e.get("result", {}).get("device")}
    if devices:
        lines += [f"Devices seen by the sections: {', '.join(sorted(devices))}.", ""]

    jb1, jb16 = _get(report, "sample_jax", "batch1"), _get(report, "sample_jax", "batch16")
    tb1, tb16 = _get(report, "sample_torch", "batch1"), _get(report, "sample_torch", "batch16")
    fast = "{}_{}".format(*FAST_SAMPLER)
    fj16, ft16 = _get(report, "sample_jax", f"{fast}_batch16"), _get(report, "sample_torch", f"{fast}_batch16")
    step, t24, t32 = (_get(report, s, "step") for s in ("train_step", "train_24gb", "train_remat32"))
    unet = _get(report, "unet_only", "step")
    torch_rows = _get(report, "train_torch") or {}
    torch16, torch32 = (next((v for k, v in torch_rows.items() if k.endswith(f"_remat{r}")), None) for r in (0, 1))
    g = lambda row, k: row.get(k) if isinstance(row, dict) else None  # noqa: E731
    speedup = (g(fj16, "img_per_s") / g(jb16, "img_per_s")
               if isinstance(g(fj16, "img_per_s"), (int, float)) and g(jb16, "img_per_s") else None)
    batch = lambda section, full: _get(report, section, "batch") or full  # noqa: E731

    def ratio(a, b):
        return f"{a / b:.2f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "—"

    rows = [
        ("sampling, batch 16 (img/s)", "≥ 5.5", ANCHORS["sample_bs16"], g(jb16, "img_per_s"), g(tb16, "img_per_s"),
         ratio(g(jb16, "img_per_s"), g(tb16, "img_per_s")), _verdict(g(jb16, "img_per_s"), 5.5, True)),
        ("sampling, batch 1 (s/image)", "≤ 0.35", ANCHORS["sample_bs1"], g(jb1, "s_per_call"), g(tb1, "s_per_call"),
         ratio(g(tb1, "s_per_call"), g(jb1, "s_per_call")), _verdict(g(jb1, "s_per_call"), 0.35, False)),
        (f"sampling, batch 16, {fast} (img/s; × PLMS-50's)", "≥ 2.4×", "",
         f"{_fmt(g(fj16, 'img_per_s'))} ({ratio(g(fj16, 'img_per_s'), g(jb16, 'img_per_s'))})",
         f"{_fmt(g(ft16, 'img_per_s'))} ({ratio(g(ft16, 'img_per_s'), g(tb16, 'img_per_s'))})",
         ratio(g(fj16, "img_per_s"), g(ft16, "img_per_s")), _verdict(speedup, 2.4, True)),
        ("sampling, first call at batch 1 (s)", "≤ 30", ANCHORS["sample_first"], g(jb1, "first_call_s"),
         g(tb1, "first_call_s"), "", _verdict(g(jb1, "first_call_s"), 30, False)),
        ("sampling, peak memory at batch 16 (GiB)", "", ANCHORS["sample_peak"], g(jb16, "peak_GiB"),
         g(tb16, "peak_GiB"), "", ""),
        (f"training, full step, batch {batch('train_step', 16)} (samples/s)", "≥ 80", ANCHORS["train_bs16"],
         g(step, "samples_per_s"), g(torch16, "samples_per_s"),
         ratio(g(step, "samples_per_s"), g(torch16, "samples_per_s")), _verdict(g(step, "samples_per_s"), 80, True)),
        ("training, first step compiled (s)", "≤ 60", ANCHORS["train_compile"], g(step, "compile_s"), "", "",
         _verdict(g(step, "compile_s"), 60, False)),
        ("training, full step: MFU / peak GiB", "", "", f"{_fmt(g(step, 'mfu'))} / {_fmt(g(step, 'peak_GiB'))}",
         _fmt(g(torch16, "peak_GiB")), "", ""),
        ("training, full step: GiB compiled here / by pbe_jax.aot from a CPU host", "", "",
         f"{_fmt(g(step, 'compiled_GiB'))} / {_fmt(aot_prediction(devices, batch('train_step', 16)))}", "", "", ""),
        (f"training, UNet only, batch {batch('unet_only', 16)} (samples/s)", "≥ 130", ANCHORS["unet_only"],
         g(unet, "samples_per_s"), "", "", _verdict(g(unet, "samples_per_s"), 130, True)),
        (f"training, batch {batch('train_remat32', 32)} with remat (samples/s, peak GiB)", "fits",
         ANCHORS["train_bs32"],
         f"{_fmt(g(t32, 'samples_per_s'))}, {_fmt(g(t32, 'peak_GiB'))}",
         f"{_fmt(g(torch32, 'samples_per_s'))}, {_fmt(g(torch32, 'peak_GiB'))}", "",
         "met" if isinstance(t32, dict) else ""),
        ("training, batch 1, remat, bf16 frozen (peak GiB / compiled GiB)", "≤ 24", "",
         f"{_fmt(g(t24, 'peak_GiB'))} / {_fmt(g(t24, 'compiled_GiB'))}", "", "",
         _verdict(g(t24, "peak_GiB"), 24, False)),
    ]
    measured = [r for r in rows if any(_fmt(c).strip("—, /") for c in r[3:5])]
    if report["mode"].startswith(("dry", "smoke")):  # the numbers show the script works, not the targets
        measured = [r[:-1] + ("n/a (" + report["mode"].split()[0] + ")",) for r in measured]
    lines += ["## Against the targets", ""]
    if measured:
        lines += ["| measure | target | anchor (H100, ../shared/anchors) | JAX, this run | PyTorch, this run | "
                  "JAX / PyTorch | verdict |", "|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in measured]
    else:
        lines.append("No sampling or training section ran in this call.")

    for name, label in (("parity_f32", "float32, limit 1e-4 × scale"),
                        ("parity_bf16", "bf16 port vs the float32 reference; limit 2 × PyTorch bf16's own error")):
        comps = _get(report, name, "components")
        if comps:
            lines += ["", f"## Parity, {label} ({_get(report, name, 'device')}, {_get(report, name, 'size')}²)", "",
                      "| component | shape | max abs err | scale | rel err | PyTorch bf16 err | limit | ok |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {c['component']} | {tuple(c['shape'])} | {c['max_abs']:.3g} | {c['scale']:.3g} | "
                      f"{c['rel']:.2e} | {_fmt(c.get('torch_max_abs') and round(c['torch_max_abs'], 6))} | "
                      f"{c['limit']:.3g} | {'yes' if c['ok'] else 'NO'} |" for c in comps]

    ops = _get(report, "profile", "top_ops")
    if ops:
        lines += ["", f"## Profile: one guided sampling step, batch {_get(report, 'profile', 'batch')} "
                      f"({_get(report, 'profile', 'step_ms')} ms per step, wall clock; "
                      f"{_get(report, 'profile', 'track')})", "",
                  "| op | calls | total ms | share |", "|---|---|---|---|"]
        lines += [f"| `{o['name'][:80]}` | {o['count']} | {o['ms']:.2f} | {100 * o['share']:.1f} % |" for o in ops]

    lines += ["", "## Sections", "", "| section | status | seconds | what |", "|---|---|---|---|"]
    for sec in SECTIONS:
        e = report["sections"].get(sec.name)
        if e is not None:
            status = e["status"] + (f" ({e['why']})" if "why" in e else "")
            lines.append(f"| {sec.name} | {status} | {_fmt(e.get('seconds'))} | {sec.title} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The sections (each runs in its own process: `--section NAME`)


def emit(**values) -> None:
    """Hand partial results to the orchestrator: merged into the section's result as they arrive."""
    print("RESULT " + json.dumps(values), flush=True)


def run_here(args) -> int:
    fn = globals().get(f"section_{args.section}")
    if fn is None:
        raise SystemExit(f"no section {args.section!r}")
    ctx = SimpleNamespace(dry=args.dry_run, smoke=args.smoke, size=args.size, reps=args.reps,
                          versions=versions(args.section))
    emit(versions=ctx.versions)
    fn(ctx)
    return 0


def versions(section: str) -> dict:
    out = {}
    sec = BY_NAME.get(section)
    for name in ("jax", "flax", "torch", "diffusers", "transformers"):
        if name in ("torch", "diffusers", "transformers") and not (sec and (sec.torch or "parity" in section)):
            continue
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def section_sample_jax(ctx) -> None:
    import jax

    import sample_throughput

    with tempfile.TemporaryDirectory() as tmp:
        a = _sample_args(ctx, tmp)
        emit(device=jax.devices()[0].device_kind, size=a.size, steps=a.steps)
        sample_throughput.run_jax(a, emit=lambda k, row: emit(**{k: row}))


def section_sample_torch(ctx) -> None:
    import torch

    import sample_throughput

    with tempfile.TemporaryDirectory() as tmp:
        a = _sample_args(ctx, tmp)
        emit(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", size=a.size)
        sample_throughput.run_torch(a, emit=lambda k, row: emit(**{k: row}))


def _sample_args(ctx, tmp: str) -> SimpleNamespace:
    a = SimpleNamespace(config="tiny" if ctx.dry else "sd14", folder=None, attention="auto",
                        steps=2 if ctx.smoke else 50, reps=ctx.reps, batch_sizes=_pick(ctx, [1, 16], [1, 2]),
                        size=32 if ctx.dry else ctx.size,
                        samplers=[(FAST_SAMPLER[0], 2 if ctx.smoke else FAST_SAMPLER[1])])
    if ctx.dry:
        from pbe_jax.parity import reference

        a.folder = str(reference.save_tiny(tmp, "sd"))
    return a


def _pick(ctx, full, small, smoke=None):
    """The sections' batch sizes: the real ones, or small ones for --dry-run and --smoke (full-size networks
    on a 23 GiB CPU host: `smoke`, where it must be smaller still)."""
    if ctx.smoke:
        return small if smoke is None else smoke
    return small if ctx.dry else full


def _train_section(ctx, batch: int, remat: bool, *extra: str) -> None:
    import jax

    import train_throughput
    from pbe_jax.train.trainer import models_of

    cfg = _config(ctx, batch, remat, *extra)
    emit(device=jax.devices()[0].device_kind, batch=batch, remat=remat, frozen_dtype=cfg.model.frozen_dtype,
         size=cfg.data.image_size)
    emit(step=train_throughput.jax_step(cfg, models_of(cfg) if ctx.dry else train_throughput.full_size_models(),
                                        ctx.reps))


def _config(ctx, batch: int, remat: bool, *extra: str):
    """The training config of a section: tiny for --dry-run, else SD-1.4 size at --size."""
    import train_throughput

    if ctx.dry:
        return train_throughput.step_config("tiny", batch, remat, *extra)
    return train_throughput.step_config("sd14", batch, remat, *extra, size=ctx.size)


def section_train_step(ctx) -> None:
    _train_section(ctx, _pick(ctx, 16, 2), False)


def section_train_remat32(ctx) -> None:
    _train_section(ctx, _pick(ctx, 32, 4, smoke=2), True)


def section_train_24gb(ctx) -> None:
    _train_section(ctx, 1, True, "model.frozen_dtype=bfloat16")


def section_unet_only(ctx) -> None:
    import jax

    import train_throughput
    from pbe_jax.train.trainer import models_of

    b = _pick(ctx, 16, 2)
    cfg = _config(ctx, b, False)
    emit(device=jax.devices()[0].device_kind, batch=b)
    unet = models_of(cfg).unet if ctx.dry else train_throughput.full_size_models(("unet",)).unet
    emit(step=train_throughput.unet_only(unet, cfg, b, ctx.reps))


def section_train_torch(ctx) -> None:
    import torch

    import train_throughput

    with tempfile.TemporaryDirectory() as tmp:
        a = SimpleNamespace(config="tiny" if ctx.dry else "sd14", reps=ctx.reps, size=ctx.size,
                            rows=_pick(ctx, [(16, False), (32, True)], [(2, False), (4, True)],
                                       smoke=[(1, False), (2, True)]), folder=None)
        if ctx.dry:
            a.folder = str(train_throughput._tiny_torch_folder(tmp))
        emit(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        train_throughput.run_torch(a, emit=lambda k, row: emit(**{k: row}))


def _parity(ctx, dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    from pbe_jax.models import Policy
    from pbe_jax.parity import compare, reference

    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
        reference.disable_tf32()
    reference.quiet()
    t0 = time.perf_counter()
    built = reference.build_tiny("sd") if ctx.dry else reference.build_full_size()
    torch_modules = {k: built[k] for k in ("unet", "vae", "image_encoder")}
    models = reference.to_jax(torch_modules, Policy(dtype=jnp.dtype(dtype)))
    size = reference.TINY["sd"]["image_size"] if ctx.dry else ctx.size
    emit(device=jax.devices()[0].device_kind, size=size, build_s=round(time.perf_counter() - t0, 1))
    rows = compare.compare(torch_modules, models, dtype=dtype, batch=1, image_size=size)
    emit(components=rows, ok=all(r["ok"] for r in rows), seconds=round(time.perf_counter() - t0, 1))


def section_parity_f32(ctx) -> None:
    _parity(ctx, "float32")


def section_parity_bf16(ctx) -> None:
    _parity(ctx, "bfloat16")


def section_profile(ctx) -> None:
    """One guided UNet call (the body of the sampling loop) traced with jax.profiler; the trace's events
    on the device (the host's XLA threads on a CPU) summed by name."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pbe_jax.diffusion import guided, per_row
    from pbe_jax.models import Policy
    from pbe_jax.pipeline import default_dtype
    from pbe_jax.train.trainer import models_of

    b = _pick(ctx, 16, 2)
    if ctx.dry:
        cfg = _config(ctx, b, False)
        unet = models_of(cfg).unet
        lat = cfg.data.image_size // 4
    else:
        from sample_throughput import random_jax_models

        unet = random_jax_models(Policy(dtype=jnp.dtype(default_dtype())), components=("unet",)).unet
        lat = ctx.size // 8
    graphdef, state = nnx.split(unet)
    ctx_dim = unet.config.cross_attention_dim[0]
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (b, lat, lat, 4))
    extra = jax.random.normal(k[1], (b, lat, lat, 5))
    cond, uncond = jax.random.normal(k[2], (b, 1, ctx_dim)), jax.random.normal(k[3], (b, 1, ctx_dim))

    @jax.jit  # every array an argument: nothing is baked into the program as a constant
    def step(state, x, t, extra, cond, uncond):
        net = nnx.merge(graphdef, state)

        def eps_fn(z, t, context):
            return net(jnp.concatenate([z, per_row(extra, z.shape[0] // b)], axis=-1), t, context)

        return guided(eps_fn, cond, uncond, 5.0, True)(x, t)

    args = (state, x, jnp.asarray(500), extra, cond, uncond)
    jax.block_until_ready(step(*args))
    t0 = time.perf_counter()
    for _ in range(3):
        out = step(*args)
    jax.block_until_ready(out)
    step_ms = (time.perf_counter() - t0) / 3 * 1e3
    emit(device=jax.devices()[0].device_kind, batch=b, step_ms=round(step_ms, 2))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(3):
                out = step(*args)
            jax.block_until_ready(out)
        track, ops = summarise_trace(next(Path(tmp).rglob("perfetto_trace.json.gz")), calls=3)
    emit(track=track, top_ops=ops)


def section_selftest(ctx) -> None:
    """Not a measurement: the orchestrator's own test (tests/test_bench.py) runs it to see that a section
    that crashes or hangs after reporting something keeps what it reported and stops nothing else."""
    emit(started=True)
    behaviour = os.environ.get("PBE_SELFTEST", "ok")
    if behaviour == "crash":
        raise RuntimeError("selftest: crashing on purpose")
    if behaviour == "hang":
        time.sleep(3600)


def summarise_trace(path: Path, calls: int, top: int = 15) -> tuple[str, list[dict]]:
    """Complete events of a perfetto trace summed by name, per traced call. On a device (GPU/TPU) process:
    its "XLA Ops" line when there is one, else its stream lines (kernels), never the lines that span whole
    modules or steps, which would count every op twice. Without a device: the host's XLA ops."""
    import collections
    import gzip

    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    meta = {(e.get("name"), e.get("pid"), e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M"
            and e.get("name") in ("process_name", "thread_name")}
    procs = {pid: name for (kind, pid, _), name in meta.items() if kind == "process_name"}
    threads = {(pid, tid): name for (kind, pid, tid), name in meta.items() if kind == "thread_name"}
    device = {pid for pid, name in procs.items() if "/device:" in name}
    if device:
        on_device = {k: v for k, v in threads.items() if k[0] in device}
        ops_lines = {k for k, v in on_device.items() if v == "XLA Ops"}
        spans = ("Module", "Step", "Framework")  # lines whose events contain whole programs, not ops
        keep = ops_lines or {k for k, v in on_device.items() if not any(w in v for w in spans)}
        track = ", ".join(sorted({f"{procs[p]} {threads[(p, t)]}" for p, t in keep})) or "device"
        use = lambda e: (e.get("pid"), e.get("tid")) in keep  # noqa: E731
    else:
        track = ", ".join(sorted(procs.values())) or "host"
        use = lambda e: not e["name"].startswith("$") and _is_host_op(e["name"])  # noqa: E731
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and use(e):
            total[e["name"]] += e.get("dur", 0.0)
            count[e["name"]] += 1
    whole = sum(total.values()) or 1.0
    return track, [{"name": n, "count": count[n] // calls, "ms": round(d / 1e3 / calls, 3),
                    "share": round(d / whole, 4)} for n, d in total.most_common(top)]


def _is_host_op(name: str) -> bool:
    """On a CPU the trace holds the runtime's own spans beside the XLA ops; keep the ops."""
    runtime = ("PjitFunction", "PjRt", "Execute", "ThreadPool", "Allocate", "ParseArguments", "Handle inputs",
               "PythonRefManager", "TraceMe", "Thunk::")
    return not any(r in name for r in runtime)


if __name__ == "__main__":
    sys.exit(main())

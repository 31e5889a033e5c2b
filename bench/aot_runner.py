"""The runner the compile-table benches share (tpu_aot.py, gpu_aot.py): each case is one `python -m pbe_jax.aot`
command whose JSON report lands in a results folder; cases run one after another in their own process (a
full-size compile takes minutes and GBs of host memory) and the runner resumes, skipping a case whose JSON
exists. Each program's HLO text is kept gzipped in hlo/ beside the JSONs (not committed: tens of MB), so that
what the report reads from it can be read again without compiling (`recount`)."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(todo: dict[str, list[str]], names: list[str], out: Path, script: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in names if n not in todo]
    if unknown:
        print(f"error: unknown case(s) {', '.join(unknown)}; `python bench/{script} list` names them", file=sys.stderr)
        return 2
    hlo_dir = out / "hlo"
    for name in names or list(todo):
        path = out / f"{name}.json"
        if path.exists():
            continue
        t0 = time.perf_counter()
        hlo_dir.mkdir(exist_ok=True)
        hlo = hlo_dir / f"{name}.hlo"
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "pbe_jax.aot", *todo[name], "--json", str(path),
                                     "--hlo", str(hlo)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)  # this compile's own peak memory, not the runner's
            err.seek(0)
            lines = err.read().strip().splitlines()
        if os.waitstatus_to_exitcode(status) not in (0, 3):
            print(json.dumps({"case": name, "error": lines[-1:]}), flush=True)
            continue
        if hlo.exists():
            with open(hlo, "rb") as src, gzip.open(f"{hlo}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            hlo.unlink()
        report = json.loads(path.read_text())
        report["host"] = {"wall_s": round(time.perf_counter() - t0, 1),
                          "peak_rss_gb": round(usage.ru_maxrss / 1e6, 2),
                          "machine": "2-core CPU host (the project's CI size)"}
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({"case": name, "fits": report["fits"], "total_GiB": gib(report),
                          "compile_s": report["compile_s"]}), flush=True)
    return 0


def recount(out: Path) -> int:
    """What the report reads from the HLO text, read again from the kept HLO (after a fix to the reading)."""
    sys.path.insert(0, str(ROOT))
    from pbe_jax import aot

    for path in sorted((out / "hlo").glob("*.hlo.gz")):
        report_path = out / f"{path.name.removesuffix('.hlo.gz')}.json"
        if not report_path.exists():
            continue
        with gzip.open(path, "rt") as f:
            hlo = f.read()
        report = json.loads(report_path.read_text())
        report.update(collectives=aot.collectives(hlo), mosaic_kernels=aot.mosaic_kernels(hlo),
                      custom_calls=aot.custom_calls(hlo), dtypes=aot.dtype_census(hlo))
        report_path.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({"case": report_path.stem, "collectives": report["collectives"]}), flush=True)
    return 0


def sample_case(topology: str, per_device: int, devices: int, sampler: str, steps: int) -> tuple[str, list[str]]:
    """(case name, aot arguments) of SD-1.4's generation at `per_device` images per device of one host."""
    return (f"sample-{topology}-b{per_device}-{sampler}{steps}",
            ["sample", "--topology", topology, "--config", "sd14", "--batch-size", str(per_device * devices),
             "--sampler", sampler, "--steps", str(steps)])


def gib(report: dict) -> float | None:
    total = report["per_chip_bytes"].get("total")
    return None if total is None else round(total / 2 ** 30, 2)


def load(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def main(argv, doc: str, todo, out: Path, script: str, table) -> int:
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "list", "table", "recount"])
    p.add_argument("cases", nargs="*")
    args = p.parse_args(argv)
    if args.command == "run":
        return run(todo(), args.cases, out, script)
    if args.command == "recount":
        return recount(out)
    if args.command == "list":
        done = load(out)
        for name in todo():
            print(f"{'done' if name in done else '    '}  {name}")
        return 0
    print(table())
    return 0

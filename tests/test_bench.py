"""bench/accelerator.py: the dry run of every section (so the prepared GPU call cannot rot between
lendings), and the orchestrator's isolation of failing sections and its budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import accelerator  # noqa: E402


def test_dry_run_runs_every_section_without_grain_or_tfds(tmp_path):
    # The lent GPU machine has neither grain nor TensorFlow Datasets: make both unimportable.
    blocked = tmp_path / "blocked"
    for name in ("grain", "tensorflow_datasets", "tensorflow"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), "--out", str(out), "--dry-run",
                           "--jobs", "2"], capture_output=True, text=True, env=env, timeout=900)
    report = json.loads((out / "results.json").read_text())
    failed = {k: v.get("output_tail") for k, v in report["sections"].items() if v["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (proc.stdout[-2000:], failed)
    assert list(report["sections"]) == [s.name for s in accelerator.SECTIONS]
    r = {k: v["result"] for k, v in report["sections"].items()}
    assert r["parity_f32"]["ok"] and r["parity_bf16"]["ok"]
    assert [c["component"] for c in r["parity_f32"]["components"]] == ["image_encoder", "vae_encode", "vae_decode",
                                                                       "unet"]
    fast = "{}_{}".format(*accelerator.FAST_SAMPLER)
    for name in ("sample_jax", "sample_torch"):
        assert r[name]["batch1"]["img_per_s"] > 0 and r[name]["batch2"]["img_per_s"] > 0
        assert r[name][f"{fast}_batch1"]["img_per_s"] > 0 and r[name][f"{fast}_batch2"]["img_per_s"] > 0
    for name in ("train_step", "train_24gb", "train_remat32"):
        step = r[name]["step"]
        assert step["samples_per_s"] > 0 and step["compile_s"] > 0 and step["compiled_GiB"] > 0
        assert step["loss"] == pytest.approx(step["loss"]) and 0 < step["loss"] < 10  # finite
    assert r["train_24gb"]["frozen_dtype"] == "bfloat16" and r["train_remat32"]["remat"] is True
    assert r["unet_only"]["step"]["samples_per_s"] > 0
    assert set(r["train_torch"]) >= {"bs2_remat0", "bs4_remat1"}
    ops = r["profile"]["top_ops"]
    assert ops and all(o["ms"] >= 0 for o in ops) and sum(o["share"] for o in ops) <= 1.0001
    md = (out / "results.md").read_text()
    assert "## Against the targets" in md and "## Parity, float32" in md and "## Profile" in md
    assert "| sample_jax | ok |" in md
    log = (out / "sections.log").read_text()
    assert all(f"===== {s.name}: ok =====" in log for s in accelerator.SECTIONS)


def test_a_crash_or_a_hang_loses_nothing_else(tmp_path, monkeypatch):
    sections = [accelerator.Section("selftest", "crashes", 1, 60), accelerator.Section("selftest", "hangs", 1, 8),
                accelerator.Section("selftest", "works", 1, 60)]
    args = type("Args", (), dict(out=str(tmp_path), budget=None, dry_run=True, smoke=False, size=64, reps=1, jobs=1))()
    entries = []
    for sec, behaviour in zip(sections, ("crash", "hang", "ok")):
        monkeypatch.setenv("PBE_SELFTEST", behaviour)
        entries.append(accelerator.run_section(sec, args, sec.limit_s, tmp_path))
    crash, hang, ok = entries
    assert crash["status"].startswith("failed") and "crashing on purpose" in crash["output_tail"]
    assert hang["status"].startswith("timeout") and hang["seconds"] < 30
    assert ok["status"] == "ok"
    for e in entries:  # what each reported before it failed is kept
        assert e["result"]["started"] is True
    log = (tmp_path / "sections.log").read_text()
    assert log.count("===== selftest") == 3 and "crashing on purpose" in log


def test_budget_skips_what_does_not_fit_and_says_why(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), "--out", str(tmp_path),
                           "--dry-run", "--budget", "5", "--only", "profile,parity_f32"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["sections"]) == ["parity_f32", "profile"]  # in order of value, not as given
    for entry in report["sections"].values():
        assert entry["status"] == "skipped" and "s left" in entry["why"]
    assert "| parity_f32 | skipped (estimated 15 s, " in (tmp_path / "results.md").read_text()


def test_unknown_section_names_are_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), "--out", "x", "--only", "nope"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no section 'nope'" in proc.stderr and "sample_jax" in proc.stderr


def test_sample_throughput_reads_sampler_step_pairs():
    import argparse

    import sample_throughput

    assert sample_throughput.sampler_steps("dpmpp_2m:20,unipc:15") == [("dpmpp_2m", 20), ("unipc", 15)]
    assert sample_throughput.sampler_steps("") == []
    # The GPU call and the CPU benchmark measure what sample.py uses by default.
    sys.path.insert(0, str(ROOT))
    import sample

    default = (sample.DEFAULT_SAMPLER, sample.DEFAULT_STEPS)
    assert accelerator.FAST_SAMPLER == default
    assert sample_throughput.sampler_steps(sample_throughput.DEFAULT_SAMPLERS)[0] == default
    for bad in ("euler:20", "unipc", "unipc:0", "unipc:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected SAMPLER:STEPS"):
            sample_throughput.sampler_steps(bad)


def test_input_pipeline_quick_reports_every_source_and_the_demand(tmp_path):
    pytest.importorskip("grain")
    pytest.importorskip("array_record")
    out = tmp_path / "input_pipeline.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "input_pipeline.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads(out.read_text())
    assert set(report["sources"]) == {f"{kind}-{size}" for kind in ("shards", "folder")
                                      for size in ("512", "1024x768", "12MP")}
    assert report["sources"]["shards-12MP"]["size"] == [1365, 1024]  # stored with its shorter side at 1024
    for row in report["sources"].values():
        assert row["split"]["decode_ms"] > 0 and row["split"]["pair_ms"] > 0
        assert row["workers_0"]["samples_per_s"] > 0 and "workers_1" not in row  # --quick: no worker processes
    for topology in ("v5p-8", "v5e-8", "v6e-8"):
        d = report["demand"][topology]
        assert d["samples_per_s_per_host"] == pytest.approx(d["chips_per_host"] * d["roofline_samples_per_s_per_chip"],
                                                            rel=1e-2)
        assert set(d["cores_needed"]) == {"shards-512", "shards-12MP"}

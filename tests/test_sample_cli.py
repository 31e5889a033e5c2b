"""sample.py: one edit with its grid, batch runs over a manifest or a COCOEE folder, resume, bad inputs."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

from pbe_jax import batch, defaults  # noqa: E402
from conftest import xla_env


def write_inputs(folder: Path, n: int, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        src = folder / f"src_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size + 4 * i, size, 3), dtype=np.uint8)).save(src)
        m = np.zeros((size + 4 * i, size), np.uint8)  # the source's size (each source a little taller)
        m[8:24, 8:20 + i] = 255
        Image.fromarray(m).save(folder / f"mask_{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / f"ref_{i}.jpg")
        rows.append({"id": f"item{i}", "source": f"src_{i}.png", "mask": f"mask_{i}.png", "reference": f"ref_{i}.jpg"})
    return rows


COMMON = ["--steps", "3", "--size", "32"]


def test_single_edit_writes_result_and_grid(tiny_folder, tmp_path):
    write_inputs(tmp_path, 1)
    rc = sample.main(["--pretrained", str(tiny_folder("sd")), "--image", str(tmp_path / "src_0.png"),
                      "--mask", str(tmp_path / "mask_0.png"), "--reference", str(tmp_path / "ref_0.jpg"),
                      "--out", str(tmp_path / "out" / "edit.png"), *COMMON])
    assert rc == 0
    result = np.asarray(Image.open(tmp_path / "out" / "edit.png"))
    grid = np.asarray(Image.open(tmp_path / "out" / "edit_grid.png"))
    assert result.shape == (32, 32, 3) and grid.shape[0] == defaults.GRID_HEIGHT and grid.shape[1] > 4 * 256
    factor = defaults.GRID_HEIGHT // 32  # enlarged by whole pixels for looking at
    np.testing.assert_array_equal(grid[::factor, ::factor][:, -32:], result)


def test_samples_draw_several_seeds_into_one_grid(tiny_folder, tmp_path):
    write_inputs(tmp_path, 1)
    out = tmp_path / "e.png"
    args = ["--pretrained", str(tiny_folder("sd")), "--image", str(tmp_path / "src_0.png"), "--mask",
            str(tmp_path / "mask_0.png"), "--reference", str(tmp_path / "ref_0.jpg"), *COMMON]
    assert sample.main([*args, "--out", str(out), "--samples", "3", "--seed", "5"]) == 0
    edits = [np.asarray(Image.open(tmp_path / n)) for n in ("e.png", "e_1.png", "e_2.png")]
    assert not np.array_equal(edits[0], edits[1]) and not np.array_equal(edits[1], edits[2])
    assert sample.main([*args, "--out", str(tmp_path / "one.png"), "--seed", "6"]) == 0  # = the second of three
    # up to the last bit of XLA's arithmetic, which can differ between a batch of 3 and of 1 (see docs/sampling.md)
    one = np.asarray(Image.open(tmp_path / "one.png")).astype(int)
    assert np.abs(one - edits[1]).max() <= 1 and (one != edits[1]).mean() < 1e-3
    grid = np.asarray(Image.open(tmp_path / "e_grid.png"))
    factor = defaults.GRID_HEIGHT // 32
    np.testing.assert_array_equal(grid[::factor, ::factor][:, -32:], edits[2])


def test_no_arguments_means_the_shipped_model_and_example():
    args = sample.parse_args([])
    assert Path(args.pretrained) == defaults.SHIPPED_MODEL and args.out == str(sample.DEFAULT_OUT)
    for role, path in (("source", args.image), ("mask", args.mask), ("reference", args.reference[0])):
        assert Path(path) == defaults.SHIPPED_EXAMPLE / f"{role}.png" and Path(path).is_file()


def test_defaults_are_held_once_and_help_imports_no_jax():
    """sample.py's defaults are pbe_jax.defaults' own objects (the web page's too, tests/test_app.py); reading them,
    the image helpers, and both --help pages import no JAX."""
    p = sample.build_parser()
    sampler = next(a for a in p._actions if a.dest == "sampler")
    assert sampler.choices is defaults.SAMPLERS and p.get_default("sampler") is defaults.DEFAULT_SAMPLER
    assert p.get_default("steps") is defaults.DEFAULT_STEPS and p.get_default("scale") is defaults.DEFAULT_SCALE
    check = """
import runpy, sys
import pbe_jax.defaults, pbe_jax.images
for argv, run in ((["sample.py", "--help"], lambda: runpy.run_path("sample.py", run_name="__main__")),
                  (["app", "--help"], lambda: runpy.run_module("pbe_jax.app", run_name="__main__"))):
    sys.argv = argv
    try:
        run()
    except SystemExit as e:
        assert e.code == 0, e.code
print(sorted(m for m in sys.modules if m == "jax" or m.startswith(("jax.", "flax"))))
"""
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: sample.py" in proc.stdout and "usage: python -m pbe_jax.app" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"


def test_batch_manifest_resume_and_failures(tiny_folder, tmp_path, capsys):
    rows = write_inputs(tmp_path, 5)
    (tmp_path / "src_2.png").write_bytes(b"not a png")  # unreadable
    Image.fromarray(np.zeros((44, 32), np.uint8)).save(tmp_path / "mask_3.png")  # empty mask
    Image.fromarray(np.full((36, 32), 255, np.uint8)).save(tmp_path / "mask_1.png")  # full mask: a valid edit
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    args = ["--pretrained", str(tiny_folder("sd")), "--batch", str(tmp_path / "jobs.jsonl"), "--out", str(out),
            "--batch-size", "2", *COMMON]
    assert sample.main(args) == 0
    assert f"3 written, 0 already done, 2 failed (see {out / 'failures.jsonl'})" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["item0.png", "item1.png", "item4.png"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failures} == {"item2", "item3"}
    assert any("src_2.png: cannot read image" in f["error"] for f in failures)
    assert any("mask is empty" in f["error"] for f in failures)

    first = np.asarray(Image.open(out / "item4.png"))
    (out / "item4.png").unlink()
    mtime = (out / "item0.png").stat().st_mtime_ns
    assert sample.main(args) == 0
    assert (out / "item0.png").stat().st_mtime_ns == mtime  # finished outputs are not recomputed
    # Redone alone, with the same --batch-size (batch.run's promise; another batch size compiles other shapes,
    # whose float rounding may differ in the last bit): the same picture.
    np.testing.assert_array_equal(np.asarray(Image.open(out / "item4.png")), first)


def test_cocoee_layout_with_release_names(tmp_path):
    for sub, suffix in (("GT_3500", "_GT"), ("Mask_bbox_3500", "_mask"), ("Ref_3500", "_ref")):
        (tmp_path / sub).mkdir()
        for i in ("000000000139", "000000000285"):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / sub / f"{i}{suffix}.png")
    jobs = batch.load_jobs(tmp_path)
    assert [j.id for j in jobs] == ["000000000139", "000000000285"]
    assert jobs[0].mask.name == "000000000139_mask.png"
    (tmp_path / "Ref_3500" / "000000000285_ref.png").unlink()
    with pytest.raises(FileNotFoundError, match="no matching mask or reference"):
        batch.load_jobs(tmp_path)


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--pretrained", "x", "--out", "y", "--image", "a.png"])
    assert "needs --image, --mask and --reference" in capsys.readouterr().err
    for bad, message in ((["--batch", "m.jsonl"], "--batch needs --out"),
                         (["--samples", "0"], "argument --samples: must be at least 1, got 0"),
                         (["--batch", "m.jsonl", "--out", "o", "--samples", "2"], "for one edit only"),
                         (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
                         (["--steps", "ten"], "argument --steps: expected a number, got 'ten'"),
                         (["--scale", "-1"], "argument --scale: must be at least 0.0, got -1"),
                         (["--eta", "-0.5"], "argument --eta: must be at least 0.0, got -0.5"),
                         (["--eta", "0.5"], "--eta is DDIM's; give --sampler ddim"),
                         (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'")):
        with pytest.raises(SystemExit) as exit_:
            sample.parse_args(bad)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1 and "Traceback" not in err
    # Not a multiple of the model's autoencoder factor (4 for the shipped model): known once it is loaded.
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--size", "63"])
    assert exit_.value.code == 2
    assert "--size 63: must be a multiple of 4, this model's autoencoder factor" in capsys.readouterr().err
    from pbe_jax.diffusion import SAMPLERS

    assert sample.SAMPLERS is SAMPLERS is defaults.SAMPLERS  # the library's list, held once
    assert sample.main(["--pretrained", str(tmp_path / "none"), "--batch", "m.jsonl", "--out", "o"]) == 1
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"source": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object with source, mask and reference"):
        batch.read_manifest(tmp_path / "bad.jsonl")


def test_sharded_over_eight_devices_equals_one_device(tiny_folder, tmp_path):
    """The batch is split over 8 fake CPU devices (5 rows, padded to 8) and gives the one-device pictures."""
    write_inputs(tmp_path, 5)
    code = f"""
import numpy as np, jax
from pbe_jax import parallel, batch
from pbe_jax.pipeline import PaintByExample
assert len(jax.devices()) == 8
ids = range(5)
src = [batch.images.to_rgb(r"{tmp_path}/src_%d.png" % i) for i in ids]
msk = [batch.images.to_mask(r"{tmp_path}/mask_%d.png" % i) for i in ids]
ref = [batch.images.to_rgb(r"{tmp_path}/ref_%d.jpg" % i) for i in ids]
kw = dict(steps=3, height=32, width=32, seed=[7, 8, 9, 10, 11])
multi = PaintByExample.from_pretrained(r"{tiny_folder('sd')}", mesh=parallel.data_mesh())(src, msk, ref, **kw)
single = PaintByExample.from_pretrained(r"{tiny_folder('sd')}", mesh=parallel.data_mesh(jax.devices()[:1]))(
    src, msk, ref, **kw)
print("maxdiff", max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(multi, single)))
"""
    env = xla_env(xla_force_host_platform_device_count=8)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split("maxdiff")[-1]) <= 1


def test_batch_in_a_bucket_interrupted_and_resumed(tiny_folder, tmp_path, bucket_dir, capsys):
    """Model, manifest, inputs and outputs all in a bucket: a run killed midway, then resumed, finishes the
    rest and gives the pictures of a local run; an unreadable input is listed in the bucket's failures.jsonl."""
    from pbe_jax import storage

    n = 16
    rows = write_inputs(tmp_path, n)
    (tmp_path / "src_2.png").write_bytes(b"not a png")
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for f in tmp_path.iterdir():
        storage.write_bytes(bucket_dir / "in" / f.name, f.read_bytes())
    model = tiny_folder("sd")
    for f in model.rglob("*"):
        if f.is_file():
            storage.write_bytes(bucket_dir / "model" / f.relative_to(model).as_posix(), f.read_bytes())

    assert sample.main(["--pretrained", str(model), "--batch", str(tmp_path / "jobs.jsonl"), "--out",
                        str(tmp_path / "local"), "--batch-size", "1", *COMMON]) == 0
    out = bucket_dir / "out"
    args = ["--pretrained", str(bucket_dir / "model"), "--batch", str(bucket_dir / "in" / "jobs.jsonl"), "--out",
            str(out), "--batch-size", "1", *COMMON]
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ, cwd=ROOT)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        storage.refresh(out)
        if any(name.endswith(".png") for name in storage.names(out)):
            break
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    storage.refresh(out)
    assert out.exists(), err[-3000:]
    before = sorted(name for name in storage.names(out) if name.endswith(".png"))
    assert 1 <= len(before) < n - 1, before  # interrupted midway

    capsys.readouterr()
    assert sample.main(args) == 0
    assert f"{n - 1 - len(before)} written, {len(before)} already done, 1 failed" in capsys.readouterr().out
    storage.refresh(out)
    written = sorted(name for name in storage.names(out) if name.endswith(".png"))
    assert written == sorted(p.name for p in (tmp_path / "local").glob("*.png")) and len(written) == n - 1
    for name in written:
        np.testing.assert_array_equal(np.asarray(Image.open(storage.local_or_buffer(out / name))),
                                      np.asarray(Image.open(tmp_path / "local" / name)), err_msg=name)
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["item2"]


def test_two_hosts_do_each_job_once_and_match_one_host(tiny_folder, tmp_path, capsys):
    """`--distributed` on two processes (localhost, gloo) and `--shard I/N` without collectives: every job is
    done by exactly one host, the pictures are a one-host run's, each host resumes its own share, and the
    failures of all hosts end up in one failures.jsonl."""
    from conftest import free_port

    rows = write_inputs(tmp_path, 7)
    (tmp_path / "src_1.png").write_bytes(b"not a png")  # job 1: host 1's share
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "mask_4.png")  # job 4 (empty mask): host 0's
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--pretrained", str(tiny_folder("sd")), "--batch", str(tmp_path / "jobs.jsonl"), "--batch-size", "2",
              *COMMON]
    assert sample.main([*common, "--out", str(tmp_path / "one")]) == 0
    reference = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "one").glob("*.png")}
    assert len(reference) == 5

    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}
    logs = [open(tmp_path / f"host{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *common, "--out", str(tmp_path / "two"),
                               "--distributed"], stdout=logs[i], stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                              env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    for p in procs:
        p.wait(timeout=600)
    out = [(tmp_path / f"host{i}.log").read_text() for i in range(2)]
    assert all(p.returncode == 0 for p in procs), out
    # Host 0 has jobs 0, 2, 4, 6 (4 unusable), host 1 jobs 1, 3, 5 (1 unreadable).
    assert "shard 0/2: 3 written, 0 already done, 1 failed" in out[0]
    assert "shard 1/2: 2 written, 0 already done, 1 failed" in out[1]
    assert "all shards: 5 written, 0 already done, 2 failed; 2 failed in all" in out[0]
    two = {p.name: np.asarray(Image.open(p)) for p in (tmp_path / "two").glob("*.png")}
    assert two.keys() == reference.keys() and all(np.array_equal(two[k], reference[k]) for k in two)
    summary = [json.loads(x)["id"] for x in (tmp_path / "two" / "failures.jsonl").read_text().splitlines()]
    assert summary == ["item1", "item4"]

    # --shard: the same split without collectives; a host resumes only its own share; the last to finish
    # writes the summary.
    sharded = tmp_path / "sharded"
    capsys.readouterr()
    assert sample.main([*common, "--out", str(sharded), "--shard", "1/2"]) == 0
    assert "shard 1/2: 2 written" in capsys.readouterr().out and not (sharded / "failures.jsonl").exists()
    (sharded / "item3.png").unlink()
    assert sample.main([*common, "--out", str(sharded), "--shard", "1/2"]) == 0
    assert "shard 1/2: 1 written, 1 already done, 1 failed" in capsys.readouterr().out
    assert sample.main([*common, "--out", str(sharded), "--shard", "0/2"]) == 0
    assert f"2 failed in all, listed in {sharded / 'failures.jsonl'}" in capsys.readouterr().out
    got = {p.name: np.asarray(Image.open(p)) for p in sharded.glob("*.png")}
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)
    assert [json.loads(x)["id"] for x in (sharded / "failures.jsonl").read_text().splitlines()] == ["item1", "item4"]
    with pytest.raises(SystemExit):
        sample.parse_args([*common, "--out", "o", "--shard", "2/2"])
    assert "I must be in 0..N-1" in capsys.readouterr().err


def test_a_second_run_takes_every_program_from_the_compilation_cache(tmp_path):
    """sample.py with --compile-cache: the first process compiles and stores its programs, the second finds
    every one of them (JAX reports misses as warnings with JAX_EXPLAIN_CACHE_MISSES) and edits identically;
    with 'off' nothing is stored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PERSISTENT_CACHE", "JAX_COMPILATION_CACHE"))}
    env["JAX_EXPLAIN_CACHE_MISSES"] = "1"

    def run(cache, name):
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--steps", "2", "--compile-cache", str(cache),
                            "--out", str(tmp_path / name)], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stderr.count("PERSISTENT COMPILATION CACHE MISS"), "MISS for 'jit_edit'" in r.stderr

    assert run(tmp_path / "cache", "a.png") == (len(list((tmp_path / "cache").iterdir())), True)
    stored = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(name.startswith("jit_edit-") for name in stored)
    assert run(tmp_path / "cache", "b.png") == (0, False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == stored
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    run("off", "c.png")
    assert not (ROOT / "off").exists()

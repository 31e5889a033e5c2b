"""sample.py: one edit with its grid, batch runs over a manifest or a COCOEE folder, resume, bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

from pbe_jax import batch  # noqa: E402


def write_inputs(folder: Path, n: int, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        src = folder / f"src_{i}.png"
        Image.fromarray(rng.integers(0, 256, (size + 4 * i, size, 3), dtype=np.uint8)).save(src)
        m = np.zeros((size, size), np.uint8)
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
    assert result.shape == (32, 32, 3) and grid.shape[0] == sample.GRID_HEIGHT and grid.shape[1] > 4 * 256
    factor = sample.GRID_HEIGHT // 32  # enlarged by whole pixels for looking at
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
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), edits[1])
    grid = np.asarray(Image.open(tmp_path / "e_grid.png"))
    factor = sample.GRID_HEIGHT // 32
    np.testing.assert_array_equal(grid[::factor, ::factor][:, -32:], edits[2])


def test_no_arguments_means_the_shipped_model_and_example():
    args = sample.parse_args([])
    assert Path(args.pretrained) == sample.DEFAULT_MODEL and args.out == str(sample.DEFAULT_OUT)
    for role, path in (("source", args.image), ("mask", args.mask), ("reference", args.reference)):
        assert Path(path) == sample.DEFAULT_EXAMPLE / f"{role}.png" and Path(path).is_file()


def test_batch_manifest_resume_and_failures(tiny_folder, tmp_path, capsys):
    rows = write_inputs(tmp_path, 5)
    (tmp_path / "src_2.png").write_bytes(b"not a png")  # unreadable
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "mask_3.png")  # empty mask
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask_1.png")  # full mask: a valid edit
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
    assert sample.main(args[:-len(COMMON) - 2] + ["--batch-size", "3", *COMMON]) == 0
    assert (out / "item0.png").stat().st_mtime_ns == mtime  # finished outputs are not recomputed
    np.testing.assert_array_equal(np.asarray(Image.open(out / "item4.png")), first)  # same seed, other batch


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
                         (["--samples", "0"], "--samples must be ≥ 1"),
                         (["--batch", "m.jsonl", "--out", "o", "--samples", "2"], "for one edit only")):
        with pytest.raises(SystemExit):
            sample.parse_args(bad)
        assert message in capsys.readouterr().err
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
print("maxdiff", np.abs(multi.astype(int) - single.astype(int)).max())
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split("maxdiff")[-1]) <= 1

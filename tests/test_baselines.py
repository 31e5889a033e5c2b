"""The model-free baselines (pbe_jax.eval.baselines): copy-paste and unchanged results on the synthetic
benchmark, resumable and skipping unusable inputs through batch.run, passed through the shipped autoencoder
(batched, equal to one image at a time), their CLI; and data/ importing no model code."""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pbe_jax import images
from pbe_jax.data import benchmark
from pbe_jax.eval import baselines

from conftest import SMALL_BENCHMARK

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "synthetic"
SIZE, N = SMALL_BENCHMARK["image_size"], SMALL_BENCHMARK["n"]  # the conftest's `bench`


def load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_baselines(bench, tmp_path):
    assert baselines.copy_paste(bench, tmp_path / "cp")["written"] == N
    assert baselines.unchanged(bench, tmp_path / "same")["written"] == N
    for id_, label in benchmark.read_labels(bench).items():
        source = load(bench / "source" / f"{id_}.png")
        reference = load(bench / "reference" / f"{id_}.png")
        np.testing.assert_array_equal(load(tmp_path / "same" / f"{id_}.png"), source)
        pasted = load(tmp_path / "cp" / f"{id_}.png")
        assert pasted.shape == source.shape
        x0, y0, x1, y1 = label["box"]
        outside = np.ones(source.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        np.testing.assert_array_equal(pasted[outside], source[outside])
        np.testing.assert_array_equal(pasted[y0:y1, x0:x1], images.resize_rgb(reference, (y1 - y0, x1 - x0)))
        assert not np.array_equal(pasted[y0:y1, x0:x1], source[y0:y1, x0:x1])
    with pytest.raises(ValueError, match="empty"):
        baselines.paste_reference(source, np.zeros(source.shape[:2]), reference)


def test_baselines_resume_and_skip_unusable_inputs(bench, tmp_path):
    first = baselines.copy_paste(bench, tmp_path / "cp")
    (tmp_path / "cp" / "000001.png").unlink()  # as if interrupted before this one
    again = baselines.copy_paste(bench, tmp_path / "cp")
    assert (first["written"], again["written"], again["skipped_done"]) == (N, 1, N - 1)
    # A copy of the benchmark with one empty mask and one unreadable reference: those items are skipped and
    # named, the others written.
    broken = tmp_path / "broken"
    shutil.copytree(bench, broken)
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(broken / "mask" / "000002.png")
    (broken / "reference" / "000004.png").write_bytes(b"not a png")
    stats = baselines.unchanged(broken, tmp_path / "same")
    assert (stats["written"], stats["failed"]) == (N - 2, 2)
    failures = [json.loads(line) for line in (tmp_path / "same" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["000002", "000004"]
    assert "000002.png" in failures[0]["error"] and "empty" in failures[0]["error"]
    assert "000004.png" in failures[1]["error"]
    assert sorted(p.name for p in (tmp_path / "same").glob("*.png")) == [
        f"{i:06d}.png" for i in range(N) if i not in (2, 4)]


def test_baselines_through_the_shipped_autoencoder(bench, tmp_path):
    roundtrip = baselines.autoencoder_roundtrip(MODEL)
    stats = baselines.unchanged(bench, tmp_path / "same", roundtrip)
    assert stats["written"] == N
    for id_ in benchmark.read_labels(bench):
        source = load(bench / "source" / f"{id_}.png")
        result = load(tmp_path / "same" / f"{id_}.png")
        # Not the source any more, but a reconstruction of it (the trained autoencoder gives ~22 dB on 64² scenes).
        assert result.shape == source.shape and not np.array_equal(result, source)
        assert 18 < 10 * np.log10(255 ** 2 / np.mean((result.astype(float) - source) ** 2)) < 40
    with pytest.raises(ValueError, match="divisible by 4, got 66×64"):
        roundtrip([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 66, 3), np.uint8)])
    assert baselines.main(["unchanged", str(bench), str(tmp_path / "x"), "--through-vae", str(tmp_path / "nope")]) == 1


def test_autoencoder_roundtrip_batches_like_one_image_at_a_time(bench, monkeypatch):
    """Images grouped by size, `batch_size` at a time (the last call padded): the same pixels as one image per
    call, and one compilation per image size however many calls."""
    rng = np.random.default_rng(0)
    sources = [load(bench / "source" / f"{i:06d}.png") for i in range(3)]
    small = [rng.integers(0, 256, (32, 48, 3), np.uint8) for _ in range(2)]
    batch = [sources[0], small[0], sources[1], sources[2], small[1]]  # sizes interleaved
    one_by_one = baselines.autoencoder_roundtrip(MODEL, batch_size=1)  # what the baselines did before
    expected = [one_by_one([image])[0] for image in batch]

    batched = baselines.autoencoder_roundtrip(MODEL, batch_size=2)
    traces = []
    merge = nnx.merge
    monkeypatch.setattr(nnx, "merge", lambda *a, **k: traces.append(1) or merge(*a, **k))  # once per trace
    results = batched(batch)
    assert len(results) == len(batch)
    for got, want, image in zip(results, expected, batch):
        assert got.shape == image.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(results[0], results[2])  # each result is its own image's, not a neighbour's
    assert len(traces) == 2  # 96×96: two calls (2 + 1 padded), 32×48: one call; compiled once per size
    np.testing.assert_array_equal(batched([batch[1]])[0], expected[1])
    assert len(traces) == 2


def test_cli(bench, tmp_path, capsys):
    assert baselines.main(["unchanged", str(tmp_path / "missing"), str(tmp_path / "r")]) == 1
    assert "error:" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "pbe_jax.eval.baselines", "copy-paste", str(bench),
                          str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"{N} results written, 0 already there, 0 inputs unusable" in run.stdout
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == [f"{i:06d}.png" for i in range(N)]
    assert baselines.main(["copy-paste", str(bench), str(tmp_path / "r")]) == 0
    assert f"0 results written, {N} already there" in capsys.readouterr().out
    helped = subprocess.run([sys.executable, "-m", "pbe_jax.eval.baselines", "--help"], cwd=ROOT,
                            capture_output=True, text=True)
    assert helped.returncode == 0
    assert all(word in helped.stdout for word in ("copy-paste", "unchanged", "--through-vae"))


# ------------------------------------------------------------------------------------ data/ loads no models

FORBIDDEN = ("pbe_jax.models", "pbe_jax.convert", "pbe_jax.train")


def test_data_imports_no_model_code():
    """DESIGN: data/ imports neither models/ nor train/ (nor convert/, which loads models). Checked in the source,
    so that an import inside a function counts too, and in a fresh interpreter, for what modules pull in.
    Only augment.py (the on-device augmentation) may import jax."""
    data = ROOT / "pbe_jax" / "data"
    for path in sorted(data.glob("*.py")):
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative ones resolved from pbe_jax.data
                module = ".".join(["pbe_jax", "data"][:3 - node.level] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                names += [module] + [f"{module}.{alias.name}" for alias in node.names]
        forbidden = FORBIDDEN + (("jax", "flax") if path.name != "augment.py" else ())
        bad = [n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{path.name} imports {bad}"
    modules = [f"pbe_jax.data.{p.stem}" for p in sorted(data.glob("*.py")) if p.stem not in ("__init__", "augment")]
    check = (f"import sys, {', '.join(modules)}\n"
             f"bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax') or m.startswith({FORBIDDEN!r}))\n"
             "assert not bad, bad\n"
             "import pbe_jax.data.augment\n"
             f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))\n"
             "assert not bad, bad\n")
    run = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

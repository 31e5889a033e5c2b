"""A new user's bad inputs: each ends in one sentence and exit status 1, never a traceback."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

from pbe_jax import batch  # noqa: E402
from pbe_jax.convert.__main__ import main as convert_main  # noqa: E402

# `python -m pbe_jax.convert` on a machine without torch: `import torch` fails (None in sys.modules makes
# every import of it raise ImportError, whatever is installed).
WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['pbe_jax.convert', *sys.argv[1:]]; "
                 "runpy.run_module('pbe_jax.convert', run_name='__main__', alter_sys=True)")


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_convert_pickles_without_torch(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is no checkpoint at all\n" * 20)
    a_pickle = tmp_path / "model.ckpt"
    a_pickle.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))  # starts as torch's legacy format does
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for src, message in ((garbage, f"{garbage}: cannot read this PyTorch checkpoint; it is neither a zip archive "
                                   f"(torch.save's format) nor a pickle, so it is damaged or of another format"),
                         (a_pickle, f"{a_pickle} is a PyTorch pickle; reading it needs torch (pip install torch, or "
                                    f"the [torch] extra: pip install 'pbe-jax[torch]')")):
        r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(src), str(tmp_path / "out")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stderr
        assert message in one_error_line(r.stderr)
        assert not (tmp_path / "out").exists()


def test_convert_garbage_file_with_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is no checkpoint at all\n" * 20)
    assert convert_main([str(garbage), str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: {garbage}: cannot read this PyTorch checkpoint; it is neither a zip archive "
                    f"(torch.save's format) nor a pickle, so it is damaged or of another format")


def test_convert_an_existing_file_of_no_known_suffix_is_not_a_missing_folder(tmp_path, capsys):
    garbage, a_pickle = tmp_path / "garbage.bin", tmp_path / "model.bin"
    garbage.write_bytes(b"\x00\x01 random bytes" * 20)
    a_pickle.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    start = ": a file, not a model folder, and not a checkpoint this reads: a whole model in one file must be the " \
            "original release's layout as .safetensors, .ckpt, .pt or .pth"
    for src, why in ((garbage, "it is neither a zip archive (torch.save's format) nor a pickle"),
                     (a_pickle, "if it is a PyTorch checkpoint in that layout, rename it to .ckpt")):
        assert convert_main([str(src), str(tmp_path / "out")]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {src}{start} (") and why in line and "no such folder" not in line
    assert convert_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1  # a missing path: as before
    assert one_error_line(capsys.readouterr().err) == f"error: {tmp_path / 'missing'}: no such folder"


@pytest.mark.parametrize("names", [("source", "mask", "reference"), ("GT_3500", "Mask_bbox_3500", "Ref_3500")])
def test_batch_of_an_empty_cocoee_folder_is_an_error_before_the_model(tmp_path, capsys, names):
    folder = tmp_path / "cocoee"
    for name in names:
        (folder / name).mkdir(parents=True)
    # --pretrained names nothing: the error about the jobs must come before any model is looked for
    args = ["--pretrained", str(tmp_path / "no-model"), "--batch", str(folder), "--out", str(tmp_path / "out")]
    assert sample.main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {folder}: no jobs: {names[0]}/, {names[1]}/ and {names[2]}/ hold no images"
    (folder / names[1] / "1.png").write_bytes(b"")  # only the sources missing: named alone
    (folder / names[2] / "1.png").write_bytes(b"")
    with pytest.raises(batch.NoJobsError, match=rf"cocoee: no jobs: {names[0]}/ holds no images$"):
        batch.load_jobs(folder)


def test_batch_of_an_empty_manifest_is_an_error_before_the_model(tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n  \n")
    args = ["--pretrained", str(tmp_path / "no-model"), "--batch", str(manifest), "--out", str(tmp_path / "out")]
    assert sample.main(args) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {manifest}: no jobs: the manifest lists no edits (expected one JSON object per line, with source, "
        f"mask and reference paths)")
    assert not (tmp_path / "out").exists()

"""The one path type (`pbe_jax.storage`) against a local GCS emulator: writes that are complete or absent,
logs that grow in a bucket, folders replaced whole, models saved to and loaded from a bucket, the COCOEE and
folder data sources read from one, and clear errors instead of hangs when a store cannot be reached."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pbe_jax import batch, images, storage

ROOT = Path(__file__).resolve().parents[1]


def test_local_and_bucket_paths_are_one_type(bucket_dir, tmp_path):
    for folder in (storage.path(tmp_path), bucket_dir):
        assert storage.is_remote(folder) == str(folder).startswith("gs://")
        storage.write_text(folder / "a.txt", "one")
        storage.write_bytes(folder / "a.txt", b"two")  # replaced whole
        assert (folder / "a.txt").read_text() == "two"
        assert not any(".tmp" in p.name for p in folder.iterdir())
        storage.write_with(folder / "b.npy", lambda local: np.save(local, np.arange(3)))
        assert np.load(storage.local_or_buffer(folder / "b.npy")).tolist() == [0, 1, 2]
        assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.npy"]


def test_append_log_in_a_bucket_is_always_a_complete_object(bucket_dir):
    path = bucket_dir / "metrics.jsonl"
    log = storage.AppendLog(path, min_interval_s=3600)
    log.write('{"step": 1}\n')  # the first write uploads at once
    log.write('{"step": 2}\n')  # within the interval: kept in memory
    assert path.read_text() == '{"step": 1}\n'
    log.flush()
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    log.write('{"step": 3}\n')
    log.close()
    again = storage.AppendLog(path)  # a resumed run continues the object
    again.write('{"step": 4}\n')
    again.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    storage.AppendLog(path, append=False).close()  # started anew
    assert path.read_text() == ""


def test_model_saved_to_and_loaded_from_a_bucket(tiny_folder, bucket_dir):
    from pbe_jax.convert import load, mapping, save_replacing

    models = load(tiny_folder("sd"))
    save_replacing(models, bucket_dir / "jax", format="diffusers")
    save_replacing(models, bucket_dir / "jax", format="jax")  # replacing a folder of the other format
    assert sorted(p.name for p in (bucket_dir / "jax" / "unet").iterdir()) == ["config.json", "params.safetensors"]
    back = load(bucket_dir / "jax")
    for name, module in models.components().items():
        a, b = mapping.module_params(module), mapping.module_params(back.components()[name])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    (bucket_dir / "jax" / "model_index.json").unlink()  # as if its writing had been cut short
    with pytest.raises(FileNotFoundError, match="model_index.json: not a pipeline folder, or one still being"):
        load(bucket_dir / "jax")


def test_benchmark_layout_and_folder_source_in_a_bucket(bucket_dir, tmp_path):
    from pbe_jax.data.sources import FolderSource

    rng = np.random.default_rng(0)
    for role, suffix in (("GT_3500", "_GT"), ("Mask_bbox_3500", "_mask"), ("Ref_3500", "_ref")):
        for i in ("000000000139", "000000000285"):
            images.save_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), bucket_dir / "cocoee" / role / f"{i}{suffix}.png")
    jobs = batch.load_jobs(bucket_dir / "cocoee")
    assert [j.id for j in jobs] == ["000000000139", "000000000285"]
    assert str(jobs[0].mask).startswith("gs://") and batch.check_inputs(jobs[0])[0].shape == (8, 8, 3)

    for split in ("a", "b"):  # the release's layout: images/<split>/<id>.jpg, bbox/<split>/<id>.txt
        for i in range(2):
            image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            storage.write_with(bucket_dir / "oi" / "images" / split / f"{i}.jpg",
                               lambda local, image=image: Image.fromarray(image).save(local, format="JPEG"))
            storage.write_text(bucket_dir / "oi" / "bbox" / split / f"{i}.txt", "1 2 11 12\n3 4 13 14 0.5\n")
    source = FolderSource(bucket_dir / "oi")
    assert len(source) == 4 and [source[i]["id"].split("oi/")[1] for i in range(4)] == [
        "images/a/0.jpg", "images/a/1.jpg", "images/b/0.jpg", "images/b/1.jpg"]
    item = source[3]
    assert item["image"].shape == (20, 30, 3) and item["boxes"].tolist() == [[1, 2, 11, 12], [3, 4, 13, 14]]


def test_unreachable_checkpoint_store_is_a_clear_error_not_a_hang(gcs_emulator, bucket_dir):
    """If tensorstore (orbax's array writer, a GCS client of its own) cannot reach the bucket, train.py says so
    within the time limit, naming the layer and what to set, instead of retrying silently for minutes."""
    from conftest import free_port

    env = {**os.environ, "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens
           storage.TIMEOUT_ENV: "5"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--workdir", str(bucket_dir / "run")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "through tensorstore's GCS driver" in r.stderr and "TENSORSTORE_GCS_HTTP_URL" in r.stderr, r.stderr[-3000:]


def test_convert_and_eval_clis_in_a_bucket(tiny_folder, bucket_dir, capsys):
    """python -m pbe_jax.convert from a bucket to a bucket and back; python -m pbe_jax.eval on a benchmark
    and results that live in a bucket."""
    from pbe_jax.convert import __main__ as convert_cli
    from pbe_jax.convert import is_checkpoint
    from pbe_jax.data import benchmark
    from pbe_jax.eval import __main__ as eval_cli
    from pbe_jax.eval import baselines

    assert convert_cli.main([str(tiny_folder("sd")), str(bucket_dir / "ckpt")]) == 0
    assert is_checkpoint(bucket_dir / "ckpt")
    assert convert_cli.main([str(bucket_dir / "ckpt"), str(bucket_dir / "diffusers")]) == 0
    assert (bucket_dir / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    bench, results = bucket_dir / "bench", bucket_dir / "results"
    assert benchmark.make_benchmark(bench, n=3, image_size=32) == {"written": 9, "kept": 0}
    baselines.copy_paste(bench, results)
    capsys.readouterr()
    assert eval_cli.main([str(results), "--benchmark", str(bench), "--no-attributes", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["evaluated"] == 3 and report["metrics"]["psnr"]["mean"] == float("inf")  # copy-paste keeps the rest

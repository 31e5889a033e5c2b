"""`python -m pbe_jax.data.prepare` on small collections in each format, with every kind of image that a real
collection holds (EXIF orientations, CMYK, 16-bit, palettes, bombs, truncated and missing files): what is kept,
what is skipped and why, boxes that land on the pixels they name, machines and workers that split the work, reruns
that finish it, and a bucket as the input and the output."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from bad_images import bomb_png, truncated_jpeg
from pbe_jax.data import prepare, shards

ROOT = Path(__file__).resolve().parents[1]
GRAY, RED = (128, 128, 128), (220, 30, 30)
STORED_SIZE, RECT = (64, 48), (16, 8, 40, 24)  # the orientation images: W × H as stored, a red box on them


def scene(size, rects=(RECT,)) -> np.ndarray:
    w, h = size
    a = np.full((h, w, 3), GRAY, np.uint8)
    for x0, y0, x1, y1 in rects:
        a[y0:y1, x0:x1] = RED
    return a


def save_jpeg(path: Path, a: np.ndarray, orientation: int | None = None, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(a).convert(mode).save(path, "JPEG", quality=95, subsampling=0, exif=exif)


def is_red(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > 160) & (g < 100) & (b < 100)


def red_box(rgb: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(is_red(rgb))
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def displayed_red_box(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """The red box and the size of the image as a viewer shows it (EXIF applied by PIL, not by photos)."""
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return red_box(upright), (upright.shape[1], upright.shape[0])


def assert_box_on_red(record: dict, box) -> None:
    """The record's only box is `box` (±1 px) and covers exactly the red pixels of its image."""
    assert record["boxes"].shape == (1, 4), record["id"]
    np.testing.assert_allclose(record["boxes"][0], box, atol=1.01, err_msg=record["id"])
    np.testing.assert_allclose(red_box(record["image"]), record["boxes"][0], atol=1.01, err_msg=record["id"])


def records(out) -> dict[str, dict]:
    source = shards.ShardSource(out)
    return {r["id"]: r for r in (source[i] for i in range(len(source)))}


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def info_json(out, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    status = prepare.main(["info", str(out), "--json"])
    return status, json.loads(capsys.readouterr().out)


def skipped(**counts) -> dict:
    return {reason: counts.get(reason, 0) for reason in ("missing", "unreadable", "decompression_bomb", "too_small",
                                                         "no_box")}


def orientation_images(folder: Path) -> list[Path]:
    paths = []
    for o in range(1, 9):
        save_jpeg(folder / f"o{o}.jpg", scene(STORED_SIZE), orientation=o)
        paths.append(folder / f"o{o}.jpg")
    return paths


# ----------------------------------------------------------------------------------------------- OpenImages

OI_MAX_SHORT_SIDE = 40
OI_ARGS = ["--min-side", "16", "--max-short-side", str(OI_MAX_SHORT_SIDE), "--images-per-shard", "6"]


@pytest.fixture(scope="module")
def openimages(tmp_path_factory):
    """An OpenImages-style collection (box CSV, images under train_0/ and train_1/), prepared once."""
    root = tmp_path_factory.mktemp("openimages")
    images = root / "images"
    rows = []  # (ImageID, x0, y0, x1, y1) normalised, on the stored pixels

    def add(image_id, *boxes):
        rows.extend((image_id, *b) for b in boxes)

    w, h = STORED_SIZE
    for path in orientation_images(images / "train_0"):
        add(path.stem, (RECT[0] / w, RECT[1] / h, RECT[2] / w, RECT[3] / h))
    colour = scene((80, 60), [(20, 15, 60, 45)])
    save_jpeg(images / "train_0" / "cmyk.jpg", colour, mode="CMYK")
    save_jpeg(images / "train_0" / "gray.jpg", colour, mode="L")
    (images / "train_1").mkdir()
    Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)).save(images / "train_1/png16.png")
    palette = Image.fromarray(colour).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(images / "train_1" / "pal.png", transparency=0)
    Image.fromarray(colour).convert("RGBA").save(images / "train_1" / "rgba.PNG")
    for name in ("cmyk", "gray", "png16", "pal", "rgba"):
        add(name, (0.25, 0.25, 0.75, 0.75))
    save_jpeg(images / "train_1" / "tiny.jpg", scene((12, 12), []))
    (images / "train_1" / "bomb.png").write_bytes(bomb_png())
    (images / "train_1" / "trunc.jpg").write_bytes(truncated_jpeg(scene((80, 60))))
    for name in ("tiny", "bomb", "trunc", "missing"):
        add(name, (0.25, 0.25, 0.75, 0.75))
    save_jpeg(images / "train_1" / "outside.jpg", scene((60, 60), [(30, 30, 60, 60)]))
    add("outside", (1.2, 1.2, 1.4, 1.3), (0.5, 0.5, 1.5, 1.5))  # one outside, one clipped to its red quarter
    save_jpeg(images / "train_1" / "filtered.jpg", scene((60, 60), []))
    add("filtered", (0.0, 0.0, 0.1, 0.1), (0.0, 0.0, 1.0, 0.95))  # 1 % and 95 % of the image
    save_jpeg(images / "train_1" / "big.jpg", scene((300, 200), [(60, 40, 180, 120)]))
    add("big", (0.2, 0.2, 0.6, 0.6))

    table = root / "oidv6-train-annotations-bbox.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
                         "IsOccluded"])
        for image_id, x0, y0, x1, y1 in rows[::-1]:  # not grouped or sorted: the reader must not rely on it
            writer.writerow([image_id, "xclick", "/m/01", 1, x0, x1, y0, y1, 0])
    out = root / "out"
    base = ["openimages", "--boxes", str(table), "--images", str(images), *OI_ARGS]
    assert prepare.main([*base, "--out", str(out)]) == 0
    return {"images": images, "out": out, "base": base}


def test_openimages_accounts_for_every_image_and_keeps_boxes_on_their_pixels(openimages, capsys):
    status, report = info_json(openimages["out"], capsys)
    assert status == 0
    assert report["items"] == 20 and report["shards_complete"] == report["shards_total"] == 4
    assert report["skipped"] == skipped(missing=1, unreadable=1, decompression_bomb=1, too_small=1, no_box=1)
    assert report["items"] == report["images"] + sum(report["skipped"].values())
    assert (report["boxes"], report["boxes_outside"], report["boxes_filtered"]) == (15, 1, 2)

    got = records(openimages["out"])
    expected_ids = {f"train_0/o{o}.jpg" for o in range(1, 9)} | {
        "train_0/cmyk.jpg", "train_0/gray.jpg", "train_1/png16.png", "train_1/pal.png", "train_1/rgba.PNG",
        "train_1/outside.jpg", "train_1/big.jpg"}
    assert set(got) == expected_ids
    for record_id, r in got.items():
        with Image.open(openimages["images"] / record_id) as im:
            w, h = ImageOps.exif_transpose(im).size
        height, width = r["image"].shape[:2]
        assert min(width, height) == min(OI_MAX_SHORT_SIDE, w, h), record_id
        assert abs(width / height - w / h) < 0.05, record_id
    for o in range(1, 9):  # boxes given on the stored pixels follow the image upright
        record = got[f"train_0/o{o}.jpg"]
        box, (w, h) = displayed_red_box(openimages["images"] / "train_0" / f"o{o}.jpg")
        height, width = record["image"].shape[:2]
        assert_box_on_red(record, box * np.asarray([width / w, height / h] * 2))
    for record_id in ("train_0/cmyk.jpg", "train_1/pal.png", "train_1/rgba.PNG"):  # read as their colours
        assert_box_on_red(got[record_id], [13.25, 10, 39.75, 30])
    assert_box_on_red(got["train_1/outside.jpg"], [20, 20, 40, 40])  # clipped to the image
    assert_box_on_red(got["train_1/big.jpg"], [12, 8, 36, 24])  # 300 × 200 stored as 60 × 40
    gray = got["train_0/gray.jpg"]["image"].astype(int)
    assert np.abs(gray - gray[..., :1]).max() <= 2  # one channel repeated
    ramp = got["train_1/png16.png"]["image"]  # 0 ... 59950 of 65535, scaled to 8 bits rather than clipped
    assert ramp.min() < 10 and 220 < ramp.max() < 245


def test_two_machines_make_the_same_shards_as_one(openimages, tmp_path):
    out = tmp_path / "out"
    argv = [*openimages["base"], "--out", str(out)]
    assert prepare.main([*argv, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["prepare.json", "shard-00001-of-00004.json",
                                                          "shard-00003-of-00004.json"]
    assert prepare.main([*argv, "--shard", "0/2"]) == 0
    assert files(out) == files(openimages["out"])


def test_workers_write_the_same_shards(openimages, tmp_path):
    out = tmp_path / "out"
    argv = [*openimages["base"], "--out", str(out)]
    assert prepare.main([*argv, "--workers", "2"]) == 0
    assert files(out) == files(openimages["out"])


def test_a_rerun_writes_only_the_missing_shards_and_info_reports_them(openimages, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(openimages["out"], out)
    for p in out.glob("shard-00002-of-00004.*"):
        p.unlink()
    status, report = info_json(out, capsys)
    assert status == 1 and report["shards_missing"] == [2] and report["shards_complete"] == 3
    assert prepare.main(["info", str(out)]) == 1
    assert "shard-00002-of-00004" in capsys.readouterr().out
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    argv = [*openimages["base"], "--out", str(out)]
    assert prepare.main(argv) == 0
    assert "skipping 3 of this machine's 4 shards" in capsys.readouterr().err
    assert {p.name for p in out.iterdir() if before.get(p.name) != p.stat().st_mtime_ns} == {
        "shard-00002-of-00004.json", "shard-00002-of-00004.array_record"}
    assert files(out) == files(openimages["out"])
    assert info_json(out, capsys)[0] == 0


def test_other_settings_are_refused_with_the_keys_that_differ(openimages, capsys):
    assert prepare.main([*openimages["base"], "--out", str(openimages["out"]), "--max-short-side", "30"]) == 1
    assert (f"{openimages['out']}: this folder was prepared with max_short_side={OI_MAX_SHORT_SIDE}; this command "
            f"asks for max_short_side=30: use another --out or the same settings") in capsys.readouterr().err


def test_the_release_bbox_folder(tmp_path, capsys):
    images, bbox = tmp_path / "images", tmp_path / "bbox"
    save_jpeg(images / "train" / "a.jpg", scene(STORED_SIZE), orientation=6)
    (bbox / "train").mkdir(parents=True)
    (bbox / "train" / "a.txt").write_text("16 8 40 24 person 0.9\n")
    (bbox / "train" / "b.txt").write_text("1 1 5 5\n")  # no image
    out = tmp_path / "out"
    assert prepare.main(["openimages", "--bbox-dir", str(bbox), "--images", str(images), "--out", str(out),
                         "--min-side", "16"]) == 0
    assert info_json(out, capsys)[1]["skipped"] == skipped(missing=1)
    (record,) = records(out).values()
    assert record["id"] == "train/a.jpg"
    assert_box_on_red(record, displayed_red_box(images / "train" / "a.jpg")[0])


# ------------------------------------------------------------------------------------------------ folder

def test_folder_boxes_on_the_upright_image_or_the_stored_one(tmp_path, capsys):
    images = tmp_path / "images"
    paths = orientation_images(images / "mine")
    displayed = [{"path": f"mine/{p.name}", "boxes": [displayed_red_box(p)[0].tolist()]} for p in paths]
    stored = [{"path": f"mine/{p.name}", "boxes": [list(RECT)]} for p in paths]
    runs = {}
    for name, rows, extra in (("displayed", displayed, []), ("stored", stored, ["--box-frame", "stored"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
        out = tmp_path / name
        assert prepare.main(["folder", "--images", str(images), "--annotations", str(tmp_path / f"{name}.jsonl"),
                             "--out", str(out), "--min-side", "16", "--max-short-side", "24", *extra]) == 0
        runs[name] = records(out)
        assert list(runs[name]) == [f"mine/o{o}.jpg" for o in range(1, 9)]
    for p, row in zip(paths, displayed):
        box = np.asarray(row["boxes"][0]) / 2  # 64 × 48 stored as 32 × 24
        for name in runs:
            assert_box_on_red(runs[name][f"mine/{p.name}"], box)

    beside = tmp_path / "beside"  # the .txt-beside-the-image layout
    save_jpeg(beside / "a.jpg", scene(STORED_SIZE))
    (beside / "a.txt").write_text("16 8 40 24\n")
    save_jpeg(beside / "b.jpg", scene(STORED_SIZE))
    (beside / "b.txt").write_text("16 8 forty\n")
    assert prepare.main(["folder", "--images", str(beside), "--out", str(tmp_path / "beside_out"),
                         "--min-side", "16"]) == 0
    assert info_json(tmp_path / "beside_out", capsys)[1]["skipped"] == skipped(unreadable=1)
    assert_box_on_red(records(tmp_path / "beside_out")["a.jpg"], RECT)


# -------------------------------------------------------------------------------------------------- COCO

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO-style collection (two instances files, images under train2017/ and val2017/) prepared by the
    command line in a subprocess, with two worker processes (the bucket test compares it with one)."""
    root = tmp_path_factory.mktemp("coco")
    images = root / "images"
    files_ = {"train2017": {}, "val2017": {}}  # file name -> (size in the JSON, [(bbox, iscrowd)])
    w, h = STORED_SIZE
    x0, y0, x1, y1 = RECT
    save_jpeg(images / "train2017" / "a.jpg", scene((120, 80), [(10, 10, 50, 50), (60, 20, 110, 70)]))
    files_["train2017"]["a.jpg"] = ((120, 80), [([10, 10, 40, 40], 0), ([60, 20, 50, 50], 0), ([0, 0, 120, 80], 1)])
    save_jpeg(images / "train2017" / "crowd.jpg", scene((80, 80), []))
    files_["train2017"]["crowd.jpg"] = ((80, 80), [([0, 0, 40, 40], 1)])
    save_jpeg(images / "train2017" / "small_box.jpg", scene((80, 80), [(0, 0, 40, 40)]))
    files_["train2017"]["small_box.jpg"] = ((80, 80), [([0, 0, 40, 40], 0), ([70, 70, 5, 5], 0)])
    save_jpeg(images / "train2017" / "outside.jpg", scene((80, 80), [(0, 0, 40, 40)]))
    files_["train2017"]["outside.jpg"] = ((80, 80), [([0, 0, 40, 40], 0), ([90, 0, 20, 20], 0)])
    files_["train2017"]["missing.jpg"] = ((80, 80), [([0, 0, 40, 40], 0)])
    (images / "train2017" / "bomb.png").write_bytes(bomb_png())
    files_["train2017"]["bomb.png"] = ((20000, 20000), [([0, 0, 9000, 9000], 0)])
    (images / "val2017").mkdir(parents=True)
    (images / "val2017" / "trunc.jpg").write_bytes(truncated_jpeg(scene((80, 60))))
    files_["val2017"]["trunc.jpg"] = ((80, 60), [([0, 0, 40, 40], 0)])
    save_jpeg(images / "val2017" / "tiny.jpg", scene((10, 10), []))
    files_["val2017"]["tiny.jpg"] = ((10, 10), [([0, 0, 5, 5], 0)])
    # Orientation 6: boxes on the stored pixels (the JSON gives the stored size) or, for a file rotated after
    # it was annotated, on the upright image (the JSON gives the upright size).
    save_jpeg(images / "val2017" / "rot_stored.jpg", scene(STORED_SIZE), orientation=6)
    files_["val2017"]["rot_stored.jpg"] = ((w, h), [([x0, y0, x1 - x0, y1 - y0], 0)])
    save_jpeg(images / "val2017" / "rot_displayed.jpg", scene(STORED_SIZE), orientation=6)
    ux0, uy0, ux1, uy1 = displayed_red_box(images / "val2017" / "rot_displayed.jpg")[0].tolist()
    files_["val2017"]["rot_displayed.jpg"] = ((h, w), [([ux0, uy0, ux1 - ux0, uy1 - uy0], 0)])
    annotations = []
    for split, listed in files_.items():
        doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
        for n, (name, (size, boxes)) in enumerate(sorted(listed.items())):
            doc["images"].append({"id": n, "file_name": name, "width": size[0], "height": size[1]})
            for bbox, crowd in boxes:
                doc["annotations"].append({"id": len(doc["annotations"]), "image_id": n, "bbox": bbox,
                                           "iscrowd": crowd, "category_id": 1})
        annotations.append(root / f"instances_{split}.json")
        annotations[-1].write_text(json.dumps(doc))
    out = root / "out"
    argv = ["coco", "--annotations", *map(str, annotations), "--images", str(images), "--min-side", "16",
            "--images-per-shard", "4"]
    done = subprocess.run([sys.executable, "-m", "pbe_jax.data.prepare", *argv, "--out", str(out), "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "5 images of 10, 6 boxes" in done.stdout
    return {"images": images, "out": out, "argv": argv, "root": root}


def test_coco_on_the_command_line(coco):
    done = subprocess.run([sys.executable, "-m", "pbe_jax.data.prepare", "info", str(coco["out"]), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["items"], report["images"], report["boxes"]) == (10, 5, 6)
    assert (report["boxes_outside"], report["boxes_filtered"], report["shards_total"]) == (1, 1, 3)
    assert report["skipped"] == skipped(missing=1, unreadable=1, decompression_bomb=1, too_small=1, no_box=1)
    got = records(coco["out"])
    assert set(got) == {"train2017/a.jpg", "train2017/outside.jpg", "train2017/small_box.jpg",
                        "val2017/rot_stored.jpg", "val2017/rot_displayed.jpg"}
    np.testing.assert_allclose(got["train2017/a.jpg"]["boxes"], [[10, 10, 50, 50], [60, 20, 110, 70]])
    for name in ("rot_stored", "rot_displayed"):  # the frame decided by the size in the JSON
        assert_box_on_red(got[f"val2017/{name}.jpg"], displayed_red_box(coco["images"] / "val2017/rot_stored.jpg")[0])


def test_a_bucket_as_the_input_and_the_output(coco, bucket_dir, tmp_path, capsys):
    assert prepare.main([*coco["argv"], "--out", str(bucket_dir)]) == 0
    local = info_json(coco["out"], capsys)[1]
    assert info_json(bucket_dir, capsys) == (0, local)
    # Read straight from the bucket by array_record's own GCS reader: the same items as the local shards.
    remote, local_source = shards.ShardSource(str(bucket_dir)), shards.ShardSource(coco["out"])
    assert len(remote) == len(local_source) == 5
    for i in range(len(remote)):
        a, b = remote[i], local_source[i]
        assert a["id"] == b["id"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
    copy = tmp_path / "copy"  # what a Cloud Storage FUSE mount of the bucket shows
    copy.mkdir()
    for p in bucket_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert files(copy) == files(coco["out"])
    # The images and annotations in the bucket too: the same shards.
    from pbe_jax import storage

    for path in sorted(coco["root"].rglob("*")):
        if path.is_file() and coco["out"] not in path.parents:
            storage.write_bytes(bucket_dir / "input" / path.relative_to(coco["root"]).as_posix(), path.read_bytes())
    remote_argv = [str(bucket_dir / "input" / Path(a).relative_to(coco["root"])) if a.startswith(str(coco["root"]))
                   else a for a in coco["argv"]]
    assert prepare.main([*remote_argv, "--out", str(tmp_path / "from_bucket")]) == 0
    assert files(tmp_path / "from_bucket") == files(coco["out"])


# ------------------------------------------------------------------------------------------------ errors

def test_errors_are_sentences_naming_what_is_wrong(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert prepare.main(["folder", "--images", str(tmp_path / "nope"), "--out", out]) == 1
    assert f"{tmp_path / 'nope'}: no such folder (--images)" in capsys.readouterr().err

    table = tmp_path / "boxes.csv"
    table.write_text("ImageID,x_min,XMax,YMin,YMax\na,0,1,0,1\n")
    assert prepare.main(["openimages", "--boxes", str(table), "--images", str(tmp_path), "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"{table}: an OpenImages box CSV needs the columns ImageID, XMin, XMax, YMin, YMax" in err
    assert "its header has ImageID, x_min, XMax, YMin, YMax (no XMin)" in err

    doc = tmp_path / "instances.json"
    doc.write_text(json.dumps({"images": []}))
    assert prepare.main(["coco", "--annotations", str(doc), "--images", str(tmp_path), "--out", out]) == 1
    assert f"{doc}: a COCO instances file needs 'images' and 'annotations'; it has no 'annotations'" in \
        capsys.readouterr().err

    (tmp_path / "empty.jsonl").write_text("\n")
    assert prepare.main(["folder", "--images", str(tmp_path), "--annotations", str(tmp_path / "empty.jsonl"),
                         "--out", out]) == 1
    assert "empty.jsonl: no annotated images, nothing to prepare" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        prepare.main(["folder", "--images", str(tmp_path), "--out", out, "--shard", "3/2"])
    assert "--shard takes I/N with 0 <= I < N, got 3/2" in capsys.readouterr().err

    assert prepare.main(["info", str(tmp_path)]) == 1
    assert "no prepare.json; not a folder written by python -m pbe_jax.data.prepare" in capsys.readouterr().err
    assert not os.path.exists(out)

"""The host data pipeline: sources (TFDS mock data, folders), the paper's pair rules, and the grain loader's
sharding, determinism, worker processes, skipped items and checkpointed position."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from pbe_jax.data import pairs
from pbe_jax.data.sources import CorruptItem, FolderSource, TfdsSource

BLUE, RED = (0, 0, 255), (255, 0, 0)
SMALL = pairs.PairConfig(image_size=64, reference_size=32)


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def loader():
    pytest.importorskip("grain")
    from pbe_jax.data import loader

    return loader


def scene(w, h, box, background=BLUE, color=RED):
    """A solid background with a solid rectangle at the integer box x0, y0, x1, y1."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = background
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = color
    return a


def item(image, boxes, id="item"):
    return {"image": image, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "id": id}


# ---------------------------------------------------------------------------------------------- TFDS sources

@pytest.mark.parametrize("name, group", [("coco/2017", "objects"), ("open_images_v4", "bobjects")])
def test_tfds_mock_data_through_data_source(tfds, name, group):
    # mock_data patches DatasetBuilder.as_data_source (its default AUTO policy falls back to USE_CODE when no
    # metadata is shipped), so TfdsSource runs its real path: tfds.data_source -> ArrayRecordDataSource.
    with tfds.testing.mock_data(num_examples=5):
        raw = tfds.data_source(name, split="train")
        source = TfdsSource(name, "train")
        assert len(source) == 5
        for i in range(5):
            example, got = raw[i], source[i]
            # The mock's per-object fields disagree in length: reading them together would break.
            lengths = {len(v) for v in example[group].values()}
            assert len(lengths) > 1
            h, w = example["image"].shape[:2]
            assert got["image"].dtype == np.uint8 and got["image"].shape == (h, w, 3)
            np.testing.assert_array_equal(got["image"], example["image"])
            ymin, xmin, ymax, xmax = np.asarray(example[group]["bbox"]).T
            expect = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)
            assert got["boxes"].dtype == np.float32 and got["boxes"].shape == (len(expect), 4)
            np.testing.assert_allclose(got["boxes"], expect, rtol=1e-6)
            assert got["id"] == f"{name}/train/{i}"


def test_tfds_source_through_the_loader(tfds, loader):
    with tfds.testing.mock_data(num_examples=6):
        source = TfdsSource("open_images_v4", "train")
        it = loader.make_loader(source, batch_size=1, seed=0, image_size=32, reference_size=8, num_epochs=1)
        batches = list(it)
        expect_skipped = 0
        for i in range(6):
            h, w = source[i]["image"].shape[:2]
            expect_skipped += pairs.valid_boxes(source[i]["boxes"], h, w, 0.01 * h * w)[1]
    # The mock's random boxes are often inverted (ymin > ymax): those are skipped, the rest make pairs.
    assert len(batches) == it.stats["examples"] == 6 - it.stats["rejected_no_box"] > 0
    assert it.stats["skipped_boxes"] == expect_skipped > 0
    assert all(b["image"].shape == (1, 32, 32, 3) for b in batches)


def test_tfds_gray_and_rgba_images_become_rgb(tfds):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    rgba = np.full((3, 4, 4), 7, np.uint8)
    box = np.asarray([[0.0, 0.25, 1.0, 0.5]], np.float32)  # ymin, xmin, ymax, xmax
    examples = [{"image": im, "objects": {"bbox": box}} for im in (gray, rgba)]
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: examples):
        source = TfdsSource("coco/2017", "train")
    a, b = source[0], source[1]
    np.testing.assert_array_equal(a["image"], np.repeat(gray, 3, axis=-1))
    np.testing.assert_array_equal(b["image"], rgba[..., :3])
    np.testing.assert_allclose(a["boxes"], [[1, 0, 2, 3]])


def test_tfds_unknown_dataset_and_missing_field(tfds):
    with pytest.raises(ValueError, match=r"'mnist' has no known box field.*coco.*open_images_v4"):
        TfdsSource("mnist", "train")
    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: [{"image": np.zeros((2, 2, 3))}]):
        source = TfdsSource("coco/2017", "train")
    with pytest.raises(KeyError, match=r"no objects/bbox or image field.*\['image'\]"):
        source[0]


def test_tfds_bad_record_is_skipped_and_counted(tfds, loader):
    """A record that fails to read or decode (TF, PIL or array_record raise their own errors) is an unreadable
    item, counted, not the end of the run."""
    good = {"image": scene(30, 20, (2, 2, 20, 15)), "objects": {"bbox": np.asarray([[0.1, 0.1, 0.75, 0.66]])}}

    class Flaky(list):
        def __getitem__(self, i):
            if i == 2:
                raise RuntimeError("DATA_LOSS: corrupted record at 1234")
            return super().__getitem__(i)

    with tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: Flaky([good] * 5)):
        source = TfdsSource("coco/2017", "train")
    with pytest.raises(CorruptItem, match=r"coco/2017/train/2: cannot read or decode the record.*DATA_LOSS"):
        source[2]
    it = loader.make_loader(source, batch_size=1, seed=0, image_size=32, reference_size=8, num_epochs=1)
    assert len(list(it)) == 4 and it.stats == counts(examples=4, rejected_unreadable=1)


def boxes_builder(tfds):
    """A TFDS builder with coco/2017's image and objects/bbox features, made locally (no download)."""

    class DummyBoxes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(8):
                image = scene(40 + i, 30, (5, 6, 30 + i, 25), color=(i * 30, 0, 0))
                yield i, {"image": image, "objects": {"bbox": [tfds.features.BBox(0.2, 5 / (40 + i), 25 / 30, (30 + i) / (40 + i))]}}

    return DummyBoxes


def test_tfds_from_a_bucket_with_worker_processes(tfds, loader, bucket_dir, tmp_path, monkeypatch):
    """data.data_dir=gs://…: TFDS's ArrayRecord files read from the bucket (array_record's own GCS reader,
    pointed at the local fake) by TfdsSource, in grain worker processes as in the main one."""
    from pbe_jax import storage
    from pbe_jax.data import sources

    builder = boxes_builder(tfds)
    builder(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            storage.write_bytes(bucket_dir / path.relative_to(tmp_path).as_posix(), path.read_bytes())
    monkeypatch.setitem(sources.TFDS_BOXES, "dummy_boxes", ("objects", "bbox"))
    remote, local = TfdsSource("dummy_boxes", "train", data_dir=str(bucket_dir)), TfdsSource(
        "dummy_boxes", "train", data_dir=str(tmp_path))
    assert len(remote) == 8
    for i in range(8):  # TFDS orders the examples by a hash of their keys: item i is not example i
        a, b = remote[i], local[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        width = a["image"].shape[1]
        np.testing.assert_allclose(a["boxes"], [[5, 6, width - 10, 25]], atol=1e-3)
    kw = dict(batch_size=2, seed=0, image_size=32, reference_size=8, num_epochs=1)
    plain = list(loader.make_loader(remote, **kw))
    with loader.make_loader(remote, worker_count=1, **kw) as it:
        workers = list(it)
        assert it.stats == counts(examples=8)
    assert len(plain) == 4
    assert_same_batches(workers, plain)


# -------------------------------------------------------------------------------------------- folder sources

def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_jsonl(tmp_path):
    save(tmp_path / "a" / "rgb.png", scene(40, 30, (5, 6, 20, 25)))
    save(tmp_path / "gray.png", np.full((20, 10), 9, np.uint8))
    save(tmp_path / "rgba.png", np.full((8, 8, 4), 200, np.uint8))
    abs_path = tmp_path / "gray.png"
    rows = [{"path": "a/rgb.png", "boxes": [[5, 6, 20, 25], [0, 0, 3.5, 4]]},
            {"path": str(abs_path), "boxes": []},
            {"path": "rgba.png", "boxes": [[1, 1, 2, 2]]}]
    (tmp_path / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    source = FolderSource(tmp_path, tmp_path / "ann.jsonl")
    assert len(source) == 3
    first = source[0]
    np.testing.assert_array_equal(first["image"], scene(40, 30, (5, 6, 20, 25)))
    np.testing.assert_array_equal(first["boxes"], [[5, 6, 20, 25], [0, 0, 3.5, 4]])
    assert first["boxes"].dtype == np.float32 and first["id"] == str(tmp_path / "a" / "rgb.png")
    assert source[1]["image"].shape == (20, 10, 3) and source[1]["boxes"].shape == (0, 4)
    assert source[2]["image"].shape == (8, 8, 3) and (source[2]["image"] == 200).all()


@pytest.mark.parametrize("line, message", [
    ('{"path": "x.png", "boxes": [[1, 2, 3]]}', r"ann.jsonl:2: boxes must be a list of \[x0, y0, x1, y1\].*\(1, 3\)"),
    ('{"path": "x.png"}', r"ann.jsonl:2: expected a JSON object.*KeyError"),
    ('{"path": "x.png", "boxes": [[1, 2, 3, "a"]]}', r"ann.jsonl:2: boxes must be a list"),
    ("not json", r"ann.jsonl:2: expected a JSON object.*JSONDecodeError"),
])
def test_folder_jsonl_malformed_line(tmp_path, line, message):
    (tmp_path / "ann.jsonl").write_text('{"path": "ok.png", "boxes": []}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        FolderSource(tmp_path, tmp_path / "ann.jsonl")


def test_folder_txt_layouts(tmp_path):
    # The release's images/<split>/<id>.jpg with bbox/<split>/<id>.txt, and a box file beside its image.
    save(tmp_path / "images" / "train_0" / "b.jpg", scene(32, 24, (2, 2, 10, 10)))
    (tmp_path / "bbox" / "train_0").mkdir(parents=True)
    (tmp_path / "bbox" / "train_0" / "b.txt").write_text("2 2 10 10 17 0.9\n\n3.5 4 8 9\n")
    save(tmp_path / "flat" / "a.png", scene(16, 16, (1, 1, 5, 5)))
    (tmp_path / "flat" / "a.txt").write_text("1 1 5 5\n")
    save(tmp_path / "flat" / "no_boxes.png", scene(16, 16, (1, 1, 5, 5)))  # no box file: not an item
    source = FolderSource(tmp_path)
    assert len(source) == 2
    a, b = source[0], source[1]
    assert a["id"].endswith("flat/a.png") and b["id"].endswith("images/train_0/b.jpg")
    np.testing.assert_array_equal(a["boxes"], [[1, 1, 5, 5]])
    np.testing.assert_array_equal(b["boxes"], [[2, 2, 10, 10], [3.5, 4, 8, 9]])
    assert b["image"].shape == (24, 32, 3) and b["image"].dtype == np.uint8


def test_folder_errors_name_the_file(tmp_path):
    save(tmp_path / "bad_line.png", scene(8, 8, (1, 1, 4, 4)))
    (tmp_path / "bad_line.txt").write_text("1 1 4 4\n1 1 4\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "broken.txt").write_text("1 1 4 4\n")
    source = FolderSource(tmp_path)
    with pytest.raises(CorruptItem, match=r"bad_line.txt:2: expected 'x0 y0 x1 y1'.*'1 1 4'"):
        source[0]
    with pytest.raises(CorruptItem, match=r"broken.png: cannot read image"):
        source[1]
    with pytest.raises(FileNotFoundError, match=r"missing: not a folder"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty \(no image has a .txt box file.*\): no images"):
        FolderSource(tmp_path / "empty")


def test_folder_photos_are_upright_with_their_boxes(tmp_path):
    """Every EXIF orientation: the image as a viewer shows it, and the boxes on the same pixels, given on the
    displayed image (the default for one's own photos) or on the stored pixels (box_frame="stored")."""
    from bad_images import with_orientation
    from PIL import ImageOps

    stored = scene(60, 40, (10, 5, 25, 30))
    rows, stored_rows = [], []
    for o in range(1, 9):
        data = with_orientation(stored, o, "PNG")
        (tmp_path / f"{o}.png").write_bytes(data)
        shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / f"{o}.png")).convert("RGB"))
        ys, xs = np.nonzero(shown[..., 0] > 128)
        rows.append({"path": f"{o}.png", "boxes": [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]})
        stored_rows.append({"path": f"{o}.png", "boxes": [[10, 5, 25, 30]]})
    (tmp_path / "shown.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "stored.jsonl").write_text("\n".join(json.dumps(r) for r in stored_rows))
    displayed = FolderSource(tmp_path, tmp_path / "shown.jsonl")
    as_stored = FolderSource(tmp_path, tmp_path / "stored.jsonl", box_frame="stored")
    for i, row in enumerate(rows):
        a, b = displayed[i], as_stored[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["image"].shape == ((60, 40, 3) if i + 1 >= 5 else (40, 60, 3))
        np.testing.assert_array_equal(a["boxes"], row["boxes"])
        np.testing.assert_array_equal(b["boxes"], row["boxes"])
        x0, y0, x1, y1 = row["boxes"][0]
        assert (a["image"][y0:y1, x0:x1] == RED).all()


def test_folder_large_jpegs_are_decoded_small_with_boxes_scaled(tmp_path):
    rgb = np.zeros((600, 800, 3), np.uint8)
    rgb[100:300, 200:600] = RED
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    (tmp_path / "ann.jsonl").write_text(json.dumps({"path": "big.jpg", "boxes": [[200, 100, 600, 300]]}))
    got = FolderSource(tmp_path, tmp_path / "ann.jsonl", max_short_side=150)[0]
    assert got["image"].shape == (150, 200, 3)
    np.testing.assert_allclose(got["boxes"], [[50, 25, 150, 75]])
    inside = got["image"][30:70, 55:145].astype(int)
    assert (abs(inside - RED) < 40).all()


def odd_images(root):
    """One of each kind of file real collections hold, with a box: {name: expected reason or None (usable)}."""
    from bad_images import bomb_png, truncated_jpeg

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    Image.fromarray((rng.integers(0, 65536, (30, 40))).astype(np.uint16)).save(root / "sixteen.png")
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "palette_alpha.png", transparency=0)
    Image.fromarray(rgb).convert("LA").save(root / "gray_alpha.png")
    Image.fromarray(np.concatenate([rgb, np.full((30, 40, 1), 9, np.uint8)], -1)).save(root / "rgba.png")
    Image.fromarray(rgb[:2, :3]).save(root / "tiny.png")
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "truncated.jpg").write_bytes(truncated_jpeg(rgb))
    (root / "text.jpg").write_text("not an image")
    expect = {"cmyk.jpg": None, "gray.png": None, "sixteen.png": None, "palette_alpha.png": None, "gray_alpha.png": None,
              "rgba.png": None, "tiny.png": None, "bomb.png": "decompression_bomb", "truncated.jpg": "unreadable",
              "text.jpg": "unreadable", "missing.jpg": "missing", "outside.png": "no_box"}
    Image.fromarray(rgb).save(root / "outside.png")
    boxes = {"tiny.png": [[0, 0, 3, 2]], "outside.png": [[50, 40, 90, 80], [-20, -20, -1, -1]]}
    rows = [{"path": name, "boxes": boxes.get(name, [[2, 3, 30, 25]])} for name in expect]
    (root / "ann.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return expect


def test_no_bad_image_ends_a_run_from_a_folder(tmp_path, loader):
    """Each odd file is converted to RGB or skipped and counted by its reason, through the loader with and
    without worker processes."""
    expect = odd_images(tmp_path)
    source = FolderSource(tmp_path, tmp_path / "ann.jsonl")
    for i, (name, reason) in enumerate(expect.items()):
        if reason in (None, "no_box"):
            got = source[i]
            assert got["image"].dtype == np.uint8 and got["image"].ndim == 3 and got["image"].shape[2] == 3, name
        else:
            with pytest.raises(CorruptItem, match=re.escape(name)) as e:
                source[i]
            assert e.value.reason == reason, name
    usable = sum(r is None for r in expect.values())
    want = counts(examples=usable, rejected_decompression_bomb=1, rejected_unreadable=2, rejected_missing=1,
                  rejected_no_box=1, skipped_boxes=2)
    for workers in (0, 1):
        with loader.make_loader(source, batch_size=1, seed=0, image_size=32, reference_size=8, num_epochs=1,
                                worker_count=workers) as it:
            assert len(list(it)) == usable
            assert it.stats == want


# ------------------------------------------------------------------------------------------------ pair rules

def random_item(rng):
    w, h = int(rng.integers(20, 120)), int(rng.integers(20, 120))
    x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
    box = (x0, y0, int(rng.integers(x0 + 8, w + 1)), int(rng.integers(y0 + 8, h + 1)))
    return item(scene(w, h, box), [box]), box


def test_pair_geometry_over_random_items():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(150):
        it, box = random_item(rng)
        p = pairs.make_pair(it, np.random.default_rng(trial), SMALL)
        assert p["image"].shape == (64, 64, 3) and p["image"].dtype == np.uint8
        assert p["reference"].shape == (32, 32, 3) and p["reference"].dtype == np.uint8
        assert p["box"].dtype == p["box_ext"].dtype == np.float32 and p["skipped_boxes"] == 0
        b, e = p["box"], p["box_ext"]
        assert (0 <= e[:2]).all() and (e[2:] <= 64).all()
        assert (e[:2] <= b[:2] + 1e-4).all() and (b[2:] <= e[2:] + 1e-4).all()
        # The mapped box lands on the object: red inside it, and no red outside the extended box. Bicubic
        # resizing blends half a source pixel (upsampling) or two output pixels (downsampling) at an edge.
        scale = (b[2] - b[0]) / (box[2] - box[0])
        m = max(int(np.ceil(0.5 * scale + 0.5)), 3)
        rows, cols = np.arange(64)[:, None], np.arange(64)[None, :]
        inside = (rows >= b[1] + m) & (rows < b[3] - m) & (cols >= b[0] + m) & (cols < b[2] - m)
        outside = (rows < e[1] - m) | (rows >= e[3] + m) | (cols < e[0] - m) | (cols >= e[2] + m)
        red = p["image"][..., 0].astype(int)
        assert (red[inside] >= 247).all() and (red[outside] <= 8).all(), trial
        checked += inside.any() and outside.any()
        if max(box[2] - box[0], box[3] - box[1]) <= min(it["image"].shape[:2]):
            assert (p["image"].max(axis=-1) > 100).all(), trial  # the crop lies inside the image: no padding
        # The reference is the box padded by 10 px where the image allows, resized without keeping the aspect.
        h, w = it["image"].shape[:2]
        padded = it["image"][max(box[1] - 10, 0):min(box[3] + 10, h), max(box[0] - 10, 0):min(box[2] + 10, w)]
        expect = np.asarray(Image.fromarray(padded).resize((32, 32), Image.BICUBIC))
        np.testing.assert_array_equal(p["reference"], expect)
    assert checked > 100  # most boxes are large enough, and crops loose enough, to test both regions


def test_extension_stays_within_released_bounds():
    # A square image and no shrinking: the crop is the whole image, so box_ext maps back exactly.
    w = 100
    box = (30, 40, 60, 70)
    free = np.asarray([30, 40, w - 60, w - 70])
    grown = []
    for seed in range(60):
        p = pairs.make_pair(item(scene(w, w, box), [box]), np.random.default_rng(seed),
                            pairs.PairConfig(image_size=50, reference_size=16, shrink_max=0.0))
        np.testing.assert_allclose(p["box"] * 2, box, atol=1e-4)
        g = (p["box_ext"] * 2 - box) * [-1, -1, 1, 1]
        assert (g >= -1e-4).all() and (g <= np.floor(0.4 * free) + 1e-4).all()
        grown.append(g)
    grown = np.asarray(grown)
    assert (grown.max(axis=0) == np.floor(0.4 * free)).all() and (grown.min(axis=0) == 0).all()


def test_reference_is_padded_box_clipped_to_image():
    image = scene(60, 40, (0, 5, 30, 20))
    cfg = pairs.PairConfig(image_size=32, reference_size=30)
    p = pairs.make_pair(item(image, [[0, 5, 30, 20]]), np.random.default_rng(0), cfg)
    # Padding: none left and 5 px above (the image's borders), 10 px right and below: rows 0..30, columns 0..40.
    expect = np.asarray(Image.fromarray(image[0:30, 0:40]).resize((30, 30), Image.BICUBIC))
    np.testing.assert_array_equal(p["reference"], expect)


def test_wide_box_fits_by_shrinking_the_extension():
    # The box (90 px) fits the 100 px short side, its extension often would not: no padding appears.
    for seed in range(30):
        p = pairs.make_pair(item(scene(300, 100, (105, 10, 195, 90)), [[105, 10, 195, 90]]),
                            np.random.default_rng(seed), SMALL)
        assert not (p["image"] == 0).all(axis=-1).any(), seed
        assert p["box_ext"][2] - p["box_ext"][0] <= 64 + 1e-4


def test_box_longer_than_short_side_pads_with_zeros():
    image = scene(200, 50, (20, 5, 180, 45))
    for seed in range(10):
        p = pairs.make_pair(item(image, [[20, 5, 180, 45]]), np.random.default_rng(seed), SMALL)
        b = p["box"]
        # The whole box is kept at its aspect ratio (160 × 40) and spans the crop's width.
        np.testing.assert_allclose([b[0], b[2]], [0, 64], atol=1e-4)
        np.testing.assert_allclose((b[3] - b[1]) / (b[2] - b[0]), 40 / 160, atol=1e-5)
        rows_black = (p["image"] < 3).all(axis=(1, 2))
        assert rows_black.sum() >= 40  # 160 − 50 px of zeros out of 160, at 64/160 scale: 44 rows


def test_pair_is_deterministic_per_seed():
    rng = np.random.default_rng(1)
    it, _ = random_item(rng)
    it["boxes"] = np.concatenate([it["boxes"], [[0, 0, it["image"].shape[1], it["image"].shape[0]]]])
    a = pairs.make_pair(it, np.random.default_rng(5), SMALL)
    b = pairs.make_pair(it, np.random.default_rng(5), SMALL)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    others = [pairs.make_pair(it, np.random.default_rng(s), SMALL) for s in range(6, 12)]
    assert any(not np.array_equal(a["box_ext"], o["box_ext"]) for o in others)


def test_unusable_boxes_are_skipped_and_counted():
    good = (20, 20, 60, 50)
    boxes = [[np.nan, 0, 10, 10], [30, 5, 10, 40], [10, 10, 10, 30],  # NaN, x1 < x0, zero width
             [90, 10, 120, 40], [-30, -20, -1, -1],  # outside the 80 × 60 image
             [0, 0, 5, 6], good]  # 30 px² < 1 % of 4800 px²; the usable one
    for seed in range(10):
        p = pairs.make_pair(item(scene(80, 60, good), boxes), np.random.default_rng(seed), SMALL)
        assert p["skipped_boxes"] == 6
        only_good = pairs.make_pair(item(scene(80, 60, good), [good]), np.random.default_rng(seed), SMALL)
        for k in ("image", "reference", "box", "box_ext"):
            np.testing.assert_array_equal(p[k], only_good[k])
    with pytest.raises(pairs.NoValidBox, match=r"broken-7: none of its 6 boxes is usable.*80×60"):
        pairs.make_pair(item(scene(80, 60, good), boxes[:-1], id="broken-7"), np.random.default_rng(0), SMALL)


def test_valid_boxes_clips_partly_outside_boxes():
    valid, skipped = pairs.valid_boxes(np.asarray([[-5, -5, 10, 12], [50, 40, 70, 90]]), 60, 80, 1.0)
    np.testing.assert_array_equal(valid, [[0, 0, 10, 12], [50, 40, 70, 60]])
    assert skipped == 0


# ----------------------------------------------------------------------------------------------------- loader

class ColorSource:
    """Item i: a solid image of a colour that encodes i, one box over most of it (or none when i is in
    `no_box`): the reference's colour tells which item a batch row came from."""

    def __init__(self, n, no_box=()):
        self.n, self.no_box = n, set(no_box)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = np.empty((24 + i % 5, 30, 3), np.uint8)
        image[:] = (i % 256, i // 256, 99)
        boxes = [] if i in self.no_box else [[2, 2, 28, 20], [0, 0, 0, 0]]
        return item(image, boxes, str(i))


def ids(batch):
    c = batch["reference"][:, 4, 4].astype(int)
    return list(c[:, 0] + 256 * c[:, 1])


def counts(**nonzero):
    from pbe_jax.data.loader import STATS_KEYS

    return {**dict.fromkeys(STATS_KEYS, 0), **nonzero}


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_loader_batches(loader):
    with loader.make_loader(ColorSource(10), batch_size=4, seed=0, image_size=48, reference_size=16) as it:
        batch = next(it)
        assert set(batch) == {"image", "reference", "box", "box_ext"}
        assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.uint8
        assert batch["reference"].shape == (4, 16, 16, 3) and batch["reference"].dtype == np.uint8
        assert batch["box"].shape == batch["box_ext"].shape == (4, 4) and batch["box"].dtype == np.float32
        assert len(set(ids(batch))) == 4
        assert it.stats == counts(examples=4, skipped_boxes=4)


def test_loader_epochs_shuffle_and_remainder(loader):
    it = loader.make_loader(ColorSource(10), batch_size=3, seed=0, image_size=32, reference_size=8, num_epochs=2)
    got = [ids(b) for b in it]
    assert len(got) == 6  # 20 items, the last 2 dropped
    flat = sum(got, [])
    assert sorted(flat[:10]) == list(range(10)) and flat[:10] != list(range(10))
    assert flat[:9] != flat[10:19]  # each epoch shuffled anew
    plain = loader.make_loader(ColorSource(10), batch_size=5, seed=0, image_size=32, reference_size=8,
                               num_epochs=1, shuffle=False)
    assert [ids(b) for b in plain] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_loader_process_shards_are_disjoint_and_cover(loader):
    shards = []
    for index in range(3):
        it = loader.make_loader(ColorSource(11), batch_size=1, seed=3, image_size=32, reference_size=8,
                                num_epochs=1, process_index=index, process_count=3)
        shards.append(sum((ids(b) for b in it), []))
    assert [len(s) for s in shards] == [4, 4, 3]
    assert sorted(sum(shards, [])) == list(range(11))
    with pytest.raises(ValueError, match=r"process_index 3 is not in \[0, process_count=3\)"):
        loader.make_loader(ColorSource(11), batch_size=1, seed=0, process_index=3, process_count=3)


def test_loader_is_deterministic_per_seed(loader):
    def first(seed):
        return take(loader.make_loader(ColorSource(40), batch_size=4, seed=seed, image_size=32, reference_size=8), 3)

    a, b, c = first(7), first(7), first(8)
    assert_same_batches(a, b)
    assert any(not np.array_equal(x["box_ext"], y["box_ext"]) for x, y in zip(a, c))


def test_loader_skips_and_counts_rejects(loader, tmp_path):
    for i in range(6):
        save(tmp_path / f"{i}.png", scene(40, 30, (5, 5, 30, 25)))
        (tmp_path / f"{i}.txt").write_text("5 5 30 25\n0 0 1 1\n")
    (tmp_path / "2.png").write_bytes(b"corrupt")
    (tmp_path / "4.txt").write_text("0 0 1 1\n")  # only a box under 1 % of the image
    it = loader.make_loader(FolderSource(tmp_path), batch_size=1, seed=0, image_size=32, reference_size=8,
                            num_epochs=1)
    assert len(list(it)) == 4
    assert it.stats == counts(examples=4, rejected_unreadable=1, rejected_no_box=1, skipped_boxes=5)


def test_loader_raises_when_nearly_everything_is_rejected(loader):
    it = loader.make_loader(ColorSource(1000, no_box=range(1000)), batch_size=2, seed=0, image_size=32,
                            reference_size=8, num_epochs=1)
    with pytest.raises(ValueError, match=r"skipped 100.00 % of the last seen 1000"):
        next(it)


def test_loader_resumes_from_state(loader):
    def make():
        return loader.make_loader(ColorSource(9, no_box=[4]), batch_size=2, seed=11, image_size=32,
                                  reference_size=8)

    it = make()
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    stats = it.stats
    expect = take(it, 6)  # crosses into the next epochs
    resumed = make()
    resumed.set_state(state)
    assert resumed.stats == stats
    assert_same_batches(take(resumed, 6), expect)
    assert resumed.stats == it.stats


def folder_of_pngs(root, n):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        save(root / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        lines.append(json.dumps({"path": f"{i}.png", "boxes": [[3, 4, w - 5, h - 2], [1, 1, 1, 1]]}))
    (root / "1.png").write_bytes(b"corrupt")
    (root / "ann.jsonl").write_text("\n".join(lines))
    return FolderSource(root, root / "ann.jsonl")


def test_loader_workers_match_single_process_and_resume(loader, tmp_path):
    source = folder_of_pngs(tmp_path, 12)
    kw = dict(batch_size=3, seed=5, image_size=32, reference_size=8)
    plain = loader.make_loader(source, **kw)
    expect = take(plain, 6)
    with loader.make_loader(source, worker_count=2, **kw) as it:
        got = take(it, 2)
        state = json.loads(json.dumps(it.get_state()))
        got += take(it, 4)
        assert it.stats == plain.stats and it.stats["rejected_unreadable"] >= 1
    assert_same_batches(got, expect)
    for workers in (2, 0):  # the position is a count of items: any number of workers resumes it
        with loader.make_loader(source, worker_count=workers, **kw) as resumed:
            resumed.set_state(state)
            assert_same_batches(take(resumed, 4), expect[2:])
            assert resumed.stats == plain.stats
    other = loader.make_loader(folder_of_pngs(tmp_path / "more", 13), **kw)
    with pytest.raises(ValueError, match="saved data position is for a source of 12 items, this process's source "
                                         "has 13"):
        other.set_state(state)


def small_shards(folder, sizes):
    """Prepared shards written directly (`shards.write_shard`): shard k holds sizes[k] solid images."""
    import io

    from pbe_jax.data import shards

    folder.mkdir()
    (folder / shards.SETTINGS).write_text(json.dumps({"num_shards": len(sizes)}))
    n = 0
    for k, size in enumerate(sizes):
        records = []
        for _ in range(size):
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 30, 3), (n % 256, n // 256, 99), np.uint8)).save(buf, "PNG")
            records.append(shards.encode(f"img{n}", [[2, 2, 28, 20]], buf.getvalue()))
            n += 1
        shards.write_shard(folder, k, len(sizes), records, {"images": size})
    return shards.ShardSource(folder)


def test_shard_source_items_and_each_process_opens_only_its_shards(tmp_path, loader):
    source = small_shards(tmp_path / "s", [5, 5, 4, 6])
    assert len(source) == 20
    assert [source[i]["id"] for i in (0, 4, 5, 13, 14, 19)] == ["img0", "img4", "img5", "img13", "img14", "img19"]
    assert ids({"reference": np.stack([source[i]["image"] for i in range(20)])}) == list(range(20))
    with pytest.raises(IndexError):
        source[20]
    source = type(source)(tmp_path / "s")  # opened anew: no shard read yet
    it = loader.make_loader(source, batch_size=2, seed=0, image_size=32, reference_size=8, num_epochs=1,
                            process_index=1, process_count=2)
    got = sum((ids(b) for b in it), [])
    assert sorted(got) == list(range(10, 20))
    assert sorted(source._readers) == [2, 3]  # items 10-19 live in shards 2 and 3 only
    (tmp_path / "s" / "shard-00001-of-00004.json").unlink()
    with pytest.raises(ValueError, match=r"1 of its 4 shards are not complete \(the first: shard-00001-of-00004\)"):
        type(source)(tmp_path / "s")

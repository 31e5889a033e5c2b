"""Generated scenes and the held-out benchmark: determinism, the visible-fraction bookkeeping checked against
re-rendered object masks, the COCOEE layout and labels, resumable writing and the CLI (the baselines are
tests/test_baselines.py)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pbe_jax import batch
from pbe_jax.data import benchmark, pairs, synthetic

from conftest import SMALL_BENCHMARK

ROOT = Path(__file__).resolve().parents[1]
SIZE, N = SMALL_BENCHMARK["image_size"], SMALL_BENCHMARK["n"]  # the conftest's `bench`


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im


def colours_of(attrs: dict, extra_colours=()) -> np.ndarray:
    """The two tones an object of these attributes is painted in (in the world with `extra_colours`)."""
    colour = synthetic.palette(extra_colours)[attrs["colour"]]
    return np.stack([colour, synthetic.second_tone(colour)])


def painted_with(pixels: np.ndarray, attrs: dict, extra_colours=()) -> np.ndarray:
    """Per pixel (..., 3): whether it is one of the object's two tones."""
    return (pixels[..., None, :] == colours_of(attrs, extra_colours)).all(-1).any(-1)


# -------------------------------------------------------------------------------------------------- scenes

def test_source_is_deterministic_per_seed_and_index():
    a, b = synthetic.SyntheticSource(8, seed=3, image_size=64), synthetic.SyntheticSource(8, seed=3, image_size=64)
    for i in range(4):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["boxes"], y["boxes"])
        assert x["objects"] == y["objects"]
    other = synthetic.SyntheticSource(8, seed=4, image_size=64)
    assert not np.array_equal(a[0]["image"], other[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    with pytest.raises(IndexError, match="scene 8 out of range"):
        a[8]


def test_items_follow_the_source_interface_and_make_training_pairs():
    source = synthetic.SyntheticSource(20, seed=0, image_size=64)
    rng = np.random.default_rng(0)
    for i in range(20):
        item = source[i]
        assert item["image"].dtype == np.uint8 and item["image"].shape == (64, 64, 3)
        boxes = item["boxes"]
        assert boxes.dtype == np.float32 and boxes.shape == (len(item["objects"]), 4) and len(boxes) >= 1
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert item["id"] == f"scene{i:06d}"
        for obj, box in zip(item["objects"], boxes):
            assert list(box) == obj["box"]
            assert 0 <= obj["shape"] < len(synthetic.SHAPES) and 0 <= obj["colour"] < len(synthetic.COLOURS)
            assert 0 <= obj["pattern"] < len(synthetic.PATTERNS)
        pair = pairs.make_pair(item, rng, pairs.PairConfig(image_size=32, reference_size=16))
        assert pair["image"].shape == (32, 32, 3) and pair["reference"].shape == (16, 16, 3)


def test_visible_fractions_and_boxes_match_re_rendered_objects():
    source = synthetic.SyntheticSource(12, seed=7, image_size=SIZE)
    partly_outside = 0
    for i in range(12):
        item = source[i]
        masks = [synthetic.object_mask(o, SIZE) for o in item["objects"]]
        for k, obj in enumerate(item["objects"]):
            later = np.any(masks[k + 1:], axis=0) if k + 1 < len(masks) else np.zeros((SIZE, SIZE), bool)
            seen = masks[k] & ~later
            area = synthetic.footprint(synthetic.polygon(obj["shape"], obj["centre"], obj["radius"],
                                                         obj["rotation"])).area
            assert obj["visible"] == pytest.approx(seen.sum() / area, abs=1e-12)
            assert obj["visible"] >= source.min_visible
            ys, xs = np.nonzero(seen)
            assert obj["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            ys, xs = np.nonzero(masks[k])
            assert obj["extent"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # What the image shows there is the object itself, in its two tones.
            assert painted_with(item["image"][seen], obj).all()
            partly_outside += masks[k].sum() < area
    assert partly_outside > 0  # objects cut by the border exist, and count as partly hidden


def test_footprint_counts_pixels_outside_the_image():
    fp = synthetic.footprint(synthetic.polygon(synthetic.SHAPES.index("square"), (0, 0), 10, 0.0))
    window, inside = fp.clip(32, 40)
    assert fp.area == 17 * 17  # the square's corners at ±8 px, both ends included
    assert inside.sum() == 9 * 9 and window == (slice(0, 9), slice(0, 9))


def test_render_object_draws_on_a_pil_canvas():
    canvas = Image.new("RGB", (50, 30), (1, 2, 3))
    attrs = {"shape": synthetic.SHAPES.index("circle"), "colour": 2, "pattern": 0}
    box = synthetic.render_object(canvas, **attrs, centre=(45, 10), radius=8, rotation=0.3,
                                  rng=np.random.default_rng(0))
    a = np.asarray(canvas)
    drawn = painted_with(a, attrs)
    ys, xs = np.nonzero(drawn)
    assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) and box[2] == 50  # cut by the border
    assert (a[~drawn] == (1, 2, 3)).all()


def test_occlusion_limit_is_what_keeps_objects_visible():
    crowded = dict(min_objects=10, max_objects=10, radius=(0.2, 0.3))
    limited = [synthetic.render_scene(np.random.default_rng([1, i]), 64, **crowded) for i in range(5)]
    free = [synthetic.render_scene(np.random.default_rng([1, i]), 64, min_visible=0.02, **crowded) for i in range(5)]
    assert min(o["visible"] for s in limited for o in s.objects) >= 0.6
    assert sum(len(s.objects) for s in limited) < 50  # crowded scenes leave objects out
    assert min(o["visible"] for s in free for o in s.objects) < 0.3  # without the limit, objects get buried
    # The limit counts what the image border cuts off, too: large lone objects near it are moved inwards.
    alone = dict(min_objects=1, max_objects=1, radius=(0.4, 0.5))
    cut = [o["visible"] for i in range(10)
           for o in synthetic.render_scene(np.random.default_rng([2, i]), 48, min_visible=0.02, **alone).objects]
    kept = [o["visible"] for i in range(10)
            for o in synthetic.render_scene(np.random.default_rng([2, i]), 48, min_visible=0.9, **alone).objects]
    assert min(cut) < 0.9 <= min(kept)
    with pytest.raises(ValueError, match="min_visible must be in"):
        synthetic.render_scene(np.random.default_rng(0), 64, min_visible=0.0)


# ----------------------------------------------------------------------------------------------- benchmark

def test_benchmark_layout_and_labels(bench):
    ids = [f"{i:06d}" for i in range(N)]
    for role in benchmark.ROLES:
        assert sorted(p.stem for p in (bench / role).iterdir()) == ids
    labels = benchmark.read_labels(bench)
    assert list(labels) == ids
    settings = json.loads((bench / "benchmark.json").read_text())
    assert settings["n"] == N and settings["image_size"] == SIZE and settings["reference_size"] == 80
    assert settings["shapes"] == list(synthetic.SHAPES) and len(settings["colours"]) == len(synthetic.COLOURS)
    # sample.py --batch reads the folder as it is.
    assert [job.id for job in batch.read_layout(bench)] == ids
    for id_, label in labels.items():
        source, mask, reference = (load(bench / role / f"{id_}.png") for role in benchmark.ROLES)
        assert source.mode == "RGB" and source.size == (SIZE, SIZE)
        assert mask.mode == "L" and mask.size == (SIZE, SIZE)
        assert reference.mode == "RGB"
        x0, y0, x1, y1 = label["box"]
        expect = np.zeros((SIZE, SIZE), np.uint8)
        expect[y0:y1, x0:x1] = 255
        np.testing.assert_array_equal(np.asarray(mask), expect)
        # The masked object: mostly visible, big enough, and all of it under the mask.
        original = label["original"]
        assert original["visible"] >= benchmark.MOSTLY_VISIBLE
        whole = synthetic.object_mask(original, SIZE)
        assert whole.any() and (expect[whole] == 255).all()
        assert painted_with(np.asarray(source)[whole], original).mean() >= benchmark.MOSTLY_VISIBLE - 0.01
        # The exemplar: other attributes, another rotation, another size, drawn whole with a margin.
        ref = label["reference"]
        assert any(ref[k] != original[k] for k in ("shape", "colour", "pattern"))
        turn = abs(ref["rotation"] - original["rotation"]) % (2 * np.pi)
        assert min(turn, 2 * np.pi - turn) >= benchmark.MIN_TURN - 1e-9
        assert ref["radius"] >= benchmark.REFERENCE_RADIUS[0] * 80 > original["radius"]
        reach = np.abs(synthetic.polygon(ref["shape"], (0, 0), ref["radius"], ref["rotation"])).max(0)
        expect_size = 2 * reach + 2 * benchmark.REFERENCE_PAD
        assert np.all(np.abs(np.asarray(reference.size) - expect_size) <= 2)
        assert painted_with(np.asarray(reference), ref).mean() > 0.3


def test_benchmark_is_deterministic_resumable_and_guards_its_settings(bench, tmp_path):
    again = tmp_path / "again"
    benchmark.make_benchmark(again, n=N, image_size=SIZE, reference_size=80)
    assert digests(again) == digests(bench)
    (again / "source" / "000002.png").unlink()
    (again / "labels.jsonl").unlink()
    stats = benchmark.make_benchmark(again, n=N, image_size=SIZE, reference_size=80)
    assert stats == {"written": 1, "kept": 3 * N - 1}
    assert digests(again) == digests(bench)
    with pytest.raises(ValueError, match=r"benchmark.json.*seed=1000003, now 5"):
        benchmark.make_benchmark(again, n=N, seed=5, image_size=SIZE, reference_size=80)


def test_exemplar_attributes_never_repeat_the_masked_object():
    rng = np.random.default_rng(0)
    original = {"shape": 1, "colour": 2, "pattern": 3}
    drawn = [benchmark._other_attributes(original, rng) for _ in range(2000)]
    assert original not in drawn
    assert len({tuple(d.values()) for d in drawn}) > 150  # otherwise uniform over the 191 other triples


def test_benchmark_scenes_are_not_training_scenes():
    # Without the item tag, numpy's zero padding would make benchmark item i with seed s training scene i.
    for i in range(3):
        train = synthetic.SyntheticSource(3, seed=0, image_size=64)[i]["image"]
        assert not np.array_equal(benchmark.make_item(i, seed=0, image_size=64).source, train)


def test_write_examples(tmp_path):
    [one] = benchmark.write_examples(tmp_path / "one")
    assert one == tmp_path / "one"
    assert load(one / "source.png").size == (128, 128) and load(one / "mask.png").mode == "L"
    assert json.loads((one / "label.json").read_text())["id"] == "000000"
    # The examples are not benchmark items.
    first = benchmark.make_item(0)
    assert not np.array_equal(np.asarray(load(one / "source.png")), first.source)
    two = benchmark.write_examples(tmp_path / "two", n=2, image_size=64)
    assert two == [tmp_path / "two" / "000000", tmp_path / "two" / "000001"]
    assert all((f / f"{role}.png").exists() for f in two for role in benchmark.ROLES)


# --------------------------------------------------------------------------------------------------------- CLI

def test_cli_make(tmp_path, capsys):
    out = tmp_path / "b"
    assert benchmark.main(["make", str(out), "--n", "2", "--size", "64"]) == 0
    assert "2 items (6 images written" in capsys.readouterr().out
    assert len(benchmark.read_labels(out)) == 2 and load(out / "source" / "000001.png").size == (64, 64)
    assert benchmark.main(["make", str(out), "--n", "2", "--size", "80"]) == 1
    assert "image_size=64, now 80" in capsys.readouterr().err
    assert benchmark.main(["examples", str(tmp_path / "ex"), "--size", "64"]) == 0
    assert "1 example(s)" in capsys.readouterr().out and load(tmp_path / "ex" / "mask.png").size == (64, 64)
    with pytest.raises(SystemExit):  # the baselines are pbe_jax.eval.baselines now
        benchmark.parse_args(["baseline", "unchanged", str(out), str(tmp_path / "r")])


# --------------------------------------------------------------------------------------- a world with more colours

def test_a_world_with_an_extra_colour_keeps_the_base_world_and_adds_one():
    assert synthetic.colour_names(("pink",)) == synthetic.COLOUR_NAMES + ("pink",)
    assert synthetic.palette(("pink",))[-1] == synthetic.EXTRA_COLOURS["pink"]
    with pytest.raises(ValueError, match=r"\['mauve'\]: each must be one of \['pink'\]"):
        synthetic.palette(("mauve",))
    base, pink = (synthetic.SyntheticSource(40, seed=3, image_size=64, extra_colours=e) for e in ((), ("pink",)))
    np.testing.assert_array_equal(base[0]["image"], synthetic.SyntheticSource(40, seed=3, image_size=64)[0]["image"])
    colours = [o["colour"] for i in range(40) for o in pink[i]["objects"]]
    assert max(colours) == 8 and len(set(colours)) == 9  # pink among the base colours, at the end
    scene = next(s for s in map(pink.scene, range(40)) if any(o["colour"] == 8 for o in s.objects))
    k = next(k for k, o in enumerate(scene.objects) if o["colour"] == 8)
    shown = scene.image[scene.labels == k]
    tones = np.stack([synthetic.EXTRA_COLOURS["pink"], synthetic.second_tone(synthetic.EXTRA_COLOURS["pink"])])
    assert (shown[:, None, :] == tones).all(-1).any(-1).all()  # every pixel of it in one of pink's tones


def test_a_benchmark_of_what_is_new(tmp_path):
    """Every exemplar pink, in the world with pink; benchmark.json names the world, and the eval reads it."""
    from pbe_jax import eval as evaluation

    out = tmp_path / "new"
    benchmark.make_benchmark(out, n=4, image_size=64, extra_colours=("pink",), reference_colour="pink")
    settings = json.loads((out / "benchmark.json").read_text())
    assert settings["colours"][-1] == "pink" and settings["reference_colour"] == "pink"
    pink = synthetic.COLOUR_NAMES.index("white") + 1
    for id_, label in benchmark.read_labels(out).items():
        assert label["reference"]["colour"] == pink
        assert painted_with(np.asarray(load(out / "reference" / f"{id_}.png")), label["reference"], ("pink",)).mean() > 0.3
    assert evaluation.world(out) == (("pink",), None)
    settings["colours"][-1] = "mauve"
    (out / "benchmark.json").write_text(json.dumps(settings))
    assert evaluation.world(out)[1].endswith("followed by any of ['pink']")
    with pytest.raises(ValueError, match="'pink' is not one of this world's colours"):
        benchmark.make_item(0, image_size=64, reference_colour="pink")
    with pytest.raises(ValueError, match="'pink' is not one of this world's colours"):  # before writing anything
        benchmark.make_benchmark(tmp_path / "nothing", n=2, image_size=64, reference_colour="pink")
    assert not (tmp_path / "nothing").exists()

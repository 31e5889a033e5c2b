"""The quality benchmark: metric values against direct computations, the attribute classifier, and
`python -m pbe_jax.eval` end to end on a tiny benchmark made from generated scenes."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from pbe_jax.data import synthetic
from pbe_jax.eval import attributes, evaluate, metrics
from pbe_jax.models import ConfigError
from pbe_jax.eval.__main__ import main

TEST_STEPS = 300  # the test's classifier: a tenth of the default training, enough to be far above chance


def _image(seed: int, h: int = 32, w: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 236, (h, w, 3)).astype(np.uint8)


def _box_mask(h: int, w: int, box) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return m


def test_psnr_known_values_and_mask():
    a = _image(0)
    assert metrics.psnr(a, a) == math.inf
    # ±5 on every value: MSE exactly 25.
    sign = np.where(np.indices(a.shape).sum(0) % 2 == 0, 5, -5)
    b = (a.astype(int) + sign).astype(np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    mask = _box_mask(32, 40, (5, 6, 20, 25))
    c = b.copy()
    c[6:25, 5:20] = 0  # inside the mask: must not count
    assert metrics.psnr(a, c, mask) == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    assert metrics.psnr(a, c) < 20
    with pytest.raises(ValueError, match="whole image"):
        metrics.psnr(a, b, np.full((32, 40), 255, np.uint8))
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, a[:-1])


def _ssim_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM written out window by window: Gaussian-weighted statistics of each 11×11 window
    fully inside the image, per channel, averaged."""
    x = np.arange(11) - 5
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(3):
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                pa, pb = a[i:i + 11, j:j + 11, ch].astype(float), b[i:i + 11, j:j + 11, ch].astype(float)
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_known_values_and_mask():
    a = _image(1, 18, 20)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a.astype(int) + np.random.default_rng(2).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(a, b) == pytest.approx(_ssim_direct(a, b), rel=1e-9)
    assert metrics.ssim(a, b) < 0.97
    # Constant images: only the luminance term is left.
    p, q = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(p, q) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-9)
    # Masked: whatever is inside the mask, even beside kept pixels, changes nothing.
    a, b = _image(3, 40, 40), _image(3, 40, 40)
    mask = _box_mask(40, 40, (12, 10, 30, 28))
    b[10:28, 12:30] = 255 - b[10:28, 12:30]
    assert metrics.ssim(a, b, mask) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(a, b) < 0.8
    noisy = np.clip(b.astype(int) + 30 * (np.indices((40, 40)).sum(0) % 2)[..., None], 0, 255).astype(np.uint8)
    assert metrics.ssim(a, noisy, mask) < 0.99


def test_frechet_distance_against_direct_formula():
    rng = np.random.default_rng(0)
    d = 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # Diagonal covariances: tr (Σ1 Σ2)^½ = Σ √(σ1 σ2).
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    direct = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(direct, rel=1e-10)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(mu1, s1, mu2[:3], s2)


def test_fid_and_stats_files(tmp_path):
    def toy_inception(batch):  # mean and spread of each channel, as "features"
        x = np.stack([np.asarray(im, float) for im in batch])
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], -1)

    real = [_image(i, 12, 12) for i in range(10)]
    fake = [np.clip(im.astype(int) + 40, 0, 255).astype(np.uint8) for im in real]
    assert metrics.fid(real, real, toy_inception, batch_size=3) == pytest.approx(0.0, abs=1e-9)
    value = metrics.fid(real, fake, toy_inception, batch_size=4)
    stats_r = metrics.feature_stats(toy_inception(real))
    stats_f = metrics.feature_stats(toy_inception(fake))
    assert value == pytest.approx(metrics.frechet_distance(*stats_r, *stats_f), rel=1e-12)
    assert value > 1000  # a 40-level shift in every channel's mean
    metrics.save_stats(tmp_path / "real.npz", *stats_r)
    mu, sigma = metrics.load_stats(tmp_path / "real.npz")
    np.testing.assert_array_equal(mu, stats_r[0])
    np.testing.assert_array_equal(sigma, stats_r[1])
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="bad.npz"):
        metrics.load_stats(tmp_path / "bad.npz")


def test_cosine_is_the_clip_style_score():
    embed = lambda batch: np.stack([np.asarray(im, float).mean((0, 1)) for im in batch])  # noqa: E731
    red, green = np.zeros((8, 8, 3), np.uint8), np.zeros((5, 9, 3), np.uint8)
    red[..., 0], green[..., 1] = 200, 200
    dim_red = (red // 4).astype(np.uint8)
    s = metrics.cosine(embed([red, green, red, dim_red]), embed([red, green, green, red]))
    assert s.dtype == np.float64 and s == pytest.approx([1.0, 1.0, 0.0, 1.0], abs=1e-12)
    assert metrics.cosine(np.zeros((1, 3)), np.ones((1, 3))) == pytest.approx([0.0])  # no division by zero


def _tiny_encoder():
    from pbe_jax.convert.init import random_module
    from pbe_jax.models import CLIPVisionConfig, PaintByExampleImageEncoder

    cfg = CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_hidden_layers=2,
                           image_size=28, patch_size=7, projection_dim=16)
    return random_module(PaintByExampleImageEncoder, cfg)


def test_clip_embedder_is_the_towers_pooled_output(tmp_path):
    from pbe_jax.convert.diffusers import save_component
    from pbe_jax.images import ReferenceProcessor

    encoder = _tiny_encoder()
    save_component(encoder, tmp_path / "pbe" / "image_encoder", "image_encoder", format="jax")
    imgs = [_image(i, 20 + 7 * i, 30) for i in range(5)]  # any sizes; more than one padded batch
    from_folder = metrics.clip_embedder(tmp_path / "pbe", batch_size=2)(imgs)
    from_module = metrics.clip_embedder(encoder, batch_size=4)(imgs)
    pixels = np.stack([ReferenceProcessor.from_config(None, 28)(im) for im in imgs])
    expected = np.asarray(encoder.model(pixels)[1])
    assert from_folder.shape == (5, 24)
    np.testing.assert_allclose(from_folder, expected, atol=1e-5)
    np.testing.assert_allclose(from_module, expected, atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # different images, different vectors


def test_clip_embedder_reads_a_transformers_clip_folder(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pbe_jax.images import ReferenceProcessor

    cfg = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2,
                                        num_hidden_layers=2, image_size=28, patch_size=7)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    imgs = [_image(i, 30, 36) for i in range(3)]
    pixels = np.stack([ReferenceProcessor.from_config(None, 28)(im) for im in imgs])
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    np.testing.assert_allclose(metrics.clip_embedder(tmp_path / "clip")(imgs), expected, atol=1e-4)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    model, score = attributes.train_classifier(TEST_STEPS, seed=0, pool=2048, held_out=512)
    folder = attributes.save(model, tmp_path_factory.mktemp("classifier"), {"held_out": score})
    return model, score, folder


def test_classifier_learns_and_round_trips(classifier):
    model, score, folder = classifier
    # Chance is 1/6, 1/8 and 1/4; a tenth of the training reads colour, and shape and pattern far above chance.
    assert score["colour"] > 0.9 and score["pattern"] > 0.6 and score["shape"] > 0.4, score
    crops, _ = attributes.render_crops(64, np.random.default_rng(7))
    loaded = attributes.load(folder)
    np.testing.assert_array_equal(attributes.predict(loaded, list(crops)), attributes.predict(model, list(crops)))
    assert json.loads((folder / "config.json").read_text())["info"]["held_out"]["n"] == 512
    odd = [crops[0][:5, :9], crops[1]]  # any crop size is resized
    assert attributes.predict(model, odd).shape == (2, 3)


def _benchmark(tmp_path, n: int):
    """The project's held-out benchmark (n items) and its two baselines' results folders."""
    from pbe_jax.data import benchmark
    from pbe_jax.eval import baselines

    bench = tmp_path / "bench"
    benchmark.make_benchmark(bench, n=n)
    baselines.copy_paste(bench, tmp_path / "paste")
    baselines.unchanged(bench, tmp_path / "unchanged")
    return bench


def test_cli_end_to_end(tmp_path, classifier, capsys):
    bench = _benchmark(tmp_path, 12)
    (tmp_path / "unchanged" / "000003.png").unlink()  # a missing result is counted and skipped

    reports = {}
    for name in ("unchanged", "paste"):
        assert main([str(tmp_path / name), "--benchmark", str(bench), "--classifier", str(classifier[2]),
                     "--json"]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    same, paste = reports["unchanged"], reports["paste"]
    assert same["missing"] == ["000003"] and same["evaluated"] == 11 and paste["missing"] == []
    # Both keep everything outside the mask exactly.
    for r in (same, paste):
        assert r["metrics"]["psnr"]["mean"] == math.inf and r["metrics"]["ssim"]["mean"] == pytest.approx(1.0)
        assert r["metrics"]["clip"] is None and "clip" in r["skipped"] and "fid" in r["skipped"]
    # The copy-paste shows the reference's object in the box; the unchanged source shows the masked one, which
    # differs from it in at least one attribute.
    a, b = same["metrics"]["attributes"], paste["metrics"]["attributes"]
    assert b["n"] == 12 and a["n"] == 11
    assert b["colour"] + b["pattern"] + b["shape"] > a["colour"] + a["pattern"] + a["shape"] + 1.0, (a, b)
    assert b["all"] > a["all"]

    assert main([str(tmp_path / "unchanged"), "--benchmark", str(bench), "--classifier", str(classifier[2]),
                 "--per-item"]) == 0
    out = capsys.readouterr().out
    assert "attributes: all" in out and "1 results missing (e.g. 000003)" in out and "000011" in out

    # Several folders: one Markdown row each, the same numbers as the single reports.
    assert main([str(tmp_path / "unchanged"), str(tmp_path / "paste"), "--benchmark", str(bench),
                 "--classifier", str(classifier[2])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| results | n | PSNR") and "attr. all" in lines[0] and "CLIP" not in lines[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:4]}
    assert rows["paste"][1] == "12" and rows["unchanged"][1] == "11"
    assert float(rows["paste"][-1].rstrip(" |")) == pytest.approx(b["all"], abs=1e-3)
    assert any("unchanged: 1 missing" in line for line in lines)


def test_evaluate_clip_and_fid_without_labels(tmp_path):
    bench = _benchmark(tmp_path, 4)
    (bench / "labels.jsonl").unlink()  # boxes from the masks, no attribute score
    (tmp_path / "paste" / "000001.png").write_bytes(b"not a png")

    def toy_inception(batch):
        return np.stack([np.asarray(im, float).mean((0, 1)) for im in batch])

    report = evaluate(tmp_path / "paste", bench, embed_fn=metrics.clip_embedder(_tiny_encoder()),
                      inception_fn=toy_inception, batch_size=2)
    assert report["evaluated"] == 3 and [f["id"] for f in report["failed"]] == ["000001"]
    assert report["metrics"]["attributes"] is None and "labels.jsonl" in report["skipped"]["attributes"]
    assert -1 <= report["metrics"]["clip"]["mean"] <= 1 and report["metrics"]["clip"]["n"] == 3
    assert report["metrics"]["fid"]["value"] > 0 and report["metrics"]["fid"]["n"] == 3
    same = evaluate(tmp_path / "unchanged", bench, inception_fn=toy_inception)["metrics"]["fid"]["value"]
    assert same == pytest.approx(0, abs=1e-6)


def test_a_shared_cache_embeds_the_benchmark_once(tmp_path):
    bench = _benchmark(tmp_path, 4)
    seen = {"embed": 0, "inception": 0}

    def counting(name):
        def fn(batch):
            seen[name] += len(batch)
            return np.stack([np.asarray(im, float).mean((0, 1)) + 1 for im in batch])
        return fn

    embed, inception = counting("embed"), counting("inception")
    folders = [tmp_path / "paste", tmp_path / "unchanged"]
    alone = [evaluate(f, bench, embed_fn=embed, inception_fn=inception, batch_size=3)["metrics"] for f in folders]
    images = {"embed": seen["embed"], "inception": seen["inception"]}
    seen.update(embed=0, inception=0)
    cache = {}
    shared = [evaluate(f, bench, embed_fn=embed, inception_fn=inception, batch_size=3, cache=cache)["metrics"]
              for f in folders]
    assert shared == alone
    results = sum(evaluate(f, bench)["evaluated"] for f in folders)
    # Per folder: its regions (embed) and results (inception); the references and sources once in all.
    assert images == {"embed": 2 * results, "inception": 2 * results}
    assert seen == {"embed": results + 4, "inception": results + 4}


def test_cli_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--inception MODULE:FUNCTION" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--benchmark", str(tmp_path), "--fid-stats", "x.npz"])
    assert "--fid-stats needs --inception" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), "--benchmark", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


def test_labels_are_checked_and_vocabularies_compared(tmp_path, classifier):
    bench = _benchmark(tmp_path, 2)
    good = (bench / "labels.jsonl").read_text()
    row = json.loads(good.splitlines()[0])
    for bad, message in (({**row, "box": [10, 10, 5, 20]}, "x1 > x0"),
                         ({**row, "reference": {"shape": 9, "colour": 0, "pattern": 0}}, "shape=9 is outside 0..5"),
                         ({**row, "reference": {"shape": 1}}, "reference needs integer")):
        (bench / "labels.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message) as e:
            evaluate(tmp_path / "paste", bench, classifier=classifier[0])
        assert "labels.jsonl, id 000000" in str(e.value)
    (bench / "labels.jsonl").write_text(good)
    (bench / "benchmark.json").write_text(json.dumps({"shapes": ["blob"] * 6}))
    report = evaluate(tmp_path / "paste", bench, classifier=classifier[0])
    assert report["metrics"]["attributes"] is None and "other shapes" in report["skipped"]["attributes"]
    # A benchmark of a world with one more colour than the classifier reads (data.benchmark --extra-colours).
    (bench / "benchmark.json").write_text(json.dumps({"colours": list(synthetic.COLOUR_NAMES) + ["pink"]}))
    report = evaluate(tmp_path / "paste", bench, classifier=classifier[0])
    assert report["metrics"]["attributes"] is None
    assert report["skipped"]["attributes"].endswith("the benchmark's world has [6, 9, 4]")
    with pytest.raises(ConfigError, match=r"classes \[6, 8, 4\] do not match the synthetic world's \[6, 9, 4\]"):
        attributes.load(classifier[2], ("pink",))


def test_cli_fid_with_a_user_feature_function(tmp_path, monkeypatch, capsys):
    bench = _benchmark(tmp_path, 4)
    (tmp_path / "toy_inception.py").write_text(
        "import numpy as np\n\n"
        "def features(batch):\n"
        "    return np.stack([np.asarray(im, float).reshape(-1, 3).mean(0) for im in batch])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [str(tmp_path / "paste"), "--benchmark", str(bench), "--no-attributes", "--json",
            "--inception", "toy_inception:features"]
    assert main(args) == 0
    against_sources = json.loads(capsys.readouterr().out)["metrics"]["fid"]["value"]
    import toy_inception

    sources = [np.asarray(Image.open(p)) for p in sorted((bench / "source").iterdir())]
    metrics.save_stats(tmp_path / "real.npz", *metrics.feature_stats(toy_inception.features(sources)))
    assert main(args + ["--fid-stats", str(tmp_path / "real.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["fid"]["value"] == pytest.approx(against_sources)
    assert against_sources > 0
    assert main(args[:-1] + ["toy_inception:nothing"]) == 1
    assert "toy_inception:nothing" in capsys.readouterr().err


def _pytorch_fid_frechet():
    """pytorch-fid's own calculate_frechet_distance, taken from its installed source. Importing the module
    would import torchvision and its Inception classes (PyPI's torchvision does not import beside the CPU
    torch here), so only that function's definition is compiled, with numpy and scipy.linalg as its module
    has them."""
    import ast
    import importlib.util

    from scipy import linalg

    spec = importlib.util.find_spec("pytorch_fid.fid_score")
    if spec is None:
        pytest.skip("pytorch-fid is not installed")
    tree = ast.parse(open(spec.origin).read())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance"]
    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module([fn], type_ignores=[]), spec.origin, "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def test_frechet_distance_as_pytorch_fid_computes_it():
    reference = _pytorch_fid_frechet()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(200, 16)) @ rng.normal(size=(16, 16))
    stats = [*metrics.feature_stats(a), *metrics.feature_stats(b)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm's deprecated disp
        want = reference(*stats)
    assert metrics.frechet_distance_sqrtm(*stats) == pytest.approx(want, rel=1e-12)
    assert metrics.frechet_distance_sqrtm(*stats) == pytest.approx(metrics.frechet_distance(*stats), rel=1e-6)
    # Fewer samples than dimensions: singular covariances, still the same number as pytorch-fid's.
    few = [*metrics.feature_stats(a[:8]), *metrics.feature_stats(b[:8])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = reference(*few)
        assert metrics.frechet_distance_sqrtm(*few) == pytest.approx(want, rel=1e-6)
    # A product whose root is complex on the diagonal: both refuse it.
    bad = [np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), np.diag([-1.0, 1.0])]
    with pytest.raises(ValueError, match="Imaginary component"):
        reference(*bad)
    with pytest.raises(ValueError, match="imaginary component of 1"):
        metrics.frechet_distance_sqrtm(*bad)
    with pytest.raises(ValueError, match="statistics do not match"):
        metrics.frechet_distance_sqrtm(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

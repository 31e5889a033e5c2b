"""The paper's Table 1 (--protocol cocoee) against the original release's recipe, computed here in PyTorch from
the issue's description: transformers' CLIP with its projection, the torchvision transforms (restated below on
PIL, as torchvision applies them to PIL images: torchvision's wheel does not load beside the CPU torch here),
scikit-learn's GaussianMixture, pytorch-fid's InceptionV3 and Fréchet distance; on a tiny COCOEE-layout set with
tiny random CLIP and Inception weights."""
import json
import pickle
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pbe_jax.eval import cocoee, cocoee_protocol as protocol
from pbe_jax.eval import gmm as gmm_lib
from pbe_jax.eval.__main__ import main
from pbe_jax.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from conftest import xla_env

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the tiny CLIP tower's image size (224 for ViT-B/32)
GOOD = [1, 7, 42, 1234, 3, 8, 9, 10, 11, 12, 14, 15]  # items with everything, scored


def _image(rng, h, w):
    """A smooth random picture (noise would make every feature alike)."""
    low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))


def _save(a, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def make_cocoee(root: Path, rng) -> Path:
    """Release layout: GT_3500/{id:012d}_GT.png, Mask_bbox_3500/..._mask.png, Ref_3500/..._ref.png, id_list.npy;
    and results/{id}.png. Problems on purpose: 5 has an all-black mask, 99 no reference, 77 no result, 13 an
    unreadable result."""
    bench, results = root / "test_bench", root / "results"
    ids = GOOD + [5, 99, 77, 13]
    bench.mkdir(parents=True)
    np.save(bench / "id_list.npy", np.array(ids, np.int64))
    for n, i in enumerate(ids):
        name = f"{i:012d}"
        gt = _image(rng, 64, 64)
        mask = np.zeros((64, 64), np.uint8)
        if i != 5:
            y, x = rng.integers(4, 24, 2)
            mask[y:y + rng.integers(16, 36), x:x + rng.integers(16, 36)] = 255
            if n % 3 == 0:  # not a rectangle: the raster-order box differs from the bounding box
                mask[y + 2, x - 3] = 255
        _save(gt, bench / "GT_3500" / f"{name}_GT.png")
        _save(mask, bench / "Mask_bbox_3500" / f"{name}_mask.png")
        if i != 99:
            _save(_image(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))), bench / "Ref_3500" / f"{name}_ref.png")
        if i == 13:
            (results / f"{name}.png").write_bytes(b"not a png")
        elif i != 77:
            result = gt.copy()
            result[mask == 255] = _image(rng, 64, 64)[mask == 255]
            _save(result, results / f"{name}.png")
    return bench


def make_real(folder: Path, rng) -> Path:
    for n, (h, w) in enumerate([(80, 60), (60, 90), (70, 70), (96, 64), (64, 100), (75, 75), (90, 80), (66, 88),
                                (100, 100), (81, 57)]):
        _save(_image(rng, h, w), folder / f"{n:04d}.jpg" if n % 2 else folder / f"{n:04d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("cocoee")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=SIZE, patch_size=8),
                     text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                      vocab_size=99, max_position_embeddings=16), projection_dim=8)
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(root / "clip")
    return {"root": root, "bench": make_cocoee(root, rng), "results": root / "results",
            "real": make_real(root / "real", rng), "clip_dir": root / "clip", "clip": clip}


# ---- the original recipe, in PyTorch -------------------------------------------------------------------

def to_tensor(img: Image.Image) -> torch.Tensor:  # torchvision's ToTensor of an RGB PIL image
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)


def NORM(t: torch.Tensor) -> torch.Tensor:  # Normalize(mean, std)
    return (t - torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]) / torch.tensor(OPENAI_CLIP_STD)[:, None, None]


def resize(img: Image.Image, size: int, resample=Image.Resampling.BILINEAR) -> Image.Image:
    """torchvision's Resize(size) of a PIL image: the short side to size, the long to int(size * long / short)."""
    w, h = img.size
    if w <= h:
        return img.resize((size, int(size * h / w)), resample)
    return img.resize((int(size * w / h), size), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:  # CenterCrop(size): offsets int(round(margin / 2))
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def CLIP_PREPROCESS(img: Image.Image) -> torch.Tensor:  # openai CLIP's preprocess, at the tiny tower's size
    return NORM(to_tensor(center_crop(resize(img, SIZE, Image.Resampling.BICUBIC), SIZE).convert("RGB")))


def COCO_PREPARE(img: Image.Image) -> Image.Image:  # Resize(512) (bilinear, torchvision's default), CenterCrop(512)
    return center_crop(resize(img, 512), 512)


def torch_features(clip, batch):
    with torch.no_grad():
        return clip.visual_projection(clip.vision_model(pixel_values=torch.stack(batch)).pooler_output).numpy()


def torch_region(result: Image.Image, mask: Image.Image):
    img = to_tensor(result.convert("RGB"))
    ys, xs = np.where(np.array(mask.convert("L")) == 255)  # row-major: the first and last in raster order
    crop = img[:, ys[0]:ys[-1], xs[0]:xs[-1]]
    return NORM(F.interpolate(crop[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0])


def torch_reference(ref: Image.Image):
    return NORM(to_tensor(ref.convert("RGB").resize((SIZE, SIZE))))


def original(world):
    """Per-item CLIP scores, the results' CLIP features and the real set's, as the release computes them."""
    bench, results, clip = world["bench"], world["results"], world["clip"]
    scores, fake = [], []
    for i in GOOD:
        name = f"{i:012d}"
        result = Image.open(results / f"{name}.png")
        a = torch_features(clip, [torch_region(result, Image.open(bench / "Mask_bbox_3500" / f"{name}_mask.png"))])
        b = torch_features(clip, [torch_reference(Image.open(bench / "Ref_3500" / f"{name}_ref.png"))])
        a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        scores.append(100 * float((a * b).sum()))
        fake.append(CLIP_PREPROCESS(result.convert("RGB")))
    real = [CLIP_PREPROCESS(COCO_PREPARE(Image.open(p).convert("RGB")))
            for p in sorted(world["real"].iterdir()) if p.name != "broken.jpg"]
    return np.array(scores), torch_features(clip, fake), torch_features(clip, real)


def fid_reference():
    from test_eval import _pytorch_fid_frechet

    return _pytorch_fid_frechet()


@pytest.fixture(scope="module")
def ours(world):
    from pbe_jax.eval.clip import load_image_features
    from pbe_jax.eval.features import Extractor

    tower, _ = load_image_features(world["clip_dir"])
    clip = Extractor(tower, batch_size=8)
    stats, info = protocol.reference_stats(world["real"], {"clip": lambda x: clip(protocol.clip_input(SIZE)(x))},
                                           batch_size=4)
    return {"clip": clip, "stats": stats, "info": info}


def test_layout_problems_are_listed_and_skipped(world, ours):
    report = protocol.evaluate(world["results"], world["bench"], clip=ours["clip"], clip_size=SIZE, batch_size=5)
    assert report["items"] == len(GOOD) + 4 and report["n"] == len(GOOD)
    assert [r["id"] for r in report["per_item"]] == [f"{i:012d}" for i in GOOD]  # id_list's order
    assert report["missing"] == ["000000000077"]
    failed = {f["id"]: f["error"] for f in report["failed"]}
    assert set(failed) == {"000000000005", "000000000099", "000000000013"}
    assert "000000000005_mask.png" in failed["000000000005"] and "no white" in failed["000000000005"]
    assert "no reference" in failed["000000000099"]
    assert "000000000013.png" in failed["000000000013"]
    assert report["fid_clip"] is report["qs"] is report["fid_inception"] is None
    assert set(report["skipped"]) == {"fid_clip", "qs", "fid_inception"}
    assert ours["info"]["n"] == 10 and [Path(f["file"]).name for f in ours["info"]["failed"]] == ["broken.jpg"]


def test_clip_score_fid_and_qs_equal_the_original_recipe(world, ours, tmp_path):
    from sklearn.mixture import GaussianMixture

    scores, fake, real = original(world)
    mixture = GaussianMixture(2, covariance_type="full", reg_covar=1e-4, random_state=0).fit(np.concatenate([fake, real]))
    loglik = mixture.score_samples(fake)
    want_qs = float(np.clip(loglik / 300, 0, 1).mean() * 100)
    assert 0 < want_qs < 100, f"the test's mixture should give log-likelihoods inside (0, 300): {loglik}"
    want_fid = fid_reference()(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))

    report = protocol.evaluate(world["results"], world["bench"], clip=ours["clip"], clip_size=SIZE,
                               gmm=gmm_lib.from_sklearn(mixture), fid_stats=ours["stats"], batch_size=5)
    got = np.array([r["clip_score"] for r in report["per_item"]])
    np.testing.assert_allclose(got, scores, rtol=1e-4)
    assert report["clip_score"] == pytest.approx(scores.mean(), rel=1e-4)
    assert report["qs"] == pytest.approx(want_qs, rel=1e-4)
    assert report["fid_clip"] == pytest.approx(want_fid, rel=1e-3)
    assert report["psnr"] > 0 and 0 < report["ssim"] <= 1


def test_cli_json_markdown_and_cached_statistics(world, tmp_path, capsys):
    from sklearn.mixture import GaussianMixture

    features = np.random.default_rng(0).normal(size=(40, 8))
    (tmp_path / "gmm.pkl").write_bytes(pickle.dumps(GaussianMixture(2, random_state=0).fit(features)))
    with pytest.warns(UserWarning, match="unpickling"):
        assert main(["gmm-to-npz", str(tmp_path / "gmm.pkl"), str(tmp_path / "gmm.npz")]) == 0
    stats = tmp_path / "stats.npz"
    base = [str(world["results"]), "--benchmark", str(world["bench"]), "--protocol", "cocoee",
            "--model", str(world["clip_dir"]), "--compile-cache", "off"]
    capsys.readouterr()
    assert main(base + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == len(GOOD) and report["clip_score"] > 0 and report["fid_clip"] is None

    args = base + ["--fid-reference", str(world["real"]), "--fid-stats", str(stats), "--gmm", str(tmp_path / "gmm.npz")]
    assert main(args + ["--json"]) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)
    assert "computing clip statistics" in out.err and stats.is_file()
    assert first["clip_score"] == report["clip_score"] and first["fid_clip"] > 0 and first["qs"] is not None
    cached, meta = protocol.load_stats(stats)
    assert set(cached) == {"clip"} and meta["clip"]["n"] == 10 and meta["clip"]["skipped"] == 1
    assert main(args + ["--report", str(tmp_path / "r.json"), "--per-item"]) == 0
    out = capsys.readouterr()
    assert "using the cached statistics" in out.err
    assert out.out.startswith("| Method | n | FID ↓ | QS ↑ | CLIP score ↑ |")
    row = out.out.splitlines()[2]
    assert row.startswith(f"| results | {len(GOOD)} | {first['fid_clip']:.2f} | {first['qs']:.2f} | "
                          f"{first['clip_score']:.2f} |")
    assert "skipped 000000000005" in out.out and "1 results missing" in out.out
    per_item = out.out.split("\nid ")[1].splitlines()[1:]
    assert [line.split()[0] for line in per_item] == [f"{i:012d}" for i in GOOD]
    assert json.loads((tmp_path / "r.json").read_text())["fid_clip"] == first["fid_clip"]


def test_cli_errors(world, tmp_path, capsys):
    base = ["--benchmark", str(world["bench"]), "--protocol", "cocoee", "--compile-cache", "off"]
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), *base, "--model", str(world["clip_dir"])]) == 1
    assert "no item" in capsys.readouterr().err  # an evaluation over nothing
    with pytest.raises(SystemExit):
        main([str(world["results"]), *base])  # no --model
    assert "needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(world["results"]), "--benchmark", str(world["bench"]), "--gmm", "x.npz"])
    assert "only with --protocol cocoee" in capsys.readouterr().err
    assert main([str(world["results"]), *base, "--model", str(tmp_path)]) == 1  # not a CLIP folder
    assert str(tmp_path) in capsys.readouterr().err


def test_clip_pixels_and_coco_preparation_equal_the_recipe():
    rng = np.random.default_rng(3)
    for h, w in [(64, 64), (70, 97), (131, 64)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = CLIP_PREPROCESS(Image.fromarray(rgb)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(cocoee.clip_pixels(rgb, SIZE), want, atol=1e-6)
        np.testing.assert_array_equal(cocoee.coco_reference(rgb), np.asarray(COCO_PREPARE(Image.fromarray(rgb))))
    # CenterCrop rounds an odd margin as Python's round does (3.5 → 4), not down.
    a = np.arange(231 * 225).reshape(231, 225)
    np.testing.assert_array_equal(cocoee.center_crop(a, 224), a[4:228, 0:224])


def test_bench_script_samples_with_the_original_settings_resumably_and_prints_the_row(world, tmp_path):
    """bench/cocoee.sh end to end: the shipped model on a clean three-item release layout, the tiny CLIP,
    a mixture, and the real set; run twice (the second run makes no edit)."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(5)
    bench = tmp_path / "test_bench"
    np.save(tmp_path / "id_list.npy", np.array([3, 1, 2]))
    for i in (1, 2, 3):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:44, 20:50] = 255
        _save(_image(rng, 64, 64), bench / "GT_3500" / f"{i:012d}_GT.png")
        _save(mask, bench / "Mask_bbox_3500" / f"{i:012d}_mask.png")
        _save(_image(rng, 48, 40), bench / "Ref_3500" / f"{i:012d}_ref.png")
    (tmp_path / "id_list.npy").rename(bench / "id_list.npy")
    gmm = gmm_lib.from_sklearn(GaussianMixture(2, random_state=0).fit(rng.normal(size=(40, 8))))
    (tmp_path / "gmm.npz").write_bytes(gmm.to_npz_bytes())
    out = tmp_path / "out"
    cmd = ["bash", str(ROOT / "bench" / "cocoee.sh"), str(ROOT / "checkpoints" / "synthetic"), str(bench),
           str(world["real"]), str(world["clip_dir"]), str(tmp_path / "gmm.npz"), str(out)]
    env = {**os.environ, "BATCH": "3"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (out / "results").glob("*.png")) == [f"{i:012d}.png" for i in (1, 2, 3)]
    report = json.loads((out / "table1.json").read_text())
    assert report["n"] == 3 and report["fid_clip"] is not None and report["qs"] is not None
    row = (out / "table1.md").read_text().splitlines()[2]
    assert row.startswith(f"| results | 3 | {report['fid_clip']:.2f} | {report['qs']:.2f} | {report['clip_score']:.2f} |")
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.png")}
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.png")} == stamps  # nothing redone
    assert "using the cached statistics" in second.stderr
    assert json.loads((out / "table1.json").read_text())["clip_score"] == report["clip_score"]


_FEATURES = '''
import torchvision.transforms.functional as TF
from PIL import Image

with torch.no_grad():  # as pytorch-fid's get_activations: PIL RGB, ToTensor, the network, one size per batch
    for name in ("fake", "real"):
        paths = open(f"{out}/{name}.txt").read().split()
        x = torch.stack([TF.to_tensor(Image.open(p).convert("RGB")) for p in paths])
        np.save(f"{out}/{name}.npy", net(x)[0].reshape(len(paths), -1).numpy())
'''


def test_inception_fid_equals_pytorch_fid(world, ours, tmp_path):
    """fid_inception: pytorch-fid's own network (random weights, in a subprocess, as tests/test_inception.py
    runs it) on the results and on the real set prepared as the recipe says, its Fréchet distance; against
    this implementation from the same .pth."""
    from test_inception import BUILD, _torchvision_path

    from pbe_jax.convert.inception import load_fid_inception
    from pbe_jax.eval.features import Extractor

    deps = _torchvision_path()
    if deps is None:
        pytest.skip("torchvision missing: bash tests/install_references.sh")
    fake = [world["results"] / f"{i:012d}.png" for i in GOOD]
    real = []
    for p in sorted(world["real"].iterdir()):
        if p.name != "broken.jpg":
            real.append(tmp_path / f"{p.stem}.png")
            COCO_PREPARE(Image.open(p).convert("RGB")).save(real[-1])
    (tmp_path / "fake.txt").write_text("\n".join(map(str, fake)))
    (tmp_path / "real.txt").write_text("\n".join(map(str, real)))
    (tmp_path / "reference.py").write_text(BUILD + _FEATURES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (deps, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(tmp_path / "reference.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want_fake, want_real = np.load(tmp_path / "fake.npy"), np.load(tmp_path / "real.npy")
    want = fid_reference()(want_real.mean(0), np.cov(want_real, rowvar=False), want_fake.mean(0),
                           np.cov(want_fake, rowvar=False))

    inception = Extractor(load_fid_inception(tmp_path / "pt_inception.pth"), batch_size=8)
    stats, _ = protocol.reference_stats(world["real"], {"inception": lambda x: inception(protocol.unit_range(x))},
                                        batch_size=4)
    report = protocol.evaluate(world["results"], world["bench"], clip=ours["clip"], clip_size=SIZE,
                               inception=inception, fid_stats={**ours["stats"], **stats}, batch_size=5)
    assert report["fid_inception"] == pytest.approx(want, rel=1e-3)
    assert report["fid_clip"] is not None and "fid_inception" not in report["skipped"]


_DEVICES = '''
import jax, numpy as np
from flax import nnx
from pbe_jax.eval.features import Extractor

jax.config.update("jax_default_matmul_precision", "highest")
model = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
pool = lambda m, x: m(x).mean(axis=(1, 2))  # (B, H, W, 3) -> (B, 5)
extract = Extractor(model, batch_size=6, apply=pool)
seen = []
extract._fn = (lambda fn: lambda s, x: seen.append(x.sharding) or fn(s, x))(extract._fn)
rng = np.random.default_rng(0)
images = [rng.random((4, 4, 3), np.float32) for _ in range(9)] + [rng.random((2, 6, 3), np.float32)] * 2
out = extract(images)
want = np.stack([np.asarray(pool(model, a[None]))[0] for a in images])
assert extract.batch_size == 8 and out.shape == (11, 5), (extract.batch_size, out.shape)
assert np.abs(out - want).max() < 1e-6, np.abs(out - want).max()
assert all(len(s.device_set) == 4 for s in seen) and len(seen) == 3, seen  # 9 -> 2 batches, 2 -> 1
print("ok")
'''


def test_extractor_splits_batches_over_the_local_devices():
    env = xla_env(xla_force_host_platform_device_count=4)
    proc = subprocess.run([sys.executable, "-c", _DEVICES], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]

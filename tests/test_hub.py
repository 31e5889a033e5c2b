"""Hub repositories (pbe_jax.hub), offline: huggingface_hub's listing (`HfApi.model_info`) and download
(`snapshot_download`) are replaced by a fake that serves repositories from local folders into a cache laid out
as huggingface_hub's own, and records which files were asked for. The offline fallback runs the real
huggingface_hub (HF_HUB_OFFLINE) on that cache."""
import fnmatch
import hashlib
import os
import shutil
import types

import numpy as np
import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")

from pbe_jax import hub  # noqa: E402
from pbe_jax.hub import HubError  # noqa: E402


class FakeHub:
    """Repositories served from local folders; `requests[repo_id]`: the file names each download fetched."""

    def __init__(self, cache: str):
        self.cache = cache
        self.repos: dict[str, str] = {}
        self.requests: dict[str, list[list[str]]] = {}

    def add(self, repo_id: str, folder) -> None:
        self.repos[repo_id] = os.fspath(folder)

    def files(self, repo_id: str) -> list[str]:
        root = self.repos[repo_id]
        return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                      for d, _, fs in os.walk(root) for f in fs)

    def sha(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def model_info(self, repo_id, *, revision=None, **kw):
        if repo_id not in self.repos:
            cls = huggingface_hub.errors.RepositoryNotFoundError
            e = cls.__new__(cls)  # as the real client raises it, without an HTTP response to build
            Exception.__init__(e, f"404 Client Error. Repository Not Found for url: "
                                  f"https://huggingface.co/api/models/{repo_id}")
            raise e
        return types.SimpleNamespace(sha=self.sha(repo_id), siblings=[types.SimpleNamespace(rfilename=n)
                                                                      for n in self.files(repo_id)])

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kw):
        storage = os.path.join(self.cache, "models--" + repo_id.replace("/", "--"))
        if local_files_only:
            raise AssertionError("the fake is online; the offline path runs the real huggingface_hub")
        sha = self.sha(repo_id)
        snapshot = os.path.join(storage, "snapshots", sha)
        names = [n for n in self.files(repo_id)
                 if allow_patterns is None or any(fnmatch.fnmatch(n, p) for p in allow_patterns)]
        self.requests.setdefault(repo_id, []).append(names)
        for n in names:
            os.makedirs(os.path.dirname(os.path.join(snapshot, n)), exist_ok=True)
            shutil.copyfile(os.path.join(self.repos[repo_id], n), os.path.join(snapshot, n))
        os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
        if revision != sha:  # as huggingface_hub does: a branch or tag is recorded, a commit is not
            with open(os.path.join(storage, "refs", revision or "main"), "w") as f:
                f.write(sha)
        return snapshot

    def fetched(self, repo_id: str) -> set[str]:
        return {n for names in self.requests.get(repo_id, []) for n in names}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    fake = FakeHub(os.fspath(cache))

    class Api:
        def model_info(self, repo_id, **kw):
            return fake.model_info(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.fspath(cache))
    return fake


def make_repo(root, files: dict[str, bytes | str]) -> str:
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return root


PIPELINE_CONFIGS = {"model_index.json": "{}", "unet/config.json": "{}", "vae/config.json": "{}",
                    "image_encoder/config.json": "{}", "scheduler/scheduler_config.json": "{}",
                    "feature_extractor/preprocessor_config.json": "{}"}


@pytest.fixture(scope="module")
def bin_encoder_repo(tiny_folder, tmp_path_factory):
    """The tiny "sd" pipeline with its image encoder as pytorch_model.bin only (what transformers 4 wrote
    with safe_serialization=False), plus a safety_checker/ that the pipeline does not load."""
    import safetensors.torch
    import torch

    repo = tmp_path_factory.mktemp("bin_encoder_repo") / "repo"
    shutil.copytree(tiny_folder("sd"), repo)
    enc = repo / "image_encoder"
    torch.save(safetensors.torch.load_file(enc / "model.safetensors"), enc / "pytorch_model.bin")
    (enc / "model.safetensors").unlink()
    make_repo(repo, {"safety_checker/config.json": "{}", "safety_checker/model.safetensors": b"big"})
    return repo


def test_bin_only_component_loads_like_the_local_folder(fake_hub, bin_encoder_repo, tiny_folder):
    from flax import nnx

    from pbe_jax.convert import load
    from pbe_jax.convert.weights import find_weights
    from pbe_jax.pipeline import PaintByExample

    fake_hub.add("org/pbe-bin", bin_encoder_repo)
    pipe = PaintByExample.from_pretrained("org/pbe-bin")
    got = fake_hub.fetched("org/pbe-bin")
    assert "image_encoder/pytorch_model.bin" in got and "unet/diffusion_pytorch_model.safetensors" in got
    assert "image_encoder/config.json" in got and "scheduler/scheduler_config.json" in got
    assert not any(n.startswith("safety_checker/") for n in got)  # not a component this project loads
    folder = hub.download("org/pbe-bin")  # the same snapshot; the .bin is what the loader finds
    assert find_weights(folder / "image_encoder").name == "pytorch_model.bin"

    local = load(tiny_folder("sd"))
    for name in ("unet", "vae", "image_encoder"):
        a = nnx.to_flat_state(nnx.state(getattr(local, name), nnx.Param))
        b = nnx.to_flat_state(nnx.state(getattr(pipe.models, name), nnx.Param))
        a, b = dict(a), dict(b)
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k].value), np.asarray(b[k].value), err_msg=f"{name} {k}")
    assert pipe.models.extra_configs == local.extra_configs


def test_safetensors_preferred_never_both(fake_hub, tmp_path):
    files = {**PIPELINE_CONFIGS,
             "unet/diffusion_pytorch_model.safetensors": b"st", "unet/diffusion_pytorch_model.bin": b"pt",
             "unet/diffusion_pytorch_model.msgpack": b"flax", "unet/diffusion_pytorch_model.non_ema.bin": b"x",
             "vae/diffusion_pytorch_model.bin.index.json": "{}",
             "vae/diffusion_pytorch_model-00001-of-00002.bin": b"1",
             "vae/diffusion_pytorch_model-00002-of-00002.bin": b"2",
             "image_encoder/model.safetensors.index.json": "{}",
             "image_encoder/model-00001-of-00002.safetensors": b"1",
             "image_encoder/model-00002-of-00002.safetensors": b"2",
             "image_encoder/pytorch_model.bin.index.json": "{}",
             "image_encoder/pytorch_model-00001-of-00002.bin": b"1",
             "image_encoder/pytorch_model-00002-of-00002.bin": b"2",
             "v1-5-pruned.ckpt": b"single-file copy", "README.md": "# card", "unet/sample.png": b"png"}
    fake_hub.add("org/both", make_repo(tmp_path / "repo", files))
    folder = hub.download("org/both")
    assert fake_hub.requests["org/both"] == [sorted([
        "model_index.json", "unet/config.json", "vae/config.json", "image_encoder/config.json",
        "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin.index.json", "vae/diffusion_pytorch_model-00001-of-00002.bin",
        "vae/diffusion_pytorch_model-00002-of-00002.bin",
        "image_encoder/model.safetensors.index.json", "image_encoder/model-00001-of-00002.safetensors",
        "image_encoder/model-00002-of-00002.safetensors"])]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"st"
    assert not (folder / "unet" / "diffusion_pytorch_model.bin").exists()


def test_variant(fake_hub, tmp_path):
    files = {**PIPELINE_CONFIGS,
             "unet/diffusion_pytorch_model.safetensors": b"32", "unet/diffusion_pytorch_model.fp16.safetensors": b"16",
             "vae/diffusion_pytorch_model.bin": b"32",  # no fp16 here: the plain file, as diffusers does
             "image_encoder/model.safetensors.index.fp16.json": "{}",  # diffusers/transformers' spelling
             "image_encoder/model-00001-of-00002.fp16.safetensors": b"1",
             "image_encoder/model-00002-of-00002.fp16.safetensors": b"2",
             "image_encoder/model.safetensors": b"32", "image_encoder/pytorch_model.fp16.bin": b"16"}
    fake_hub.add("org/variant", make_repo(tmp_path / "repo", files))
    hub.download("org/variant", variant="fp16")
    weights = sorted(n for n in fake_hub.requests["org/variant"][-1] if hub.weight_kind(n))
    assert weights == ["image_encoder/model-00001-of-00002.fp16.safetensors",
                       "image_encoder/model-00002-of-00002.fp16.safetensors",
                       "image_encoder/model.safetensors.index.fp16.json",
                       "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin"]
    hub.download("org/variant")
    weights = sorted(n for n in fake_hub.requests["org/variant"][-1] if hub.weight_kind(n))
    assert weights == ["image_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.bin"]


@pytest.mark.parametrize("name,kind", [
    ("diffusion_pytorch_model.safetensors", ("diffusion_pytorch_model", "safetensors", None)),
    ("unet/diffusion_pytorch_model.fp16.safetensors", ("diffusion_pytorch_model", "safetensors", "fp16")),
    ("model.safetensors.index.fp16.json", ("model", "safetensors", "fp16")),
    ("model.fp16.safetensors.index.json", ("model", "safetensors", "fp16")),
    ("pytorch_model.fp16-00001-of-00002.bin", ("pytorch_model", "bin", "fp16")),
    ("pytorch_model.bin.index.json", ("pytorch_model", "bin", None)),
    ("params.safetensors", ("params", "safetensors", None)),
    ("config.json", None), ("model.ckpt", None), ("flax_model.msgpack", None), ("notes.bin.txt", None)])
def test_weight_kind(name, kind):
    assert hub.weight_kind(name) == kind


def test_single_file(fake_hub, tmp_path):
    fake_hub.add("org/original", make_repo(tmp_path / "a", {"model.ckpt": b"ckpt", "README.md": "x",
                                                            "v1-inference.yaml": "y"}))
    path = hub.download("org/original")
    assert path.name == "model.ckpt" and path.read_bytes() == b"ckpt"
    assert fake_hub.requests["org/original"] == [["model.ckpt"]]

    sd15 = {n: n.encode() for n in ("v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
                                    "v1-5-pruned-emaonly.safetensors")}
    fake_hub.add("org/sd15", make_repo(tmp_path / "b", sd15))
    assert hub.download("org/sd15").name == "v1-5-pruned-emaonly.safetensors"
    assert fake_hub.requests["org/sd15"] == [["v1-5-pruned-emaonly.safetensors"]]

    fake_hub.add("org/ema", make_repo(tmp_path / "c", {"model-non_ema.safetensors": b"", "model-ema.safetensors": b""}))
    assert hub.download("org/ema").name == "model-ema.safetensors"

    fake_hub.add("org/two", make_repo(tmp_path / "d", {"a.safetensors": b"", "b.safetensors": b"", "c.ckpt": b""}))
    with pytest.raises(HubError, match=r"org/two: .*several.*a\.safetensors, b\.safetensors.*c\.ckpt"):
        hub.download("org/two")
    assert "org/two" not in fake_hub.requests  # nothing downloaded


def test_component_repository(fake_hub, tmp_path):
    fake_hub.add("org/unet", make_repo(tmp_path / "r", {"config.json": "{}", "diffusion_pytorch_model.bin": b"pt",
                                                         "diffusion_pytorch_model.fp16.bin": b"16"}))
    folder = hub.download("org/unet")
    assert fake_hub.requests["org/unet"] == [["config.json", "diffusion_pytorch_model.bin"]]
    assert folder.is_dir()


def test_nothing_loadable(fake_hub, tmp_path):
    fake_hub.add("org/flax", make_repo(tmp_path / "a", {**PIPELINE_CONFIGS, "unet/diffusion_pytorch_model.msgpack": b"",
                                                         "vae/diffusion_pytorch_model.safetensors": b"",
                                                         "image_encoder/model.safetensors": b""}))
    with pytest.raises(HubError, match=r"org/flax: .*unet/ has no weights this project reads.*msgpack"):
        hub.download("org/flax")
    fake_hub.add("org/fp16", make_repo(tmp_path / "b", {**PIPELINE_CONFIGS,
                                                         "unet/diffusion_pytorch_model.fp16.safetensors": b""}))
    with pytest.raises(HubError, match=r"org/fp16: .*unet/ has weights only as variant\(s\) fp16.*variant='fp16'"):
        hub.download("org/fp16")
    fake_hub.add("org/card", make_repo(tmp_path / "c", {"README.md": "x", "model.onnx": b""}))
    with pytest.raises(HubError, match=r"org/card: nothing this project can load.*README\.md, model\.onnx"):
        hub.download("org/card")
    assert not fake_hub.requests


def test_unknown_repository_and_names(fake_hub, tmp_path):
    from pbe_jax.pipeline import resolve_pretrained

    with pytest.raises(HubError, match=r"^org/missing: no such repository on the Hub.*log"):
        hub.download("org/missing")
    with pytest.raises(FileNotFoundError, match=r"^org/missing: no such local folder; as a Hub repository: "
                                                r"no such repository"):
        resolve_pretrained("org/missing")
    with pytest.raises(FileNotFoundError, match="not a Hub repository id"):
        resolve_pretrained("no-such-folder")
    assert resolve_pretrained(tmp_path) == tmp_path  # local folders and gs:// as they are
    assert str(resolve_pretrained("gs://bucket/model")) == "gs://bucket/model"
    assert not fake_hub.requests


def test_offline_uses_the_cache(fake_hub, tmp_path, monkeypatch):
    """The real huggingface_hub with HF_HUB_OFFLINE: a repository downloaded before comes from the cache (the
    same selection rules), one never downloaded is an error that says so."""
    files = {**PIPELINE_CONFIGS, "unet/diffusion_pytorch_model.safetensors": b"st",
             "unet/diffusion_pytorch_model.bin": b"pt", "vae/diffusion_pytorch_model.bin": b"pt",
             "image_encoder/model.safetensors": b"st"}
    fake_hub.add("org/cached", make_repo(tmp_path / "repo", files))
    online = hub.download("org/cached")
    fake_hub.add("org/single", make_repo(tmp_path / "single", {"model.ckpt": b"ckpt"}))
    hub.download("org/single")

    monkeypatch.undo()  # the real huggingface_hub from here on, offline, on the cache the fake filled
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", fake_hub.cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.download("org/cached") == online
    assert hub.download("org/single").read_bytes() == b"ckpt"
    (online / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # a cached snapshot lacking weights
    with pytest.raises(HubError, match=r"^org/cached: cannot reach the Hugging Face Hub \(OfflineModeIsEnabled.*"
                                       r"not enough: .*unet/ has no weights"):
        hub.download("org/cached")
    with pytest.raises(HubError, match=r"^org/never: cannot reach the Hugging Face Hub \(OfflineModeIsEnabled.*"
                                       r"not in the local cache"):
        hub.download("org/never")


def test_a_single_file_repository_loads_through_from_pretrained(fake_hub, tiny_folder, tmp_path):
    """A repository that holds one file in the original release's layout (plus a model card) opens with
    `PaintByExample.from_pretrained("org/name")`, with the weights of the folder it was exported from."""
    from pbe_jax.convert import load, mapping
    from pbe_jax.convert.ldm_file import save_ldm
    from pbe_jax.pipeline import PaintByExample

    models = load(tiny_folder("sd"))
    repo = make_repo(tmp_path / "single", {"README.md": "# card"})
    save_ldm(models, tmp_path / "single" / "model.safetensors")
    fake_hub.add("org/pbe-single", repo)
    pipe = PaintByExample.from_pretrained("org/pbe-single", dtype="float32")
    assert fake_hub.fetched("org/pbe-single") == {"model.safetensors"}
    want, got = mapping.module_params(models.unet), mapping.module_params(pipe.models.unet)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)

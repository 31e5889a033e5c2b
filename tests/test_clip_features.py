"""CLIP image features (`image_embeds`, with the visual projection) from transformers CLIPModel and
CLIPVisionModelWithProjection folders: equal to transformers' in float32, close to it in float16/bfloat16,
and a folder without the projection refused."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbe_jax.convert.weights import WeightsError
from pbe_jax.eval import clip
from pbe_jax.eval.features import Extractor
from pbe_jax.models import CLIPVisionModelWithProjection

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 32, "width": 32},
                "size": {"shortest_edge": 32}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _embeds(out) -> np.ndarray:
    """get_image_features is a tensor in transformers 4 and an output with the projection as pooler_output in 5."""
    if not isinstance(out, torch.Tensor):
        out = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
    return out.detach().numpy()


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """({name: (folder, transformers' features of PIXELS)}, PIXELS (NHWC)): a CLIPModel (safetensors, with a
    preprocessor config; projection_dim only at the top level), a CLIPVisionModelWithProjection (.bin)."""
    root = tmp_path_factory.mktemp("clip")
    pixels = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=transformers.CLIPTextConfig(**TEXT).to_dict(),
                                  vision_config=transformers.CLIPVisionConfig(**VISION).to_dict(), projection_dim=16)
    full = transformers.CLIPModel(cfg).eval()
    full.save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VISION, projection_dim=12))
    vision.eval().save_pretrained(root / "vision", safe_serialization=False)
    if not (root / "vision" / "pytorch_model.bin").is_file():  # transformers 5 writes safetensors regardless
        torch.save(vision.state_dict(), root / "vision" / "pytorch_model.bin")
        (root / "vision" / "model.safetensors").unlink()
    with torch.no_grad():
        out = {"clip": (root / "clip", _embeds(full.get_image_features(pixel_values=x))),
               "vision": (root / "vision", _embeds(vision(pixel_values=x)))}
    assert (root / "vision" / "pytorch_model.bin").is_file() and (root / "clip" / "model.safetensors").is_file()
    return out, pixels


@pytest.fixture(scope="module")
def loaded(clip_folders):
    """(model, preprocessor config) per (folder name, dtype), loaded once."""
    cache = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = clip.load_image_features(clip_folders[0][name][0], dtype=dtype)
        return cache[name, dtype]

    return get


def _features(model, pixels) -> np.ndarray:
    return Extractor(model, batch_size=len(pixels))(np.asarray(pixels))


@pytest.mark.parametrize("name,dim", [("clip", 16), ("vision", 12)])
def test_float32_features_equal_transformers(clip_folders, loaded, name, dim):
    folders, pixels = clip_folders
    model, fe = loaded(name)
    assert isinstance(model, CLIPVisionModelWithProjection) and model.config.projection_dim == dim
    assert fe == (PREPROCESSOR if name == "clip" else None)
    expected = folders[name][1]
    ours = _features(model, pixels)
    assert ours.shape == expected.shape == (3, dim) and ours.dtype == np.float32
    scale = np.abs(expected).max()
    assert scale > 0.1 and np.abs(expected[0] - expected[1]).max() > 0.1 * scale  # not trivial, not constant
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * scale)  # measured: 3e-7 × scale


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_features_close_to_float32(clip_folders, loaded, dtype):
    folders, pixels = clip_folders
    model, _ = loaded("clip", dtype)
    leaves = [v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert leaves and all(d == jnp.dtype(dtype) for d in leaves)
    ours = _features(model, pixels)
    expected = folders["clip"][1]
    assert ours.dtype == np.float32
    cos = np.sum(ours * expected, -1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert np.all(cos > 0.999), cos
    assert np.abs(ours - expected).max() > 1e-4 * np.abs(expected).max()  # really computed in half precision


def test_folder_without_projection_is_refused(tmp_path):
    from pbe_jax.convert.diffusers import save_component
    from pbe_jax.convert.init import random_module
    from pbe_jax.models import CLIPVisionConfig, PaintByExampleImageEncoder

    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).save_pretrained(tmp_path / "tower")
    encoder = random_module(PaintByExampleImageEncoder, CLIPVisionConfig(**VISION, projection_dim=16))
    save_component(encoder, tmp_path / "pbe" / "image_encoder", "image_encoder", format="diffusers")
    for folder in (tmp_path / "tower", tmp_path / "pbe", tmp_path / "pbe" / "image_encoder"):
        with pytest.raises(WeightsError, match="visual projection is missing") as e:
            clip.load_image_features(folder)
        assert str(folder) in str(e.value)
    # Read from the weights, not the config: a Paint-by-Example encoder's weights under a CLIP config.
    (tmp_path / "pbe" / "image_encoder" / "config.json").write_text(json.dumps(VISION))
    with pytest.raises(WeightsError, match="model.safetensors has no visual_projection.weight.*Paint-by-Example"):
        clip.load_image_features(tmp_path / "pbe" / "image_encoder")


def test_bad_weights_and_dtype_are_named(clip_folders, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    src = clip_folders[0]["clip"][0]
    shutil.copytree(src, tmp_path / "clip")
    state = load_file(str(src / "model.safetensors"))
    # Older transformers saved the position_ids buffers: skipped, like the text side.
    for tower, n in (("vision", 17), ("text", 16)):
        state[f"{tower}_model.embeddings.position_ids"] = np.arange(n)[None]
    save_file(state, str(tmp_path / "clip" / "model.safetensors"))
    assert clip.load_image_features(tmp_path / "clip")[0].config.projection_dim == 16
    state["vision_model.extra.weight"] = np.zeros(3, np.float32)
    state["visual_projection.weight"] = state["visual_projection.weight"][:, :8]
    save_file(state, str(tmp_path / "clip" / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        clip.load_image_features(tmp_path / "clip")
    msg = str(e.value)
    assert "model.safetensors" in msg and "unexpected vision_model.extra.weight" in msg
    assert "visual_projection.weight: shape (16, 8) in the weights, (16, 32) in the model" in msg
    with pytest.raises(ValueError, match="float64"):
        clip.load_image_features(src, dtype="float64")

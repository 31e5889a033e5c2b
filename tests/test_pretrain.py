"""Pretraining the small frozen networks: the VAE and the attribute-supervised vision tower learn, and their
exports are the components Paint-by-Example training starts from."""
import numpy as np
import pytest

from pbe_jax.convert import load_component
from pbe_jax.train import config as config_lib
from pbe_jax.train import pretrain

SMALL = ["data.image_size=32", "data.scene_size=64", "data.batch_size=8", "data.size=200", "optim.lr=2e-3",
         "log_every=5", "model.vae.block_out_channels=[16, 32, 32]", "model.vae.norm_num_groups=8",
         "model.image_encoder.hidden_size=32", "model.image_encoder.intermediate_size=64",
         "model.image_encoder.image_size=16", "model.image_encoder.patch_size=4",
         "model.image_encoder.num_hidden_layers=2"]


def run(mode, steps, tmp_path, *extra):
    cfg = config_lib.override(config_lib.load("synthetic"), SMALL + [f"mode={mode}", f"steps={steps}", *extra])
    logs = []
    out = (pretrain.train_vae if mode == "vae" else pretrain.train_tower)(cfg, tmp_path, lambda s, m: logs.append(m))
    return out, logs


def test_vae_learns_to_reconstruct_and_exports(tmp_path):
    out, logs = run("vae", 60, tmp_path)
    assert logs[-1]["l1"] < 0.85 * logs[0]["l1"], (logs[0], logs[-1])
    vae = load_component(out, "vae")
    assert vae.config.block_out_channels == (16, 32, 32)
    # The exported scaling factor makes the diffusion latents of unit variance, as SD's 0.18215 does for its VAE.
    x = next(pretrain.scene_batches(32, 64, 16, 5, 200))
    assert np.asarray(vae.scale(vae.encode(x).mean)).std() == pytest.approx(1.0, abs=0.2)
    assert vae.config.scaling_factor != 0.18215


def test_tower_learns_attributes_and_exports_an_image_encoder(tmp_path):
    out, logs = run("tower", 60, tmp_path, "data.batch_size=32")
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"], (logs[0], logs[-1])
    assert logs[-1]["acc_colour"] > 1 / 8 + 0.15  # colour is the easiest attribute: well above chance
    encoder = load_component(out, "image_encoder")
    x = np.zeros((2, 16, 16, 3), np.float32)
    assert encoder(x).shape == (2, 1, 64)


def test_object_crops_are_labelled_and_varied():
    rng = np.random.default_rng(0)
    crops, labels = zip(*(pretrain.object_crop(rng, 24) for _ in range(20)))
    assert all(c.shape == (24, 24, 3) and c.dtype == np.uint8 for c in crops)
    assert len(set(labels)) > 10
    assert not np.array_equal(crops[0], crops[1])


def test_tower_positions_start_from_a_sine_cosine_table():
    table = pretrain.sincos_positions(4, 32)
    assert table.shape == (17, 32) and not table[0].any()  # the class token's row
    assert len({row.tobytes() for row in table[1:]}) == 16  # every patch position coded differently
    # Patches in the same row share the row half of the code; in the same column, the column half.
    np.testing.assert_array_equal(table[1, :16], table[2, :16])
    np.testing.assert_array_equal(table[1, 16:], table[5, 16:])
    from flax import nnx

    from pbe_jax.models import CLIPVisionConfig
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                           image_size=16, patch_size=4)
    model = pretrain.TowerClassifier(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.tower.vision_model.embeddings.position_embedding.embedding[...], table)

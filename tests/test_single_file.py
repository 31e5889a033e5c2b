"""Single-file checkpoints of the original code base (pbe_jax.convert.single_file): the conditioning part of
the Paint-by-Example `model.ckpt` against diffusers' own converter, layout recognition, EMA selection and
the files that must be refused."""
import sys
import types

import numpy as np
import pytest

from pbe_jax.convert import single_file as sf
from pbe_jax.convert.weights import WeightsError, save_safetensors
from pbe_jax.parity.reference import TINY

torch = pytest.importorskip("torch")


class Evil:  # any class outside torch's allow-list: weights_only must refuse to construct it
    pass


def _encoder(name: str, seed: int = 0):
    from transformers import CLIPVisionConfig

    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    torch.manual_seed(seed)
    enc = PaintByExampleImageEncoder(CLIPVisionConfig(**TINY[name]["image_encoder"]))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc, {k: v.detach().numpy().copy() for k, v in enc.state_dict().items()}


@pytest.fixture(scope="module", params=["sd", "alt"])
def tiny(request):
    enc, state = _encoder(request.param)
    return request.param, enc, state


def _canon(key: str) -> str:
    # transformers 5 names the CLIP tower model.* in the encoder's state dict, 4 (and the release) model.vision_model.*
    return "model.vision_model." + key[6:] if key.startswith("model.") and "vision_model" not in key else key


def _same(a: dict, b: dict):
    a, b = {_canon(k): v for k, v in a.items()}, {_canon(k): v for k, v in b.items()}
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def _unet_keys(channels: int, context: int = 768) -> dict:
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    return {sf.CONV_IN: z(320, channels, 3, 3), sf.UNET + "input_blocks.0.0.bias": z(320),
            sf.UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(320, context),
            "first_stage_model.encoder.conv_in.weight": z(128, 3, 3, 3), "betas": z(1000),
            "alphas_cumprod": z(1000)}


def test_to_ldm_then_diffusers_converter_gives_the_encoder_back(tiny, monkeypatch):
    """Our writer's names are the original's: diffusers' own converter, independent of this port, rebuilds the
    very encoder they came from; and our reader gives what diffusers' converter gives, bit for bit."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from diffusers.pipelines.stable_diffusion import convert_from_ckpt

    name, enc, state = tiny
    ldm = sf.image_encoder_to_ldm(state)
    assert {k.split(".")[0] for k in ldm} == {"cond_stage_model", "proj_out", "learnable_vector"}
    assert all(k.startswith((sf.VISION, sf.MAPPER, sf.FINAL_LN, "proj_out.", "learnable_vector")) for k in ldm)
    blocks = (TINY[name]["image_encoder"]["num_hidden_layers"] + 1) // 5
    assert {k for k in ldm if ".c_qkv." in k} == {f"{sf.MAPPER}{i}.attn.c_qkv.{w}" for i in range(blocks)
                                                  for w in ("weight", "bias")}
    checkpoint = {k: torch.from_numpy(v.copy()) for k, v in {**_unet_keys(9), **ldm}.items()}
    tiny_config = CLIPVisionConfig(**TINY[name]["image_encoder"])
    if not hasattr(CLIPVisionModel(tiny_config), "vision_model"):
        # transformers 5's CLIPVisionModel has no vision_model level, and diffusers' converter hands it the keys
        # after cond_stage_model.transformer. as they are: give it the names it can load
        checkpoint = {k.replace(sf.VISION, "cond_stage_model.transformer."): v for k, v in checkpoint.items()}
    monkeypatch.setattr(convert_from_ckpt, "CLIPVisionConfig",
                        types.SimpleNamespace(from_pretrained=lambda *a, **k: tiny_config))
    model = convert_from_ckpt.convert_paint_by_example_checkpoint(dict(checkpoint), local_files_only=True)
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    _same(theirs, state)
    _same(sf.image_encoder_from_ldm({**_unet_keys(9), **ldm}), theirs)


def test_round_trips_are_exact(tiny):
    name, _, state = tiny
    ldm = sf.image_encoder_to_ldm(state)
    _same(sf.image_encoder_from_ldm(ldm), state)
    _same(sf.image_encoder_to_ldm(sf.image_encoder_from_ldm(ldm)), ldm)
    # the tower as model.vision_model.* (transformers 4, the release) or model.* (transformers 5); position_ids
    # (older files) are dropped
    v4 = {_canon(k): v for k, v in state.items()}
    v5 = {("model." + k[len("model.vision_model."):] if k.startswith("model.vision_model.") else k): v
          for k, v in v4.items()}
    assert sorted(v4) != sorted(v5)
    for s in (v4, v5):
        _same(sf.image_encoder_to_ldm(s), ldm)
        assert all(k == _canon(k) for k in sf.image_encoder_from_ldm(ldm))
    with_ids = {**ldm, sf.VISION + "embeddings.position_ids": np.arange(17)[None]}
    _same(sf.image_encoder_from_ldm(with_ids), state)
    with pytest.raises(WeightsError, match="mapper.blocks.0.attn1.to_v"):
        sf.image_encoder_to_ldm({k: v for k, v in state.items() if k != "mapper.blocks.0.attn1.to_v.bias"})


def test_config_from_tensors_and_the_jax_encoder_round_trip(tiny):
    from pbe_jax.convert import mapping
    from pbe_jax.convert.diffusers import from_state_dict

    name, _, state = tiny
    want = TINY[name]["image_encoder"]
    ldm = sf.image_encoder_to_ldm(state)
    extra = {k: want[k] for k in ("hidden_act", "layer_norm_eps") if k in want}
    cfg = sf.image_encoder_config_from_ldm(ldm, num_attention_heads=want["num_attention_heads"], **extra)
    assert {k: cfg[k] for k in want} == want
    assert sf.image_encoder_config_from_ldm(state, num_attention_heads=want["num_attention_heads"],
                                            **extra) == cfg  # diffusers' names too
    with pytest.raises(WeightsError, match="num_attention_heads"):  # 40 and 30 are not divisible by 16
        sf.image_encoder_config_from_ldm(ldm)
    module = from_state_dict("image_encoder", cfg, sf.image_encoder_from_ldm(ldm), source="tiny")
    _same(sf.image_encoder_to_ldm(mapping.to_torch(module)), ldm)


def test_config_defaults_to_vit_l14():
    one = np.broadcast_to(np.float32(0), (1,))  # shapes only: no memory
    sd = {sf.VISION + "embeddings.patch_embedding.weight": np.broadcast_to(one, (1024, 3, 14, 14)),
          sf.VISION + "embeddings.position_embedding.weight": np.broadcast_to(one, (257, 1024)),
          "proj_out.weight": np.broadcast_to(one, (768, 1024))}
    sd.update({f"{sf.VISION}encoder.layers.{i}.mlp.fc1.weight": np.broadcast_to(one, (4096, 1024))
               for i in range(24)})
    sd.update({f"{sf.MAPPER}{i}.ln_1.weight": one for i in range(5)})
    cfg = sf.image_encoder_config_from_ldm(sd)
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                "image_size", "patch_size", "hidden_act", "layer_norm_eps", "projection_dim")} == \
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
             image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
    del sd[f"{sf.MAPPER}4.ln_1.weight"]
    with pytest.raises(WeightsError, match="4 mapper blocks beside 24 CLIP layers"):
        sf.image_encoder_config_from_ldm(sd)


def test_c_qkv_split_and_merge_by_hand():
    w, b = np.arange(36, dtype=np.float32).reshape(12, 3), np.arange(12, dtype=np.float32)
    sd = {sf.VISION + "embeddings.patch_embedding.weight": np.zeros((4, 3, 2, 2), np.float32),
          sf.MAPPER + "0.attn.c_qkv.weight": w, sf.MAPPER + "0.attn.c_qkv.bias": b,
          sf.FINAL_LN + "weight": np.ones(4, np.float32), "proj_out.weight": np.ones((2, 4), np.float32),
          "learnable_vector": np.ones((1, 1, 2), np.float32)}
    out = sf.image_encoder_from_ldm(sd)
    for i, q in enumerate(("to_q", "to_k", "to_v")):
        np.testing.assert_array_equal(out[f"mapper.blocks.0.attn1.{q}.weight"], w[4 * i:4 * i + 4])
        np.testing.assert_array_equal(out[f"mapper.blocks.0.attn1.{q}.bias"], b[4 * i:4 * i + 4])
    assert out["uncond_vector"].shape == (1, 1, 2) and "final_layer_norm.weight" in out
    _same(sf.image_encoder_to_ldm(out), sd)
    with pytest.raises(WeightsError, match="not q, k and v"):
        sf.image_encoder_from_ldm({**sd, sf.MAPPER + "0.attn.c_qkv.bias": np.zeros(10)})
    with pytest.raises(WeightsError, match="learnable_vector"):
        sf.image_encoder_from_ldm({k: v for k, v in sd.items() if k != "learnable_vector"})


def test_select_ema():
    r = np.random.default_rng(0)
    plain = {"model.diffusion_model.input_blocks.0.0.weight": r.normal(size=(4, 9, 3, 3)),
             "model.diffusion_model.out.2.bias": r.normal(size=4), "first_stage_model.x": r.normal(size=2),
             "proj_out.weight": r.normal(size=(3, 2))}
    ema = {"model_ema.diffusion_modelinput_blocks00weight": r.normal(size=(4, 9, 3, 3)),
           "model_ema.diffusion_modelout2bias": r.normal(size=4),
           "model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int32(7)}
    assert sf.ema_name("model.diffusion_model.input_blocks.0.0.weight") == \
        "model_ema.diffusion_modelinput_blocks00weight"
    got = sf.select_ema({**plain, **ema})
    assert got.ema_used and sorted(got) == sorted(plain)
    assert got["model.diffusion_model.input_blocks.0.0.weight"] is ema["model_ema.diffusion_modelinput_blocks00weight"]
    assert got["model.diffusion_model.out.2.bias"] is ema["model_ema.diffusion_modelout2bias"]
    assert got["first_stage_model.x"] is plain["first_stage_model.x"]
    for got in (sf.select_ema({**plain, **ema}, ema=False), sf.select_ema(plain)):
        assert not got.ema_used and sorted(got) == sorted(plain)
        assert all(got[k] is plain[k] for k in plain)
    with pytest.raises(WeightsError, match="model_ema.diffusion_modelout2bias"):
        sf.select_ema({**plain, **ema, "model_ema.diffusion_modelout2bias": np.zeros(5)})


def test_detect():
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    pbe = {**_unet_keys(9), sf.VISION + "embeddings.patch_embedding.weight": z(8, 3, 2, 2),
           sf.MAPPER + "0.attn.c_qkv.weight": z(24, 8), "learnable_vector": z(1, 1, 4)}
    text = {sf.TEXT + "embeddings.token_embedding.weight": z(10, 8)}
    assert sf.detect(pbe) == "pbe"
    assert sf.detect({**_unet_keys(4), **text}) == "sd1"
    cases = {"SD 2.x.*attn2.to_k.weight": {**_unet_keys(4, context=1024)},
             "SD 2.x.*cond_stage_model.model.transformer": {**_unet_keys(4), "cond_stage_model.model.transformer"
                                                            ".resblocks.0.ln_1.weight": z(4)},
             "SDXL.*conditioner.embedders.0": {**_unet_keys(4, 2048), "conditioner.embedders.0.x": z(1)},
             "SDXL.*label_emb": {**_unet_keys(4), sf.UNET + "label_emb.0.0.weight": z(4, 4)},
             "SD v1 inpainting.*text_model": {**_unet_keys(9), **text},
             r"not a Stable Diffusion / Paint-by-Example checkpoint \(no model.diffusion_model": {"a.weight": z(2)},
             "not a Stable Diffusion.*8 input channels": {**_unet_keys(8), **text}}
    for pattern, sd in cases.items():
        with pytest.raises(WeightsError, match=pattern):
            sf.detect(sd)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_read_nested_lightning_checkpoint(tmp_path, monkeypatch, zip_format):
    """A Lightning file: weights under state_dict twice, epoch/optimizer entries beside them, and Lightning's
    ModelCheckpoint class pickled as a callbacks key (read as an inert stand-in, never imported)."""
    _, state = _encoder("sd")
    ldm = {**_unet_keys(9), **sf.image_encoder_to_ldm(state),
           sf.VISION + "embeddings.position_ids": np.arange(17, dtype=np.int64)[None],
           "model_ema.diffusion_modelinput_blocks00weight": np.ones((320, 9, 3, 3), np.float32),
           "model_ema.num_updates": np.array(3, np.int32)}
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    path = tmp_path / "model.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "callbacks": {ModelCheckpoint: {"best_k_models": {}}},
                "state_dict": {"state_dict": {k: torch.from_numpy(v) for k, v in ldm.items()}}}, path,
               _use_new_zipfile_serialization=zip_format)
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    sd = sf.read_state_dict(path)
    _same(sd, ldm)
    assert sf.detect(sd) == "pbe"
    weights = sf.select_ema(sd)
    assert weights.ema_used and not any(k.startswith("model_ema.") for k in weights)
    assert np.all(weights[sf.CONV_IN] == 1)
    _same(sf.image_encoder_from_ldm(weights), state)
    save_safetensors(ldm, tmp_path / "model.safetensors")  # 0-d arrays (num_updates) stay 0-d
    _same(sf.read_state_dict(tmp_path / "model.safetensors"), ldm)


def test_bad_files_are_refused_by_name(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"a": torch.ones(64, 64)}}, good)
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[:len(data) // 2])
    torch.save({"state_dict": {"a": torch.ones(2)}, "hparams": Evil()}, tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"a": torch.ones(2)}, "hparams": Evil()}, tmp_path / "evil_legacy.ckpt",
               _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {"epoch": 3}, "note": "x"}, tmp_path / "empty.pt")
    save_safetensors({"a": np.ones((64, 64), np.float32)}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle at all")
    cases = {"truncated.ckpt": "zip archive.*truncated", "evil.ckpt": r"refusing to load.*test_single_file\.Evil",
             "evil_legacy.ckpt": r"refusing to load.*test_single_file\.Evil", "empty.pt": "no tensors", "truncated.safetensors": "truncated", "garbage.pth": "cannot read",
             "missing.ckpt": "no such file"}
    for name, pattern in cases.items():
        with pytest.raises(WeightsError, match=pattern) as e:
            sf.read_state_dict(tmp_path / name)
        assert str(tmp_path / name) in str(e.value), e.value
    np.testing.assert_array_equal(sf.read_state_dict(good)["a"], np.ones((64, 64), np.float32))

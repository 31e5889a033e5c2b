"""The training step against the PyTorch reference of the original release's step (pbe_jax.compare_train) on
tiny random models: one step's loss, gradients and AdamW update, and a 100-step loss curve with warm-up and
clipping."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_one_step_through_the_cli(tiny_folder, capsys):
    from pbe_jax import compare

    code = compare.main(["--train", "--diffusers", str(tiny_folder("sd")), "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    one = report["one_step"]
    assert code == 0 and report["ok"]
    assert one["loss_rel"] < 1e-5 and one["grad_rel_max"] < 1e-4 and one["update_rel_max"] < 1e-3
    assert one["tensors"] > 300 and not one["missing"]
    assert not one["frozen_with_grad_torch"] and not one["frozen_in_jax_grads"]
    # exactly zero in exact arithmetic: queries, keys (and the LayerNorm before them) of one-token attention
    assert one["zero_grad_tensors"] and all(("attn2" in k and ("to_q" in k or "to_k" in k)) or "norm2" in k
                                            or ("mapper" in k and ("to_q" in k or "to_k" in k))
                                            for k in one["zero_grad_tensors"])


def test_a_hundred_steps_with_warmup_and_clipping(tiny_folder, tmp_path):
    import jax

    from pbe_jax import compare_train, reference
    from pbe_jax.convert import load

    jax.config.update("jax_default_matmul_precision", "highest")
    folder = tiny_folder("sd")
    settings = compare_train.Settings(lr=3e-4, warmup_steps=10, clip_norm=1.0)
    report = compare_train.run(reference.load_torch(folder), load(folder), settings=settings, steps=100)
    c = report["curve"]
    assert report["ok"], compare_train.format_report(report)
    assert report["one_step"]["update_rel_max"] is None  # the first step's lr × 1e-6 moves no float32 weight
    assert c["loss_rel_max"] <= 1e-3 and len(c["loss_jax"]) == 100
    assert c["param_travelled"] > 0 and c["param_distance_rel"] < 1e-2
    compare_train.plot(report, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 10_000

"""The training step against the PyTorch reference of the original release's step (pbe_jax.parity.train) on
tiny random models: one step's loss, gradients and AdamW update, and a 100-step loss curve with warm-up and
clipping."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_one_step_through_the_cli(tiny_folder, capsys):
    from pbe_jax.parity import compare

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

    from pbe_jax.convert import load
    from pbe_jax.parity import reference, train

    jax.config.update("jax_default_matmul_precision", "highest")
    folder = tiny_folder("sd")
    settings = train.Settings(lr=3e-4, warmup_steps=10, clip_norm=1.0)
    report = train.run(reference.load_torch(folder), load(folder), settings=settings, steps=100)
    c = report["curve"]
    assert report["ok"], train.format_report(report)
    assert report["one_step"]["update_rel_max"] is None  # the first step's lr × 1e-6 moves no float32 weight
    assert c["loss_rel_max"] <= 1e-3 and len(c["loss_jax"]) == 100
    assert c["param_travelled"] > 0 and c["param_distance_rel"] < 1e-2
    train.plot(report, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def _invert_mask(reference):
    loss = reference.TrainingReference.loss
    return "loss", lambda self, image, d: loss(self, image, {**d, "edit": 1.0 - d["edit"]})


def _scale_twice(reference):
    latent = reference.TrainingReference._latent
    return "_latent", lambda self, x, noise: self.vae.config.scaling_factor * latent(self, x, noise)


def _shift_timestep(reference):
    loss = reference.TrainingReference.loss
    return "loss", lambda self, image, d: loss(self, image, {**d, "t": d["t"] + 1})


def _drop_ignored(reference):
    loss = reference.TrainingReference.loss
    return "loss", lambda self, image, d: loss(self, image, {**d, "drop": d["drop"] & False})


MUTATIONS = {"mask inverted": _invert_mask, "latent scaled twice": _scale_twice,
             "timestep shifted by one": _shift_timestep, "uncond vector never used": _drop_ignored}


def test_a_wrong_convention_on_one_side_fails(tiny_folder, monkeypatch):
    """The harness's power: each mistake the issue names, made on the reference's side only, fails the
    comparison that passes without it (the JAX side computed once, the reference once per mistake). Measured
    (tiny 'sd'): loss rel 5e-2 / 4e-3 / 6e-4 / 8e-3 and worst gradient rel 1.2 / 0.58 / 0.33 / 1.6 for the four,
    against 1.6e-7 and 2.7e-6 without a mistake."""
    import jax

    from pbe_jax.convert import load
    from pbe_jax.parity import reference, train as ct

    jax.config.update("jax_default_matmul_precision", "highest")
    folder = tiny_folder("sd")
    torch_modules, settings = reference.load_torch(folder), ct.Settings()
    trainable, data, ours, theirs, _ = ct._setup(torch_modules, load(folder), settings, 1, None, None,
                                                 optimizer=False)
    d = ct._first_draws(ours, data[0], jax.random.key(settings.seed), settings)
    image = ours.image(data[0])
    loss_j, grads_j = ours.gradients(image, d)
    grads_j, specs = ct.flat(grads_j), ct.torch_specs(torch_modules)

    def compared():
        loss_t, grads_t = theirs.gradients(image, d)
        theirs_in_jax = ct.torch_named_to_jax(specs, grads_t, trainable)
        return {"one_step": ct._gradient_report(loss_j, loss_t, grads_j, theirs_in_jax, theirs.frozen_grads(),
                                                trainable)[0]}

    assert ct.ok(compared())
    for name, mutation in MUTATIONS.items():
        with monkeypatch.context() as m:
            m.setattr(reference.TrainingReference, *mutation(reference))
            report = compared()
        assert not ct.ok(report), name
        assert report["one_step"]["grad_rel_max"] > 100 * ct.TOLERANCES["grad"], name


def test_grads_only_is_one_step():
    from pbe_jax.parity import compare

    for argv in (["--train", "--grads-only", "--steps", "2"], ["--grads-only"]):
        with pytest.raises(SystemExit) as e:
            compare.main(argv)
        assert e.value.code == 2

"""Where does an exemplar's shape, colour and pattern get lost? Linear probes on the conditioner of a synthetic
model: a softmax regression per attribute, fitted on the tower's pooled output and on the one bottleneck token
the UNet reads, for object crops drawn as the tower was pretrained on (`pretrain.object_crop`); scored on
held-out crops and, with --benchmark, on the benchmark's references (their labels.jsonl attributes). Prints
JSON: accuracy per attribute, feature and test set.

    python bench/probe_conditioner.py --model checkpoints/synthetic --benchmark runs/quality/benchmark

Chance is 1/6 (shape), 1/8 (colour), 1/4 (pattern). Compare with the edits' attribute scores in the quality
table: what the token carries and the edits do not show is lost in the UNet or the autoencoder (the table's
copy-paste-vae row measures the autoencoder alone).
"""
import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pbe_jax import convert, images  # noqa: E402
from pbe_jax.eval import attributes  # noqa: E402
from pbe_jax.train import pretrain  # noqa: E402


def features(models: convert.PaintByExampleModels, crops: list[np.ndarray], batch: int = 256):
    """(pooled, token) for uint8 crops, preprocessed as the pipeline preprocesses references."""
    encoder = models.image_encoder
    processor = images.ReferenceProcessor.from_config(models.extra_configs.get("feature_extractor"),
                                                      encoder.model.config.image_size)
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def both(state, x):
        enc = nnx.merge(graphdef, state)
        pooled = enc.model(x)[1]
        return pooled, enc.bottleneck(pooled)[:, 0]

    x = np.stack([processor(c) for c in crops])
    out = [both(state, x[i:i + batch]) for i in range(0, len(x), batch)]
    return {name: np.concatenate([np.asarray(o[k], np.float32) for o in out]) for k, name in
            enumerate(("tower pooled", "bottleneck token"))}


def fit_probe(x: np.ndarray, y: np.ndarray, classes: int, steps: int, l2: float = 1e-4):
    """Softmax regression on standardised features (Adam, full batch); returns a predict function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = jnp.asarray((x - mu) / sd)
    params = (jnp.zeros((x.shape[1], classes)), jnp.zeros(classes))
    opt = optax.adam(1e-2)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean() + l2 * jnp.sum(p[0] ** 2)

    @jax.jit
    def step(p, s):
        updates, s = opt.update(jax.grad(loss)(p), s)
        return optax.apply_updates(p, updates), s

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return lambda z: np.asarray(((z - mu) / sd) @ params[0] + params[1]).argmax(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/synthetic", help="a synthetic Paint-by-Example folder")
    p.add_argument("--benchmark", help="also score the references of this benchmark folder (labels.jsonl)")
    p.add_argument("--train", type=int, default=4000, help="object crops to fit the probes on")
    p.add_argument("--test", type=int, default=1000, help="held-out object crops")
    p.add_argument("--steps", type=int, default=1500, help="optimisation steps per probe")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    models = convert.load(args.model)
    size = models.image_encoder.model.config.image_size

    def crops(n, seed):
        rng = np.random.default_rng(seed)
        xs, ys = zip(*(pretrain.object_crop(rng, size) for _ in range(n)))
        return list(xs), np.asarray(ys)

    train_x, train_y = crops(args.train, [args.seed, 0])
    tests = {"held-out crops": crops(args.test, [args.seed, 1])}
    if args.benchmark:
        from pbe_jax.data import benchmark

        bench = Path(args.benchmark)
        labels = benchmark.read_labels(bench)
        refs = [images.to_rgb(bench / "reference" / f"{i}.png", f"reference {i}") for i in labels]
        tests["benchmark references"] = (refs, np.asarray([[row["reference"][a] for a in attributes.ATTRIBUTES]
                                                            for row in labels.values()]))
    train_f = features(models, train_x)
    test_f = {name: features(models, x) for name, (x, _) in tests.items()}
    report = {"model": args.model, "train": args.train, "accuracy": {}}
    for feat, fx in train_f.items():
        report["accuracy"][feat] = {name: {} for name in tests}
        for a, attr in enumerate(attributes.ATTRIBUTES):
            predict = fit_probe(fx, train_y[:, a], attributes.ClassifierConfig.classes[a], args.steps)
            for name, (_, y) in tests.items():
                report["accuracy"][feat][name][attr] = round(float((predict(test_f[name][feat]) == y[:, a]).mean()), 3)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

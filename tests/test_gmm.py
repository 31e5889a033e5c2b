"""GMM-GIQA (QS): the released pickled mixture converted once to arrays, and score_samples reimplemented to
equal scikit-learn's for every covariance type."""
import pickle

import numpy as np
import pytest

from pbe_jax.eval import gmm
from pbe_jax.eval.__main__ import main

sklearn_mixture = pytest.importorskip("sklearn.mixture")


def fitted(covariance_type: str, k: int = 4, d: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (k, d))
    x = np.concatenate([c + rng.normal(0, 1, (60, d)) @ rng.normal(0, 0.7, (d, d)) for c in centres])
    return sklearn_mixture.GaussianMixture(k, covariance_type=covariance_type, random_state=seed).fit(x), x


@pytest.mark.parametrize("covariance_type", gmm.COVARIANCE_TYPES)
def test_score_samples_equals_scikit_learn(covariance_type):
    model, x = fitted(covariance_type)
    queries = np.concatenate([x[::7], np.random.default_rng(1).normal(0, 8, (20, x.shape[1]))])  # far ones too
    ours = gmm.from_sklearn(model).score_samples(queries)
    np.testing.assert_allclose(ours, model.score_samples(queries), rtol=1e-10, atol=1e-9)


def test_gmm_to_npz_round_trip_and_qs(tmp_path, capsys):
    model, x = fitted("full", k=20, d=8)
    (tmp_path / "gmm.pkl").write_bytes(pickle.dumps(model))
    with pytest.warns(UserWarning, match="runs code"):
        assert main(["gmm-to-npz", str(tmp_path / "gmm.pkl"), str(tmp_path / "gmm.npz")]) == 0
    assert "20 components, 8 dimensions, full covariances" in capsys.readouterr().out
    mixture = gmm.load(tmp_path / "gmm.npz")
    np.testing.assert_allclose(mixture.score_samples(x), model.score_samples(x), rtol=1e-10)
    # QS as GMM-GIQA reports it: clip(loglik / 300, 0, 1), mean × 100. One narrow 1-D Gaussian (precision
    # Cholesky factor p) puts log p(0) above 300, log p(x_mid) at 150 exactly, and a far point below 0.
    p = np.exp(310.0)
    narrow = gmm.GaussianMixture(np.ones(1), np.zeros((1, 1)), np.full((1, 1, 1), p), "full")
    top = np.log(p) - 0.5 * np.log(2 * np.pi)
    x_mid = np.sqrt(2 * (top - 150)) / p
    points = np.array([[0.0], [x_mid], [1e3 / p]])
    np.testing.assert_allclose(narrow.score_samples(points)[:2], [top, 150.0], rtol=1e-9)
    assert narrow.score_samples(points)[2] < 0
    assert gmm.qs(points, narrow) == pytest.approx((1 + 0.5 + 0) / 3 * 100)
    assert 0 <= gmm.qs(x, mixture) <= 100


def test_bad_files_and_shapes_say_what_is_wrong(tmp_path, capsys):
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.warns(UserWarning):
        assert main(["gmm-to-npz", str(tmp_path / "junk.pkl"), str(tmp_path / "out.npz")]) == 1
    assert "junk.pkl: not a readable pickle" in capsys.readouterr().err
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.warns(UserWarning):
        assert main(["gmm-to-npz", str(tmp_path / "list.pkl"), str(tmp_path / "out.npz")]) == 1
    assert "not a fitted scikit-learn GaussianMixture" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not a converted mixture, missing"):
        gmm.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"needs weights \(2,\) and precisions_cholesky \(2, 3, 3\)"):
        gmm.GaussianMixture(np.ones(2) / 2, np.zeros((2, 3)), np.zeros((2, 3)), "full")
    model, _ = fitted("diag")
    with pytest.raises(ValueError, match=r"features must be \(N, 6\)"):
        gmm.from_sklearn(model).score_samples(np.zeros((3, 5)))

"""GMM-GIQA ("QS" in the paper's Table 1): the log-likelihood of each result's CLIP feature under a Gaussian
mixture fitted on real images, clip(loglik / 300, 0, 1), averaged and × 100.

The released mixture is a pickled scikit-learn `GaussianMixture`. Unpickling runs code, so it is opened in one
place only (`gmm_to_npz`, i.e. `python -m pbe_jax.eval gmm-to-npz FILE OUT`) and turned into plain arrays; the
scoring here is a reimplementation of `GaussianMixture.score_samples` on those arrays (log-sum-exp over the
components of log weight + Gaussian log density, the density through the precision Cholesky factors), so
scikit-learn is needed for the conversion only.
"""
from __future__ import annotations

import dataclasses
import io
import warnings
import zipfile

import numpy as np

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
QS_SCALE = 300.0  # GMM-GIQA's normaliser of the log-likelihood


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """A fitted mixture as arrays: weights (K,), means (K, D), and precisions_cholesky shaped by
    covariance_type as scikit-learn stores it: full (K, D, D), tied (D, D), diag (K, D), spherical (K,)."""

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance_type: str = "full"

    def __post_init__(self):
        k, d = self.means.shape
        expected = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
        if self.covariance_type not in expected:
            raise ValueError(f"covariance_type must be one of {', '.join(COVARIANCE_TYPES)}, "
                             f"not {self.covariance_type!r}")
        if self.weights.shape != (k,) or self.precisions_cholesky.shape != expected[self.covariance_type]:
            raise ValueError(f"a {self.covariance_type} mixture of {k} components in {d} dimensions needs weights "
                             f"({k},) and precisions_cholesky {expected[self.covariance_type]}, not "
                             f"{self.weights.shape} and {self.precisions_cholesky.shape}")

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """log p(x) per row, as scikit-learn's `score_samples` computes it (float64)."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.means.shape[1]:
            raise ValueError(f"features must be (N, {self.means.shape[1]}), not {x.shape}")
        mu, pc = self.means.astype(np.float64), self.precisions_cholesky.astype(np.float64)
        n_features = x.shape[1]
        kind = self.covariance_type
        if kind == "full":
            log_det = np.log(np.diagonal(pc, axis1=1, axis2=2)).sum(1)
            y = np.einsum("nd,kde->nke", x, pc) - np.einsum("kd,kde->ke", mu, pc)[None]
            log_prob = (y ** 2).sum(-1)
        elif kind == "tied":
            log_det = np.full(len(mu), np.log(np.diag(pc)).sum())
            y = (x @ pc)[:, None, :] - (mu @ pc)[None]
            log_prob = (y ** 2).sum(-1)
        elif kind == "diag":
            log_det = np.log(pc).sum(1)
            precisions = pc ** 2
            log_prob = ((mu ** 2 * precisions).sum(1)[None] - 2 * x @ (mu * precisions).T
                        + (x ** 2) @ precisions.T)
        else:  # spherical
            log_det = n_features * np.log(pc)
            precisions = pc ** 2
            log_prob = ((mu ** 2).sum(1) * precisions)[None] - 2 * (x @ mu.T) * precisions[None] \
                + np.outer((x ** 2).sum(1), precisions)
        weighted = -0.5 * (n_features * np.log(2 * np.pi) + log_prob) + log_det[None] + np.log(self.weights)[None]
        top = weighted.max(1, keepdims=True)
        return (top + np.log(np.exp(weighted - top).sum(1, keepdims=True)))[:, 0]

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, weights=self.weights, means=self.means, precisions_cholesky=self.precisions_cholesky,
                 covariance_type=np.array(self.covariance_type))
        return buf.getvalue()


def load(file) -> GaussianMixture:
    """A mixture from an .npz that `gmm_to_npz` wrote (local or gs://)."""
    from pbe_jax import storage

    try:
        with np.load(storage.local_or_buffer(file), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{file}: not an .npz of arrays ({e})") from e
    missing = {"weights", "means", "precisions_cholesky", "covariance_type"} - set(arrays)
    if missing:
        raise ValueError(f"{file}: not a converted mixture, missing {', '.join(sorted(missing))} "
                         "(convert the pickle with `python -m pbe_jax.eval gmm-to-npz FILE OUT`)")
    return GaussianMixture(arrays["weights"], arrays["means"], arrays["precisions_cholesky"],
                           str(arrays["covariance_type"]))


def from_sklearn(model) -> GaussianMixture:
    """The arrays of a fitted scikit-learn `GaussianMixture`."""
    for name in ("weights_", "means_", "precisions_cholesky_", "covariance_type"):
        if not hasattr(model, name):
            raise ValueError(f"not a fitted scikit-learn GaussianMixture: it has no {name!r} "
                             f"(a {type(model).__module__}.{type(model).__name__})")
    return GaussianMixture(np.asarray(model.weights_, np.float64), np.asarray(model.means_, np.float64),
                           np.asarray(model.precisions_cholesky_, np.float64), model.covariance_type)


def gmm_to_npz(pickle_file, out) -> GaussianMixture:
    """Open a pickled scikit-learn GaussianMixture (the released GMM-GIQA model) and write its arrays to `out`.
    The one place this project unpickles anything: it needs scikit-learn, and unpickling runs code, so only
    convert files from a source you trust."""
    import pickle

    from pbe_jax import storage

    warnings.warn(f"unpickling {pickle_file}: this runs code from the file; only convert files you trust",
                  stacklevel=2)
    try:
        import sklearn  # noqa: F401  (the pickle refers to its classes)
    except ImportError as e:
        raise ImportError("gmm-to-npz needs scikit-learn to open the pickle: pip install scikit-learn") from e
    try:
        model = pickle.loads(storage.read_bytes(pickle_file))  # noqa: S301 (see the docstring)
    except (pickle.UnpicklingError, EOFError, AttributeError, ModuleNotFoundError) as e:
        raise ValueError(f"{pickle_file}: not a readable pickle ({type(e).__name__}: {e})") from e
    gmm = from_sklearn(model)
    storage.write_bytes(out, gmm.to_npz_bytes())
    return gmm


def qs(features: np.ndarray, gmm: GaussianMixture) -> float:
    """GMM-GIQA quality score as the paper reports it: mean of clip(loglik / 300, 0, 1) × 100."""
    return float(np.clip(gmm.score_samples(features) / QS_SCALE, 0.0, 1.0).mean() * 100)

"""The paper's quality measures as plain functions: PSNR and SSIM of what should be kept (the unmasked
region), the CLIP-style similarity of the generated region to the reference, and the Fréchet distance
behind FID.

Images are uint8 (H, W, 3). A `mask` follows the project's convention, white (≥ 0.5 after
`images.to_mask`) = the edited region; PSNR and SSIM with a mask compare only the pixels where it is black,
so the edit itself never counts. No network ships here: CLIP embeddings come from a `pbe_jax` CLIP vision
tower (`clip_embedder`), Inception features from a callable the user supplies.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from pbe_jax import images, storage
from pbe_jax.eval.features import Extractor
from pbe_jax.storage import Path, PathLike

EmbedFn = Callable[[Sequence[np.ndarray]], np.ndarray]  # uint8 images of any sizes → (N, D) vectors

# SSIM as Wang et al. (2004) define it: an 11×11 Gaussian window of σ = 1.5, K1 = 0.01, K2 = 0.03, 8-bit range.
SSIM_WINDOW, SSIM_SIGMA, DATA_RANGE = 11, 1.5, 255.0
C1, C2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected two uint8 (H, W, 3) images of the same shape, got {a.shape} and {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def keep_region(mask, shape: tuple[int, ...]) -> np.ndarray:
    """bool (H, W): True where `mask` (white = edited) is black, i.e. the pixels an edit must preserve;
    everything when `mask` is None."""
    if mask is None:
        return np.ones(shape[:2], bool)
    keep = images.to_mask(mask) < 0.5
    if keep.shape != tuple(shape[:2]):
        raise ValueError(f"mask of size {keep.shape[1]}×{keep.shape[0]} for an image of {shape[1]}×{shape[0]}")
    return keep


def psnr(a, b, mask=None) -> float:
    """Peak signal-to-noise ratio in dB over the pixels outside `mask` (all three channels); inf when equal."""
    a, b = _pair(a, b)
    keep = keep_region(mask, a.shape)
    if not keep.any():
        raise ValueError("the mask covers the whole image: no pixels left to compare")
    mse = np.mean((a[keep] - b[keep]) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(DATA_RANGE ** 2 / mse))


def _gaussian_filter(x: np.ndarray) -> np.ndarray:
    """Separable Gaussian filtering of (H, W, C) over H and W, zero outside the image ('same' size).
    Accumulated in place: on 512² images the temporaries, not the arithmetic, cost the time."""
    t = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-t ** 2 / (2 * SSIM_SIGMA ** 2))
    g /= g.sum()
    r = SSIM_WINDOW // 2
    tmp = np.empty_like(x)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p, x = np.pad(x, pad), np.zeros_like(x)
        for k, gk in enumerate(g):
            np.multiply(p[k:k + x.shape[0]] if axis == 0 else p[:, k:k + x.shape[1]], gk, out=tmp)
            x += tmp
    return x


def ssim(a, b, mask=None) -> float:
    """Structural similarity, computed per RGB channel and averaged over the channels and the pixels
    outside `mask` whose 11×11 window lies inside the image (Wang et al.'s 'valid' SSIM; without a mask
    this is the standard value, e.g. skimage's with gaussian_weights=True). With a mask the local means,
    variances and covariance are weighted by the window restricted to the kept pixels, so nothing inside
    the edited region reaches the score, not even through a window that straddles its border."""
    a, b = _pair(a, b)
    keep = keep_region(mask, a.shape)
    h, w = keep.shape
    r = SSIM_WINDOW // 2
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, got {w}×{h}")
    inside = np.zeros_like(keep)
    inside[r:h - r, r:w - r] = True
    counted = keep & inside
    if not counted.any():
        raise ValueError(f"no kept pixel is {r} px or more from the image border: nothing to compare")
    k = keep[..., None].astype(np.float64)
    # One filtering pass for all the local sums: weight, a, b, a², b², ab (each kept pixel only).
    sums = _gaussian_filter(np.concatenate([k, a * k, b * k, a * a * k, b * b * k, a * b * k], -1))[counted]
    mu_a, mu_b, aa, bb, ab = np.split(sums[:, 1:] / sums[:, :1], 5, axis=-1)
    var_a, var_b, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    s = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a ** 2 + mu_b ** 2 + C1) * (var_a + var_b + C2))
    return float(s.mean())


def preservation(result, source, mask) -> dict[str, float | None]:
    """{"psnr", "ssim"} of `result` against `source` outside `mask` (white = edited); None where the mask
    leaves nothing to compare."""
    out = {}
    for name, fn in (("psnr", psnr), ("ssim", ssim)):
        try:
            out[name] = fn(result, source, mask)
        except ValueError:
            out[name] = None
    return out


def crop(image: np.ndarray, box) -> np.ndarray:
    """The pixels of `box` (x0, y0, x1, y1, pixel edges, floats allowed: grown to whole pixels), clipped to
    the image; at least one pixel."""
    h, w = image.shape[:2]
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x1, y1 = int(np.clip(np.ceil(box[2]), x0 + 1, w)), int(np.clip(np.ceil(box[3]), y0 + 1, h))
    return image[y0:y1, x0:x1]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) embedding arrays, in float64: with a region's and its
    reference's CLIP embeddings, the CLIP-style score (the paper's tables print it × 100)."""
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    a, b = (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) for x in (a, b))
    return np.sum(a * b, axis=-1)


def _clip_folder(folder: Path):
    """A CLIP vision tower and its preprocessing from a Paint-by-Example folder or checkpoint, its
    `image_encoder/` folder alone, or a transformers CLIP(Vision)Model folder."""
    from pbe_jax.convert import mapping
    from pbe_jax.convert.diffusers import load_component, read_json
    from pbe_jax.convert.init import clip_vision_state
    from pbe_jax.convert.weights import find_weights
    from pbe_jax.models import CLIPVisionConfig, CLIPVisionModel, Policy

    if (folder / "image_encoder").is_dir():
        fe = folder / "feature_extractor" / "preprocessor_config.json"
        return load_component(folder / "image_encoder", "image_encoder").model, read_json(fe) if fe.is_file() else None
    config = read_json(folder / "config.json")
    fe = folder / "preprocessor_config.json"
    fe = read_json(fe) if fe.is_file() else None
    if (folder / "params.safetensors").is_file() or "PaintByExampleImageEncoder" in config.get("architectures", []):
        return load_component(folder, "image_encoder").model, fe
    path = find_weights(folder)
    state = {name.removeprefix("model."): value for name, value in clip_vision_state(path).items()}
    cfg = CLIPVisionConfig.from_dict(config, str(folder / "config.json"))
    return mapping.from_torch(CLIPVisionModel, cfg, Policy(), state, str(path)), fe


def clip_embedder(source, *, batch_size: int = 16) -> EmbedFn:
    """An `EmbedFn` from a CLIP vision tower: the pooled output (class token after the post-layernorm,
    `tower(pixels)[1]`, the vector Paint by Example's bottleneck reads) of images preprocessed as the
    folder's feature extractor says (CLIP's resize and centre crop at the tower's size otherwise).
    `source`: a folder (`_clip_folder`), a `PaintByExampleModels`, a `PaintByExampleImageEncoder` or a
    `CLIPVisionModel`. The tower runs through `features.Extractor`: compiled once, `batch_size` rows a call
    split over the local devices."""
    from pbe_jax.convert import PaintByExampleModels
    from pbe_jax.models import CLIPVisionModel, PaintByExampleImageEncoder

    fe = None
    if isinstance(source, (str, os.PathLike)):
        if not storage.path(source).is_dir():
            raise FileNotFoundError(f"{source}: no such folder (expected a Paint-by-Example or CLIP folder)")
        tower, fe = _clip_folder(storage.path(source))
    elif isinstance(source, PaintByExampleModels):
        tower, fe = source.image_encoder.model, source.extra_configs.get("feature_extractor")
    elif isinstance(source, PaintByExampleImageEncoder):
        tower = source.model
    elif isinstance(source, CLIPVisionModel):
        tower = source
    else:
        raise TypeError(f"clip_embedder takes a folder or a pbe_jax CLIP tower, not {type(source).__name__}")
    processor = images.ReferenceProcessor.from_config(fe, tower.config.image_size)
    pooled = Extractor(tower, batch_size=batch_size, apply=lambda tower, x: tower(x)[1].astype(jnp.float32))

    def embed(batch: Sequence[np.ndarray]) -> np.ndarray:
        return pooled(np.stack([processor(images.to_rgb(im, f"image {i}")) for i, im in enumerate(batch)]))

    return embed


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as FID uses) of (N, D) features, N ≥ 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"feature statistics need (N, D) features with N ≥ 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), the Fréchet distance between two Gaussians.

    tr (Σ1 Σ2)^½ is taken as the sum of the square roots of the eigenvalues of Σ1^½ Σ2 Σ1^½, which has
    the same eigenvalues as Σ1 Σ2 but is symmetric positive semi-definite: numpy's `eigh` gives it exactly,
    with no complex round-off and no regularising offset for singular covariances (which `scipy.linalg.sqrtm`
    of the non-symmetric product needs), so scipy is not needed."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} and {mu2.shape}, "
                         f"sigma {sigma1.shape} and {sigma2.shape}")
    root = _psd_sqrt(sigma1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance as pytorch-fid computes it, for numbers comparable with the literature's: the
    matrix square root of Σ1 Σ2 by `scipy.linalg.sqrtm`; if that is not finite, again with `eps` added to
    both diagonals; a complex root is accepted only if the imaginary parts of its diagonal are within 1e-3 of
    zero (else ValueError naming the largest imaginary part), and its real part is used. (`frechet_distance`
    above is the exact symmetric form; the two differ by sqrtm's round-off and fallbacks.)"""
    import warnings

    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} and {mu2.shape}, "
                         f"sigma {sigma1.shape} and {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # a singular product: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        root = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            warnings.warn(f"the product of the covariances is singular: adding {eps} to their diagonals",
                          UserWarning, stacklevel=2)
            offset = np.eye(len(mu1)) * eps
            root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"the covariances' square root has an imaginary component of "
                             f"{np.abs(root.imag).max():g}")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def in_batches(fn: EmbedFn, imgs: Sequence[np.ndarray], batch_size: int = 50) -> np.ndarray:
    """`fn` applied to `imgs` in batches of `batch_size`, concatenated."""
    return np.concatenate([np.asarray(fn(list(imgs[i:i + batch_size]))) for i in range(0, len(imgs), batch_size)])


def fid(real_images: Sequence[np.ndarray], fake_images: Sequence[np.ndarray], inception_fn: EmbedFn,
        batch_size: int = 50) -> float:
    """FID between two image sets with the user's `inception_fn` (a batch of uint8 images → (B, 2048)
    pool features of an Inception-v3; none ships with pbe_jax)."""
    return frechet_distance(*feature_stats(in_batches(inception_fn, real_images, batch_size)),
                            *feature_stats(in_batches(inception_fn, fake_images, batch_size)))


def save_stats(path: PathLike, mu, sigma) -> None:
    """Feature statistics as `.npz` with arrays `mu` (D,) and `sigma` (D, D), e.g. of a real image set."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    storage.write_bytes(path, buffer.getvalue())


def load_stats(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(storage.local_or_buffer(path)) as z:
            mu, sigma = z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not an .npz with arrays 'mu' (D,) and 'sigma' (D, D) ({e})") from e
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    return mu, sigma

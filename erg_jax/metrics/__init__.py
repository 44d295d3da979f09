"""Quality, diversity and consistency of generated samples, from classifier features.

All metrics take features, (n, d) arrays; the quality bench reads them from the penultimate
layer of the attribute classifier trained on ``erg_jax.data``.

Frechet distance (Heusel et al. 2017, as pytorch-fid computes it): with means mu and
unbiased covariances S (``np.cov(rowvar=False)``) of the two sets,

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b))

where sqrtm is scipy's Schur method. When the root is not finite, eps is added to both
diagonals and it is taken again; an imaginary part from rounding is dropped, unless a
diagonal entry's exceeds 1e-3 (an error).

Precision, recall, density and coverage (Naeem et al. 2020, as the prdc package computes
them). With Euclidean distances d, r_k(x) the distance from x to its k-th nearest
neighbour in its own set (x itself counted as the 0th), real points X and fakes Y:

    precision = mean_j [exists i: d(X_i, Y_j) < r_k(X_i)]
    recall    = mean_i [exists j: d(X_i, Y_j) < r_k(Y_j)]
    density   = (1 / k) mean_j #{i: d(X_i, Y_j) < r_k(X_i)}
    coverage  = mean_i [min_j d(X_i, Y_j) < r_k(X_i)]

Distances are computed in float64 blocks, so 10k x 10k sets need tens of MB.

Kernel Inception distance (Binkowski et al. 2018, as torch-fidelity computes it): the
unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
averaged over ``subsets`` random pairs of subsets of ``subset_size`` rows each (drawn
without replacement by ``np.random.RandomState(seed).choice``, the real subset first, so
the same seed draws torch-fidelity's subsets); the mean and standard deviation over them.
Kernels are summed in float64.

CLIP score (Hessel et al. 2021, as torchmetrics computes it): the mean over samples of
100 cos(image embedding, text embedding), clipped at 0 (the mean is clipped, not each
sample's score; ``clip.clip_score_from_embeddings`` gives the per-sample scores).

Consistency: the share of samples whose shape and colour, both read by the attribute
classifier, match the condition they were drawn for.

The feature networks (Inception-v3, DINOv2, CLIP) load from the user's own weight files:
``load_inception(path)``, ``load_dinov2(folder)``, ``load_clip(folder)``. Reference
statistics in pytorch-fid's or clean-fid's .npz layout (``mu``, ``sigma``) load with
``load_statistics``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.linalg

# Distance blocks hold about this many float64 entries (32 MiB; two or three such arrays
# live at once).
BLOCK_ELEMENTS = 2**22


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of (n, d) features, in float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance_from_statistics(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray, eps=1e-6
) -> float:
    """Frechet distance between the Gaussians N(mu_a, sigma_a) and N(mu_b, sigma_b).

    Args:
      mu_a, mu_b: (d,) means.
      sigma_a, sigma_b: (d, d) covariances.
      eps: added to both diagonals when the square root of the product is not finite.
    """
    mu_a, mu_b = np.atleast_1d(mu_a), np.atleast_1d(mu_b)
    sigma_a, sigma_b = np.atleast_2d(sigma_a), np.atleast_2d(sigma_b)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError(
            f"statistics differ in shape: {mu_a.shape} {sigma_a.shape} vs "
            f"{mu_b.shape} {sigma_b.shape}"
        )
    with warnings.catch_warnings():
        # A singular product is the common case for few samples; handled below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
        if not np.all(np.isfinite(root)):
            shift = eps * np.eye(len(sigma_a))
            root = scipy.linalg.sqrtm((sigma_a + shift) @ (sigma_b + shift))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary part of {np.abs(root.imag).max()}")
        root = root.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(root))


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to features a (n, d) and b (m, d)."""
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b), eps)


def _blocks(n: int, width: int, block_rows: int | None) -> Iterator[slice]:
    rows = block_rows or max(1, BLOCK_ELEMENTS // max(width, 1))
    for lo in range(0, n, rows):
        yield slice(lo, min(lo + rows, n))


def _distances(x: np.ndarray, y: np.ndarray, x_sq: np.ndarray, y_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances (n, m) from -2 x.y + |x|^2 + |y|^2, as scikit-learn sums them."""
    d = x @ y.T
    d *= -2.0
    d += x_sq[:, None]
    d += y_sq[None, :]
    np.maximum(d, 0.0, out=d)
    return np.sqrt(d, out=d)


def nearest_neighbour_radii(
    features: np.ndarray, nearest_k: int, block_rows: int | None = None
) -> np.ndarray:
    """(n,) distance from each point to its k-th nearest neighbour, itself counted 0th."""
    x = np.asarray(features, np.float64)
    if not 1 <= nearest_k < len(x):
        raise ValueError(f"nearest_k must be in [1, {len(x) - 1}], got {nearest_k}")
    sq = np.einsum("nd,nd->n", x, x)
    radii = np.empty(len(x))
    for rows in _blocks(len(x), len(x), block_rows):
        d = _distances(x[rows], x, sq[rows], sq)
        # The self-distance is exactly 0 (rounding can leave it slightly positive).
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = 0.0
        radii[rows] = np.partition(d, nearest_k, axis=1)[:, nearest_k]
    return radii


def prdc(
    real: np.ndarray, fake: np.ndarray, nearest_k: int, block_rows: int | None = None
) -> dict[str, float]:
    """Precision, recall, density and coverage of fake features against real ones.

    Args:
      real: (n, d) features of real images.
      fake: (m, d) features of generated images.
      nearest_k: k of the k-nearest-neighbour balls.
      block_rows: rows per distance block; by default about BLOCK_ELEMENTS entries a block.

    Returns:
      dict with precision, recall, density and coverage as floats.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake must be (n, d) and (m, d), got {x.shape}, {y.shape}")
    real_radii = nearest_neighbour_radii(x, nearest_k, block_rows)
    fake_radii = nearest_neighbour_radii(y, nearest_k, block_rows)
    x_sq, y_sq = np.einsum("nd,nd->n", x, x), np.einsum("nd,nd->n", y, y)
    inside_count = np.zeros(len(y))  # real balls holding each fake
    recalled = np.zeros(len(x), bool)  # real points inside some fake ball
    nearest_fake = np.full(len(x), np.inf)
    for cols in _blocks(len(y), len(x), block_rows):
        d = _distances(x, y[cols], x_sq, y_sq[cols])  # (n, block)
        inside_count[cols] = (d < real_radii[:, None]).sum(axis=0)
        recalled |= (d < fake_radii[None, cols]).any(axis=1)
        nearest_fake = np.minimum(nearest_fake, d.min(axis=1))
    return dict(
        precision=float((inside_count > 0).mean()),
        recall=float(recalled.mean()),
        density=float(inside_count.mean() / nearest_k),
        coverage=float((nearest_fake < real_radii).mean()),
    )


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 from the three kernel matrices of two sets of m rows each."""
    m = len(k_xx)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_distance(
    real: np.ndarray,
    fake: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> dict[str, float]:
    """Kernel Inception distance of fake features against real ones (module docstring).

    Args:
      real: (n, d) features of real images.
      fake: (m, d) features of generated images.
      subsets: number of subset pairs averaged over.
      subset_size: rows per subset, at most min(n, m).
      seed: seed of the subset draws (torch-fidelity's default is 2020).

    Returns:
      dict with kid (the mean over subsets) and kid_std.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"real and fake must be (n, d) and (m, d), got {x.shape}, {y.shape}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise ValueError(
            f"subset_size must be in [2, {min(len(x), len(y))}] (the smaller set's size: "
            f"{len(x)} real, {len(y)} fake), got {subset_size}"
        )
    rng = np.random.RandomState(seed)
    gamma = 1.0 / x.shape[1]

    def kernel(a, b):
        return (a @ b.T * gamma + 1.0) ** 3

    values = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        values[i] = _mmd2_unbiased(kernel(a, a), kernel(a, b), kernel(b, b))
    return dict(kid=float(values.mean()), kid_std=float(values.std()))


def clip_score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """CLIP score of paired (n, d) embeddings as torchmetrics reports it: the mean over
    samples of 100 cos(image, text), clipped at 0."""
    from erg_jax.metrics.clip import clip_score_from_embeddings

    scores = clip_score_from_embeddings(image_embeddings, text_embeddings, clip_at_zero=False)
    return float(max(scores.mean(), 0.0))


def save_statistics(path: str, features: np.ndarray) -> None:
    """Writes features' mean ``mu``, covariance ``sigma`` and the ``features`` themselves
    to an .npz that ``load_statistics`` (and pytorch-fid, clean-fid) read."""
    mu, sigma = feature_statistics(features)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.partial-{os.getpid()}.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=np.asarray(features, np.float32))
    os.replace(tmp, path)


def load_statistics(path: str) -> dict[str, np.ndarray]:
    """``mu`` (d,) and ``sigma`` (d, d) of an .npz in pytorch-fid's or clean-fid's layout,
    and ``features`` (n, d) when the file holds them (KID and precision / recall need
    them; FID needs only the statistics)."""
    if not os.path.isfile(path):
        raise ValueError(f"reference statistics file not found: {path}")
    try:  # only the arrays returned: ADM's reference batches also hold 10k images (arr_0)
        with np.load(path) as f:
            data = {k: f[k] if k in ("mu", "sigma", "features") else None for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read reference statistics {path}: {e}") from e
    missing = [k for k in ("mu", "sigma") if k not in data]
    if missing:
        raise ValueError(f"{path} has no {missing} (it holds {sorted(data)}); expected mu, sigma")
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (d,), (d, d)")
    out = {"mu": mu, "sigma": sigma}
    if "features" in data:
        out["features"] = np.asarray(data["features"])
    return out


def load_inception(path: str, **kwargs):
    """Inception-v3 of FID from either PyTorch port's weight file (erg_jax/metrics/inception.py):
    ``f(images uint8 (n, H, W, 3)) -> (n, 2048)`` pool features."""
    from erg_jax.metrics.inception import load_inception as load

    return load(path, **kwargs)


def load_dinov2(folder: str, **kwargs):
    """DINOv2 ViT from a transformers Dinov2Model folder (erg_jax/metrics/dinov2.py)."""
    from erg_jax.metrics.dinov2 import load_dinov2 as load

    return load(folder, **kwargs)


def load_clip(folder: str, **kwargs):
    """CLIP image and text towers from a transformers CLIPModel folder (metrics/clip.py)."""
    from erg_jax.metrics.clip import load_clip as load

    return load(folder, **kwargs)


def consistency_scores(
    pred_shape: np.ndarray, pred_colour: np.ndarray, shape: np.ndarray, colour: np.ndarray
) -> dict[str, float]:
    """Shares of samples whose predicted shape, colour, and both match the condition.

    Args:
      pred_shape, pred_colour: (n,) attributes read by the classifier.
      shape, colour: (n,) attributes of the condition each sample was drawn for.

    Returns:
      dict with consistency (both match), shape_accuracy and colour_accuracy.
    """
    shape_ok = np.asarray(pred_shape) == np.asarray(shape)
    colour_ok = np.asarray(pred_colour) == np.asarray(colour)
    return dict(
        consistency=float((shape_ok & colour_ok).mean()),
        shape_accuracy=float(shape_ok.mean()),
        colour_accuracy=float(colour_ok.mean()),
    )


def consistency(
    pred_shape: np.ndarray, pred_colour: np.ndarray, shape: np.ndarray, colour: np.ndarray
) -> float:
    """Share of samples whose predicted shape and colour both match the condition."""
    return consistency_scores(pred_shape, pred_colour, shape, colour)["consistency"]


def compute_metrics(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    nearest_k: int = 5,
    predictions: tuple[np.ndarray, np.ndarray] | None = None,
    conditions: tuple[np.ndarray, np.ndarray] | None = None,
    precision_recall_k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, float]:
    """Every metric of the quality bench from features and, optionally, classifier predictions.

    Args:
      real_features: (n, d) classifier features of held-out real images.
      fake_features: (m, d) classifier features of generated images.
      nearest_k: k for density and coverage (Naeem et al.'s 5).
      predictions: (pred_shape, pred_colour) of the generated images, each (m,).
      conditions: (shape, colour) each generated image was conditioned on, each (m,).
      precision_recall_k: k for precision and recall (Kynkaanniemi et al.'s 3).
      kid_subsets, kid_subset_size: KID's subsets; the size is at most min(n, m).

    Returns:
      dict with fd, kid, kid_std, precision, recall, density, coverage and, given
      predictions and conditions, consistency, shape_accuracy and colour_accuracy.
    """
    out = {"fd": frechet_distance(real_features, fake_features)}
    size = min(kid_subset_size, len(real_features), len(fake_features))
    out.update(kernel_distance(real_features, fake_features, kid_subsets, size))
    pr = prdc(real_features, fake_features, precision_recall_k)
    out.update(precision=pr["precision"], recall=pr["recall"])
    dc = prdc(real_features, fake_features, nearest_k)
    out.update(density=dc["density"], coverage=dc["coverage"])
    if (predictions is None) != (conditions is None):
        raise ValueError("give both predictions and conditions, or neither")
    if predictions is not None:
        out.update(consistency_scores(*predictions, *conditions))
    return out

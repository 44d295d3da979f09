"""Metrics: parity with prdc and pytorch-fid's formula, and closed forms."""

import numpy as np
import pytest
import scipy.linalg

from erg_jax import metrics


def reference_frechet(a, b, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance on np.mean / np.cov statistics."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def with_statistics(rng, n, mean, variances):
    """n samples whose empirical mean and unbiased covariance are exactly these."""
    x = rng.normal(size=(n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return x * np.sqrt(variances) + mean


@pytest.mark.parametrize("n, m, d", [(500, 400, 8), (300, 300, 32), (20, 30, 40)])
def test_frechet_distance_matches_pytorch_fid_formula(n, m, d):
    rng = np.random.default_rng(d)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    a = rng.normal(size=(n, d)) @ mix
    b = rng.normal(0.3, 1.2, size=(m, d)) @ mix
    np.testing.assert_allclose(metrics.frechet_distance(a, b), reference_frechet(a, b), rtol=1e-6)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = metrics.frechet_distance_from_statistics(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    a, b = with_statistics(rng, 200, mu1, v1), with_statistics(rng, 150, mu2, v2)
    np.testing.assert_allclose(metrics.frechet_distance(a, b), want, rtol=1e-6)


def test_frechet_distance_is_symmetric_euclidean_invariant_and_zero_on_itself():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 10)), rng.normal(0.5, 2.0, size=(250, 10))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    fd = metrics.frechet_distance(a, b)
    np.testing.assert_allclose(metrics.frechet_distance(b, a), fd, rtol=1e-6)
    shift = rng.normal(size=10)
    moved = metrics.frechet_distance(a @ q + shift, b @ q + shift)
    np.testing.assert_allclose(moved, fd, rtol=1e-6)
    assert abs(metrics.frechet_distance(a, a)) < 1e-8


@pytest.mark.parity
@pytest.mark.parametrize("nearest_k", [3, 5])
@pytest.mark.parametrize("block_rows", [None, 17])
def test_prdc_matches_prdc_package(nearest_k, block_rows):
    prdc_package = pytest.importorskip("prdc", reason="parity with the prdc package")
    rng = np.random.default_rng(nearest_k)
    real = rng.normal(size=(200, 16)).astype(np.float32)
    fake = rng.normal(0.2, 1.1, size=(300, 16)).astype(np.float32)
    want = prdc_package.compute_prdc(real, fake, nearest_k)
    got = metrics.prdc(real, fake, nearest_k, block_rows=block_rows)
    assert set(got) == {"precision", "recall", "density", "coverage"}
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-12, err_msg=key)


def test_prdc_of_identical_sets_and_of_far_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 8))
    same = metrics.prdc(x, x, nearest_k=4)
    for key in ("precision", "recall", "coverage"):
        assert same[key] == 1.0
    # Each point lies in its own ball and in those of the real points whose k-ball holds it.
    assert same["density"] >= 1.0 / 4
    far = metrics.prdc(x, x + 100.0, nearest_k=4)
    assert far == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)


def test_nearest_neighbour_radii_count_the_point_itself():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_array_equal(metrics.nearest_neighbour_radii(x, 1), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(metrics.nearest_neighbour_radii(x, 2), [3.0, 2.0, 3.0, 6.0])


def test_consistency_and_compute_metrics():
    shape, colour = np.array([0, 1, 2, 3]), np.array([5, 4, 3, 2])
    pred_shape, pred_colour = np.array([0, 1, 0, 3]), np.array([5, 0, 3, 2])
    scores = metrics.consistency_scores(pred_shape, pred_colour, shape, colour)
    assert scores == dict(consistency=0.5, shape_accuracy=0.75, colour_accuracy=0.75)
    assert metrics.consistency(pred_shape, pred_colour, shape, colour) == 0.5
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(4, 4))
    out = metrics.compute_metrics(real, fake, 3, (pred_shape, pred_colour), (shape, colour))
    assert out["fd"] == metrics.frechet_distance(real, fake)
    assert out["coverage"] == metrics.prdc(real, fake, 3)["coverage"]
    assert out["consistency"] == 0.5

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


def test_balls_are_open_as_in_the_prdc_package():
    # 1-D integer points, so distances are exact and some equal a radius (k = 1):
    # real 7, 8, 13, 17 have radii 1, 1, 4, 4; fakes 6, 11, 12 have radii 5, 1, 1.
    # A point at exactly a radius is outside: fake 6 (1 from real 7), real 13 (1 from
    # fake 12) and real 7's nearest fake are the ties; with closed balls every value
    # below would be larger (1, 0.75, 1, 0.5).
    real = np.array([[7.0], [8.0], [13.0], [17.0]])
    fake = np.array([[6.0], [11.0], [12.0]])
    got = metrics.prdc(real, fake, nearest_k=1)
    want = dict(precision=2 / 3, recall=0.5, density=2 / 3, coverage=0.25)
    assert got == pytest.approx(want, abs=1e-12)
    # the bench's k is the paper's 5
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 3)), rng.normal(size=(20, 3))
    full = metrics.compute_metrics(a, b)
    five, three = metrics.prdc(a, b, 5), metrics.prdc(a, b, 3)  # precision / recall at k = 3
    assert {key: full[key] for key in ("density", "coverage")} == {
        key: five[key] for key in ("density", "coverage")
    }
    assert {key: full[key] for key in ("precision", "recall")} == {
        key: three[key] for key in ("precision", "recall")
    }
    assert full["kid"] == metrics.kernel_distance(a, b, 100, 20)["kid"]  # size min(1000, n, m)


def test_radii_scale_with_the_points_below_unit_distances():
    # the same points as above, 100 times closer: every distance is under 1
    x = np.array([[0.0], [1.0], [3.0], [7.0]]) / 100
    np.testing.assert_allclose(metrics.nearest_neighbour_radii(x, 1), [0.01, 0.01, 0.02, 0.04])
    np.testing.assert_allclose(metrics.nearest_neighbour_radii(x, 3), [0.07, 0.06, 0.04, 0.07])


def test_bad_shapes_and_k_are_named():
    x = np.zeros((4, 2))
    for k in (0, 4):  # k counts the point itself as the 0th: 1 .. n - 1
        with pytest.raises(ValueError, match=r"nearest_k must be in \[1, 3\]"):
            metrics.nearest_neighbour_radii(x, k)
    for real, fake in [(x[:, 0], x), (x, x[:, 0]), (x, np.zeros((4, 3)))]:
        with pytest.raises(ValueError, match="real and fake must be"):
            metrics.prdc(real, fake, 1)
    for features in (np.zeros(5), np.zeros((1, 3))):
        with pytest.raises(ValueError, match="features must be"):
            metrics.feature_statistics(features)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.frechet_distance_from_statistics(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))


def test_two_samples_and_one_feature_are_enough():
    # n = 2: mean (a + b) / 2, unbiased variance (a - b)^2 / 2; d = 1: FD = dmu^2 + (sa - sb)^2
    a, b = np.array([[1.0], [3.0]]), np.array([[0.0], [6.0], [3.0]])
    mu, cov = metrics.feature_statistics(a)
    assert (float(mu[0]), float(cov)) == (2.0, 2.0)
    want = (2.0 - 3.0) ** 2 + (np.sqrt(2.0) - 3.0) ** 2  # b: mean 3, variance 9
    np.testing.assert_allclose(metrics.frechet_distance(a, b), want, rtol=1e-12)


def test_a_non_finite_root_is_taken_again_with_eps_on_both_diagonals(monkeypatch):
    # pytorch-fid's fallback; covariances near eps, so where and how eps enters shows.
    sqrtm = scipy.linalg.sqrtm
    calls = []

    def failing_once(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", failing_once)
    va, vb = np.array([1e-6, 3e-6]), np.array([4e-6, 0.5e-6])
    got = metrics.frechet_distance_from_statistics(
        np.zeros(2), np.diag(va), np.ones(2), np.diag(vb)
    )
    # diagonal: tr sqrtm((Sa + eps)(Sb + eps)) = sum sqrt((va + eps)(vb + eps)), eps = 1e-6
    want = 2.0 + np.sum(va) + np.sum(vb) - 2 * np.sum(np.sqrt((va + 1e-6) * (vb + 1e-6)))
    assert len(calls) == 2
    np.testing.assert_allclose(got, want, rtol=1e-9)
    calls.clear()
    got = metrics.frechet_distance(np.array([[0.0], [2e-3]]), np.array([[1.0], [1.0 + 4e-3]]))
    want = 1.001**2 + 2e-6 + 8e-6 - 2 * np.sqrt((2e-6 + 1e-6) * (8e-6 + 1e-6))
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parity
@pytest.mark.parametrize("subset_size", [50, 80])
def test_kernel_distance_matches_torch_fidelity(subset_size):
    from references import module

    torch = pytest.importorskip("torch")
    kid = module("torch_fidelity", "metric_kid", unused=("utils",))  # utils imports torchvision
    rng = np.random.default_rng(subset_size)
    real = rng.normal(size=(120, 12))
    fake = rng.normal(0.3, 1.2, size=(90, 12))
    # float64 tensors, so that torch-fidelity's kernels are summed in float64 as ours are
    want = kid.kid_features_to_metric(
        torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=7,
        kid_subset_size=subset_size, verbose=False, rng_seed=5,
    )  # fmt: skip
    got = metrics.kernel_distance(real, fake, subsets=7, subset_size=subset_size, seed=5)
    np.testing.assert_allclose(got["kid"], want["kernel_inception_distance_mean"], rtol=1e-10)
    np.testing.assert_allclose(got["kid_std"], want["kernel_inception_distance_std"], rtol=1e-10)


def test_kernel_distance_closed_form_and_checks():
    # one subset holding every row: the unbiased MMD^2 written out term by term
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, 3)), rng.normal(1.0, 1.0, size=(5, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    got = metrics.kernel_distance(x, y, subsets=3, subset_size=5)
    np.testing.assert_allclose(got["kid"], xx + yy - 2 * xy, rtol=1e-12)
    assert got["kid_std"] < 1e-12  # every subset is the whole set, permuted
    with pytest.raises(ValueError, match=r"subset_size must be in \[2, 5\]"):
        metrics.kernel_distance(x, y, subset_size=6)
    with pytest.raises(ValueError, match="subsets must be >= 1"):
        metrics.kernel_distance(x, y, subsets=0, subset_size=5)


def test_clip_score_is_the_clipped_mean_of_scaled_cosines():
    image = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    text = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.5]])
    cos = np.array([1.0, 1 / np.sqrt(2), -1 / np.sqrt(1.25)])
    np.testing.assert_allclose(metrics.clip_score(image, text), 100 * cos.mean())
    assert metrics.clip_score(image[2:], text[2:]) == 0.0  # the mean clipped at 0
    with pytest.raises(ValueError):
        metrics.clip_score(image, text[:2])


def test_statistics_files_round_trip_and_bad_files_are_named(tmp_path):
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(30, 4)).astype(np.float32)
    path = str(tmp_path / "ref.npz")
    metrics.save_statistics(path, feats)
    got = metrics.load_statistics(path)
    mu, sigma = metrics.feature_statistics(feats)
    np.testing.assert_array_equal(got["mu"], mu)
    np.testing.assert_array_equal(got["sigma"], sigma)
    np.testing.assert_array_equal(got["features"], feats)
    # pytorch-fid's layout: mu and sigma only
    np.savez(tmp_path / "fid.npz", mu=mu, sigma=sigma)
    assert set(metrics.load_statistics(str(tmp_path / "fid.npz"))) == {"mu", "sigma"}
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match=r"has no \['mu', 'sigma'\]"):
        metrics.load_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="not found"):
        metrics.load_statistics(str(tmp_path / "absent.npz"))

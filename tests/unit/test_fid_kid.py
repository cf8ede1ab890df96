"""FID and KID against closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagine.evaluation.fid import (
    Features,
    cached_reference,
    extract,
    fid,
    folder_batches,
    frechet_distance,
    kid,
    polynomial_mmd2,
)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_non_commuting_covariances():
    """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the symmetric form, computed by eigendecomposition."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)

    def sqrt_psd(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    r = sqrt_psd(s1)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r @ s2 @ r))
    assert frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(np.ones(4), s1, np.ones(4), s1) == pytest.approx(0, abs=1e-8)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(2)
    a = Features(rng.normal(0, 1, size=(20000, 3)))
    b = Features(rng.normal(0.5, 2, size=(20000, 3)))
    expected = 3 * 0.25 + 3 * (1 + 4 - 2 * 2)  # |mu diff|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))
    assert fid(a, b) == pytest.approx(expected, rel=0.03)


def test_mmd_matches_its_feature_map_in_one_dimension():
    """(xy + 1)^3 = phi(x).phi(y) with phi = (1, sqrt3 x, sqrt3 x^2, x^3): MMD^2 is the squared distance of
    the mean embeddings, i.e. of the first three moments. For N(m, 1) against N(0, 1)."""
    m = 0.4
    mx = np.array([m, m**2 + 1, m**3 + 3 * m])
    my = np.array([0.0, 1.0, 0.0])
    expected = 3 * (mx[0] - my[0]) ** 2 + 3 * (mx[1] - my[1]) ** 2 + (mx[2] - my[2]) ** 2
    rng = np.random.default_rng(3)
    values = [polynomial_mmd2(rng.normal(m, 1, (400, 1)), rng.normal(0, 1, (400, 1))) for _ in range(200)]
    assert np.mean(values) == pytest.approx(expected, abs=4 * np.std(values) / np.sqrt(200))


def test_mmd_is_unbiased_for_equal_distributions_and_matches_brute_force():
    rng = np.random.default_rng(4)
    values = [polynomial_mmd2(rng.normal(size=(50, 8)), rng.normal(size=(50, 8))) for _ in range(400)]
    assert abs(np.mean(values)) < 4 * np.std(values) / np.sqrt(400)  # unbiased: zero on average, not positive
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(7, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    brute = (sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
             + sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
             - 2 * sum(k(x[i], y[j]) for i in range(6) for j in range(7)) / 42)
    assert polynomial_mmd2(x, y) == pytest.approx(brute, rel=1e-10)


def test_kid_interval_separates_different_sets_and_covers_zero_for_equal_ones():
    rng = np.random.default_rng(5)
    same = kid(Features(rng.normal(size=(300, 16))), Features(rng.normal(size=(300, 16))))
    lo, hi = same.interval
    assert lo <= 0 <= hi
    shifted = kid(Features(rng.normal(size=(300, 16))), Features(rng.normal(0.5, 1, size=(300, 16))))
    assert shifted.interval[0] > hi
    with pytest.raises(ValueError, match="at least 2"):
        kid(Features(np.zeros((1, 4))), Features(np.zeros((5, 4))))


def test_extract_any_module_folder_batches_and_cached_reference(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # any torch module works
    feats = extract(pool, folder_batches(tmp_path, 4, batch=2))
    assert feats.features.shape == (5, 3)
    assert feats.features[:, 0] == pytest.approx([i * 40 / 127.5 - 1 for i in range(5)], abs=1e-6)
    calls = []

    def batches():
        calls.append(1)
        return folder_batches(tmp_path, 4)

    a = cached_reference(pool, "pool", "five", batches, tmp_path / "cache")
    b = cached_reference(pool, "pool", "five", batches, tmp_path / "cache")
    assert calls == [1] and np.array_equal(a.features, b.features)
    with pytest.raises(ValueError, match="no images"):
        list(folder_batches(tmp_path / "cache", 4))

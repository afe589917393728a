"""Fréchet distance (FVD/FID numerics) against closed forms and scipy; the CLIP-score formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opensora_plan.metrics import (
    clip_score_from_embeddings,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_statistics,
)


def random_covariance(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.standard_normal((dim, rank or dim))
    return factor @ factor.T / (rank or dim)


def closed_form_commuting(mu1, eig1, mu2, eig2) -> float:
    # For covariances with the same eigenvectors: |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2.
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2))


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_covariance(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_identical_feature_sets_are_at_distance_zero_even_with_fewer_samples_than_dimensions():
    features = np.random.default_rng(1).standard_normal((20, 100))  # singular covariance (rank 19)
    distance = frechet_distance_from_features(features, features)
    assert 0.0 <= distance < 1e-8  # never negative: a report would print '-0.00'


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    eig1, eig2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = closed_form_commuting(mu1, eig1, mu2, eig2)
    assert frechet_distance(mu1, np.diag(eig1), mu2, np.diag(eig2)) == pytest.approx(expected, rel=1e-10)


def test_rotated_gaussians_with_shared_eigenvectors_match_the_closed_form():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))  # random rotation: full, non-diagonal covariances
    eig1, eig2 = rng.uniform(0.05, 4, 32), rng.uniform(0.05, 4, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    sigma1, sigma2 = q @ np.diag(eig1) @ q.T, q @ np.diag(eig2) @ q.T
    expected = closed_form_commuting(mu1, eig1, mu2, eig2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_one_dimensional_case_is_the_wasserstein_formula():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) = (m1 - m2)^2 + (s1 - s2)^2.
    value = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]]))
    assert value == pytest.approx(3.0**2 + (2.0 - 0.5) ** 2, rel=1e-12)


@pytest.mark.parametrize("num_samples", [300, 40])  # full-rank and singular covariances (D = 64)
def test_matches_the_scipy_sqrtm_formula_used_by_stylegan_v(num_samples):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    a = rng.standard_normal((num_samples, 64))
    b = 0.7 * rng.standard_normal((num_samples, 64)) @ random_covariance(rng, 64) + 0.3
    mu1, sigma1 = gaussian_statistics(a)
    mu2, sigma2 = gaussian_statistics(b)
    root = np.real(scipy_linalg.sqrtm(sigma1 @ sigma2))
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_accepts_torch_tensors_and_is_symmetric():
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = random_covariance(rng, 8), random_covariance(rng, 8)
    forward = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2)
    assert forward == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


def test_gaussian_statistics_are_mean_and_unbiased_covariance():
    x = np.random.default_rng(6).standard_normal((10, 3))
    mu, sigma = gaussian_statistics(torch.from_numpy(x).float())
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 9, rtol=1e-5)


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="means \\(D,\\) and covariances \\(D, D\\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        gaussian_statistics(np.zeros((1, 400)))


def test_clip_score_formula_is_100_times_clamped_cosine():
    text = torch.tensor([[1.0, 0.0, 0.0]])
    images = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    scores = clip_score_from_embeddings(images, text)
    torch.testing.assert_close(scores, torch.tensor([100.0, 0.0, 0.0, 100 / 2**0.5]))
    with pytest.raises(ValueError, match="image embeddings"):
        clip_score_from_embeddings(images, torch.ones(1, 4))

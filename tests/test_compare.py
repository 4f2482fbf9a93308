"""Agreement statistics: known answers on synthetic samples."""

import math

import numpy as np
import pytest

import sde
from sde import _compare as compare


def test_same_distribution_passes_shifted_fails():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=4000), rng.normal(size=8000)
    same = compare.compare_samples(a, b)
    assert same.ks_pvalue > 1e-3 and same.ks < 0.05
    assert np.all(np.abs(same.quantile_z) < 5)
    shifted = compare.compare_samples(a, b + 0.2)
    assert shifted.ks_pvalue < 1e-6
    assert shifted.quantile_z[2] < -5  # the median moved by 0.2, about 9 standard errors


def test_w1_of_a_shift_is_the_shift():
    x = np.random.default_rng(1).normal(size=1000)
    np.testing.assert_allclose(compare.compare_samples(x, x + 0.3).w1, 0.3, rtol=1e-12)


def test_bootstrap_se_of_the_median_matches_asymptotics():
    # SE(median) of N(0, 1) samples -> sqrt(pi / 2) / sqrt(n); bootstrap error ~ 1/sqrt(2 B).
    n = 20000
    x = np.random.default_rng(2).normal(size=n)
    _, se = compare.quantiles_with_se(x, num_bootstrap=400, seed=3)
    np.testing.assert_allclose(se[2], math.sqrt(math.pi / 2 / n), rtol=0.2)


def test_band_mean_se_and_keep_mask():
    rng = np.random.default_rng(4)
    v = rng.normal(loc=[0.0, 1.0, 2.0], size=(5000, 3))
    keep = np.ones(5000, bool)
    v[:10] = np.nan
    keep[:10] = False
    b = compare.band(v, keep)
    assert np.all(np.abs(b.mean - [0.0, 1.0, 2.0]) < 5 * b.se)
    np.testing.assert_allclose(b.se, 1 / math.sqrt(4990), rtol=0.05)
    with pytest.raises(ValueError, match="non-finite"):
        compare.band(v)


def test_band_with_a_per_layer_keep_mask():
    """Column k uses only the samples alive at k: the statistics of the kept entries alone."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=(400, 3))
    keep = np.ones((400, 3), bool)
    keep[:100, 1] = False
    keep[:300, 2] = False
    v[~keep] = np.inf  # never looked at
    b = compare.band(v, keep)
    for k, start in enumerate((0, 100, 300)):
        col = v[start:, k]
        assert b.mean[k] == pytest.approx(col.mean(), rel=1e-12)
        assert b.se[k] == pytest.approx(col.std(ddof=1) / math.sqrt(col.size), rel=1e-12)
        assert b.median[k] == pytest.approx(np.median(col), rel=1e-12)
    keep[:, 2] = False
    with pytest.raises(ValueError, match="no kept entry"):
        compare.band(v, keep)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="finite is empty"):
        compare.compare_samples([], [1.0, 2.0])
    with pytest.raises(ValueError, match="sde holds 1 non-finite"):
        compare.compare_samples([1.0, 2.0], [1.0, np.nan])


def test_stopped_fraction_and_power_law():
    stopped = np.array([True, False, False, False])
    assert sde.Ensemble(np.zeros(1), np.zeros((4, 1)), stopped, np.zeros(4)).stopped_fraction == 0.25
    x = np.array([32, 64, 128, 256])
    p, c = compare.fit_power_law(x, 3.0 * x**-0.5)
    assert abs(p + 0.5) < 1e-12 and abs(c - 3.0) < 1e-10


def test_compare_moments_standard_errors_are_calibrated():
    """For Gaussian samples SE(mean) = sigma / sqrt(n) and SE(var) = sigma^2 sqrt(2 / n)
    (closed forms), and z-scores of two samples of one law are standard normal."""
    rng = np.random.default_rng(0)
    a, b = 2.0 * rng.standard_normal(200_000), 2.0 * rng.standard_normal(100_000) + 0.05
    m = sde.compare_moments(a, b)
    assert m["mean"].se == pytest.approx(2.0 * np.sqrt(1 / 200_000 + 1 / 100_000), rel=0.01)
    assert m["var"].se == pytest.approx(4.0 * np.sqrt(2 / 200_000 + 2 / 100_000), rel=0.02)
    assert m["mean"].z == pytest.approx(-0.05 / m["mean"].se, abs=5)  # the shift is seen
    assert abs(m["mean"].z) > 5 and abs(m["var"].z) < 5
    z = np.array([[v.z for v in sde.compare_moments(rng.standard_normal(500), rng.standard_normal(500)).values()]
                  for _ in range(400)])
    assert abs(z.mean(0)).max() < 5 / np.sqrt(400) and np.all(abs(z.std(0) - 1) < 0.15)

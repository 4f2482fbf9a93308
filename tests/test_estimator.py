"""The one-layer coefficient estimator (sde.estimate_coefficients): exact cases, calibrated standard
errors, chunking invariance, the width extrapolation, and the exact Gram-level attention
sampler against the finite-network Monte Carlo."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sde._theory import coefficients as C
from sde import AttentionTransition, CoefficientEstimate, GramTransition, estimate_coefficients
from sde._estimator import extrapolate
from sde._mc.gram_maps import gram_map
from shaped_attn.config import shaped_config

SLOW = pytest.mark.skipif(not os.environ.get("SHAPED_ATTN_SLOW"), reason="set SHAPED_ATTN_SLOW=1")

V3 = np.array([[1.0, 0.3, -0.2], [0.3, 0.8, 0.1], [-0.2, 0.1, 1.2]])


def linear_layer(key, X):
    """``X W / sqrt(n)`` with fresh ``W ~ N(0, I)``: E[V_1 | V] = V and
    n Cov(V_1 | V) = Sigma_lin(V) exactly at every width (Wishart moments)."""
    return gram_map(jax.random.normal(key, X.shape, X.dtype))(X)


def test_linear_layer_is_exact():
    est = estimate_coefficients(linear_layer, V3, width=16, num_samples=40_000, key=jax.random.key(0))
    assert isinstance(est, CoefficientEstimate) and est.width == 16 and est.num_samples == 40_000
    assert est.drift.shape == (6,) and est.diffusion.shape == (6, 6)
    zb, zs = est.z_scores(np.zeros((3, 3)), np.asarray(C.sigma_lin(jnp.asarray(V3))))
    assert np.max(np.abs(zb)) < 5 and np.max(np.abs(zs)) < 5
    # The test can fail: a diffusion off by 5% is rejected.
    _, zs_wrong = est.z_scores(np.zeros(6), 1.05 * np.asarray(C.sigma_lin(jnp.asarray(V3))))
    assert np.max(np.abs(zs_wrong)) > 5


def test_standard_errors_are_calibrated():
    """The spread of independent estimates matches the reported standard errors."""
    reps = [
        estimate_coefficients(linear_layer, V3, width=8, num_samples=1000, key=jax.random.key(100 + r),
                              chunk_size=1000)
        for r in range(40)
    ]
    drift = np.stack([e.drift for e in reps])
    diff = np.stack([e.diffusion[np.triu_indices(6)] for e in reps])
    se_b = np.sqrt(np.mean(np.stack([e.drift_se for e in reps]) ** 2, axis=0))
    se_s = np.sqrt(np.mean(np.stack([e.diffusion_se[np.triu_indices(6)] for e in reps]) ** 2, axis=0))
    ratio_b = drift.std(axis=0, ddof=1) / se_b
    ratio_s = diff.std(axis=0, ddof=1) / se_s
    assert 0.8 < np.sqrt(np.mean(ratio_b**2)) < 1.25
    assert 0.8 < np.sqrt(np.mean(ratio_s**2)) < 1.25
    assert np.all((ratio_b > 0.55) & (ratio_b < 1.6)) and np.all((ratio_s > 0.55) & (ratio_s < 1.6))


def test_results_do_not_depend_on_chunking():
    a = estimate_coefficients(linear_layer, V3, width=8, num_samples=3000, key=jax.random.key(3), chunk_size=1000)
    b = estimate_coefficients(linear_layer, V3, width=8, num_samples=3000, key=jax.random.key(3), chunk_size=700)
    np.testing.assert_allclose(a.drift, b.drift, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.diffusion, b.diffusion, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.diffusion_se, b.diffusion_se, rtol=1e-7)


def _fake(width, drift, se):
    d = np.asarray(drift, float)
    return CoefficientEstimate(drift=d, drift_se=np.full_like(d, se), diffusion=np.diag(d),
                               diffusion_se=np.full((d.size, d.size), se), width=width, num_samples=10)


def test_extrapolation_is_weighted_least_squares():
    # Exact data on est(n) = c0 + c1 n^-1/2 are recovered exactly, with chi2 = 0.
    c0, c1 = np.array([0.5, -1.0]), np.array([3.0, 2.0])
    ests = [_fake(n, c0 + c1 / np.sqrt(n), 0.1) for n in (16, 64, 256)]
    ex = extrapolate(ests)
    assert ex.width == np.inf and ex.widths == (16, 64, 256) and ex.dof == 1
    np.testing.assert_allclose(ex.drift, c0, atol=1e-12)
    np.testing.assert_allclose(ex.drift_slope, c1, atol=1e-11)
    np.testing.assert_allclose(ex.drift_chi2, 0, atol=1e-18)
    # Two widths: c0 = (x2 y1 - x1 y2) / (x2 - x1), SE = sqrt(x2^2 s1^2 + x1^2 s2^2) / |x2 - x1|.
    y1, y2, s1, s2, n1, n2 = 1.3, 1.1, 0.2, 0.3, 25, 100
    e1, e2 = _fake(n1, [y1], s1), _fake(n2, [y2], s2)
    ex = extrapolate([e1, e2])
    x1, x2 = n1**-0.5, n2**-0.5
    assert ex.drift[0] == pytest.approx((x2 * y1 - x1 * y2) / (x2 - x1))
    assert ex.drift_se[0] == pytest.approx(np.hypot(x2 * s1, x1 * s2) / abs(x2 - x1))
    ex1 = extrapolate([e1, e2], bias_exponent=1.0)
    assert ex1.drift[0] == pytest.approx((y1 / n2 - y2 / n1) / (1 / n2 - 1 / n1))
    with pytest.raises(ValueError, match="2 widths"):
        extrapolate([e1])


def test_widths_run_and_extrapolate():
    est = estimate_coefficients(linear_layer, V3, widths=(8, 16), num_samples=(4000, 4000),
                                key=jax.random.key(5))
    assert est.width == np.inf and len(est.per_width) == 2
    assert [e.width for e in est.per_width] == [8, 16]
    zb, zs = est.z_scores(np.zeros(6), np.asarray(C.sigma_lin(jnp.asarray(V3))))
    assert np.max(np.abs(zb)) < 5 and np.max(np.abs(zs)) < 5


def test_block_kinds_and_errors():
    cfg = functools.partial(shaped_config, gamma=0.5, sublayers="attention", query_init="zero")
    # W_Q = 0: A = I exactly, E[V_1 | V] = V and the diffusion is gamma^2 (2 - gamma^2) Sigma_lin.
    for block in (cfg, cfg(8), AttentionTransition(cfg)):
        est = estimate_coefficients(block, V3, width=16, num_samples=20_000, key=jax.random.key(1))
        k_lin = 0.25 * (2 - 0.25)
        zb, zs = est.z_scores(np.zeros(6), k_lin * np.asarray(C.sigma_lin(jnp.asarray(V3))))
        assert np.max(np.abs(zb)) < 5 and np.max(np.abs(zs)) < 5
    with pytest.raises(ValueError, match="required positional"):
        estimate_coefficients(lambda a, b, c: a, V3, width=8, num_samples=10, key=jax.random.key(0))
    with pytest.raises(ValueError, match="must be a BlockConfig"):
        estimate_coefficients(3, V3, width=8, num_samples=10, key=jax.random.key(0))
    with pytest.raises(ValueError, match="give width"):
        estimate_coefficients(linear_layer, V3, num_samples=10, key=jax.random.key(0))
    with pytest.raises(ValueError, match="not one of widths"):
        estimate_coefficients(linear_layer, V3, width=4, widths=(8, 16), num_samples=10, key=jax.random.key(0))
    with pytest.raises(ValueError, match="positive semi-definite"):
        estimate_coefficients(linear_layer, -np.eye(2), width=8, num_samples=10, key=jax.random.key(0))
    with pytest.raises(NotImplementedError, match="GramTransition needs a function or a subclass"):
        GramTransition()(jax.random.key(0), jnp.eye(2), 4)


@pytest.mark.parametrize(
    "activation, heads, out_proj",
    [("sin2max_shifted", 2, True), pytest.param("softmax", 2, False, marks=[pytest.mark.slow, SLOW])],
)
def test_attention_transition_matches_finite_sampler(activation, heads, out_proj):
    """The exact O(H m^3) kernel and the Gram sampler of the real block (m x n features)
    have the same one-layer moments: two-sample z-scores below 5."""
    cfg = functools.partial(shaped_config, gamma=0.8, tau0=0.5, sublayers="attention",
                            activation=activation, num_heads=heads, out_proj=out_proj)
    kw = dict(width=32, num_samples=60_000, chunk_size=10_000)
    a = estimate_coefficients(cfg, V3, key=jax.random.key(11), **kw)
    b = estimate_coefficients(AttentionTransition(cfg), V3, key=jax.random.key(12), **kw)
    zb = (a.drift - b.drift) / np.hypot(a.drift_se, b.drift_se)
    zs = (a.diffusion - b.diffusion) / np.hypot(a.diffusion_se, b.diffusion_se)
    assert np.max(np.abs(zb)) < 5 and np.max(np.abs(zs)) < 5
    np.testing.assert_allclose(a.drift_se, b.drift_se, rtol=0.05)

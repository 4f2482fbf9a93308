"""Drift and diffusion of the covariance SDE against an independent index-form transcription.

The reference below is written from the definitions with explicit loops over indices
(docs/sde.md §2-5; Noci et al. arXiv 2306.17759, Thm 3.2 / App. C.2; Li et al.
arXiv 2206.02768) and never calls the package's matrix form. Closed forms are docs/sde.md §9.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde
from helpers import random_psd
from sde._theory import coefficients as C
from sde._helpers.symmetric import num_upper, upper_indices
from sde._theory.coefficients import acal, arccos, drift_attention, drift_relu, relu_nu, sigma_lin
from sde._theory.correlation import correlation_diffusion, correlation_drift
from sde._theory.params import BLOCKS

# --------------------------------------------------------------------------- index-form reference


def _ref_nu(rho, c_plus, c_minus):
    rho = min(1.0, max(-1.0, rho))
    return (c_plus - c_minus) ** 2 / (2 * math.pi) * (math.sqrt(1 - rho * rho) - rho * math.acos(rho))


def ref_coefficients(V, gamma, tau0, c_plus, c_minus, block, heads):
    """Drift (m, m) and diffusion (D, D) by explicit loops over indices."""
    V = np.asarray(V, dtype=np.float64)
    m = V.shape[0]
    P = [[(1.0 if c == d else 0.0) - 1.0 / m for d in range(m)] for c in range(m)]
    # F_cd = V_cd - Vbar_c. - Vbar_.d + Vbar_..
    rbar = [sum(V[c, d] for d in range(m)) / m for c in range(m)]
    cbar = [sum(V[c, d] for c in range(m)) / m for d in range(m)]
    gbar = sum(V[c, d] for c in range(m) for d in range(m)) / m**2
    F = [[V[c, d] - rbar[c] - cbar[d] + gbar for d in range(m)] for c in range(m)]
    trVF = sum(V[c, d] * F[d][c] for c in range(m) for d in range(m))
    trF = sum(F[c][c] for c in range(m))
    g = [F[c][c] - trF / m for c in range(m)]
    Vg = [sum(V[a, c] * g[c] for c in range(m)) for a in range(m)]
    att = not math.isinf(tau0)
    b_att = np.zeros((m, m))
    if att:
        for a in range(m):
            for b in range(m):
                b_att[a, b] = (gamma**2 / tau0**2) * (
                    V[a, b] * trVF / m**2 + (V[a, a] * Vg[b] + Vg[a] * V[b, b]) / (2 * m)
                )
    # G = V P V P V / m^2 as a five-fold index sum
    G = np.zeros((m, m))
    for a, b in itertools.product(range(m), repeat=2):
        G[a, b] = (
            sum(
                V[a, c] * P[c][d] * V[d, e] * P[e][f] * V[f, b]
                for c, d, e, f in itertools.product(range(m), repeat=4)
            )
            / m**2
        )
    b_relu = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            s = math.sqrt(V[a, a] * V[b, b])
            b_relu[a, b] = _ref_nu(V[a, b] / s, c_plus, c_minus) * s
    pairs = [(a, b) for a in range(m) for b in range(a, m)]
    D = len(pairs)
    lin = np.zeros((D, D))
    acal = np.zeros((D, D))
    for p, (a, b) in enumerate(pairs):
        for q, (d, w) in enumerate(pairs):
            lin[p, q] = V[a, d] * V[b, w] + V[a, w] * V[b, d]
            acal[p, q] = V[a, d] * G[b, w] + G[a, d] * V[b, w] + V[a, w] * G[b, d] + G[a, w] * V[b, d]
    g2 = gamma**2
    acal_c = g2**2 / (tau0**2 * heads) if att else 0.0
    if block == "attention":
        return b_att, g2 * (2 - g2) * lin + acal_c * acal
    if block == "mlp":
        return g2 * b_relu, 2 * g2 * lin
    return b_att + g2 * b_relu, g2 * (4 - g2) * lin + acal_c * acal


PARAM_SETS = [
    dict(gamma=1.0, tau0=1.0, c_plus=0.0, c_minus=-1.0),
    dict(gamma=0.35, tau0=0.5, c_plus=0.3, c_minus=-0.7),
    dict(gamma=0.8, tau0=2.5, c_plus=-0.2, c_minus=0.4),
    dict(gamma=0.6, tau0=math.inf, c_plus=0.0, c_minus=-1.0),
]


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("block", BLOCKS)
def test_matches_index_form(m, block):
    rng = np.random.default_rng(100 + m)
    for k, ps in enumerate(PARAM_SETS):
        heads = 1 + (k % 3)
        params = sde.SDEParams(**ps, block=block, heads=heads)
        V = random_psd(rng, m)
        b_ref, S_ref = ref_coefficients(V, **ps, block=block, heads=heads)
        b = np.asarray(sde.drift(jnp.asarray(V), params))
        S = np.asarray(sde.diffusion_matrix(jnp.asarray(V), params))
        scale_b = max(1.0, np.max(np.abs(b_ref)))
        scale_S = max(1.0, np.max(np.abs(S_ref)))
        np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-12 * scale_b)
        np.testing.assert_allclose(S, S_ref, rtol=0, atol=1e-12 * scale_S)


def test_index_form_detects_sign_error():
    """The reference is sensitive to the main-text sign typo (Eq. 8): flipping the second
    term of the bracket changes the drift for m >= 3 (sanity check of test power)."""
    rng = np.random.default_rng(0)
    V = jnp.asarray(random_psd(rng, 3))
    params = sde.SDEParams(0.7, 1.0, block="attention")
    b_ref, _ = ref_coefficients(V, 0.7, 1.0, 0.0, -1.0, "attention", 1)
    m = 3
    F = C.centre(V)
    dF = jnp.diagonal(F)
    g = dF - jnp.mean(dF)
    outer = jnp.diag(V)[:, None] * (V @ g)[None, :]
    flipped = 0.49 * (V * jnp.sum(V * F) / m**2 - (outer + outer.T) / (2 * m))
    assert np.max(np.abs(np.asarray(flipped) - b_ref)) > 1e-3
    np.testing.assert_allclose(np.asarray(sde.drift(V, params)), b_ref, atol=1e-12)


@pytest.mark.parametrize("block", BLOCKS)
def test_batched_and_jit(block):
    rng = np.random.default_rng(7)
    m = 3
    Vs = np.stack([random_psd(rng, m) for _ in range(6)]).reshape(2, 3, m, m)
    ps = PARAM_SETS[1]
    params = sde.SDEParams(**ps, block=block, heads=2)
    b = np.asarray(jax.jit(sde.drift, static_argnums=1)(jnp.asarray(Vs), params))
    S = np.asarray(jax.jit(sde.diffusion_matrix, static_argnums=1)(jnp.asarray(Vs), params))
    assert b.shape == (2, 3, m, m) and S.shape == (2, 3, 6, 6)
    for i, j in itertools.product(range(2), range(3)):
        b_ref, S_ref = ref_coefficients(Vs[i, j], **ps, block=block, heads=2)
        np.testing.assert_allclose(b[i, j], b_ref, atol=1e-12 * max(1, np.abs(b_ref).max()))
        np.testing.assert_allclose(S[i, j], S_ref, atol=1e-12 * max(1, np.abs(S_ref).max()))
    bv = jax.vmap(lambda V: sde.drift(V, params))(jnp.asarray(Vs[0]))
    np.testing.assert_allclose(np.asarray(bv), b[0], atol=1e-13)


def test_upper_triangle_helpers():
    rows, cols = upper_indices(3)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    rng = np.random.default_rng(1)
    A = rng.standard_normal((2, 4, 4))
    A = A + np.swapaxes(A, -1, -2)
    v = sde.sym_to_vec(jnp.asarray(A))
    assert v.shape == (2, 10)
    np.testing.assert_array_equal(np.asarray(sde.vec_to_sym(v)), A)
    assert num_upper(5) == 15
    with pytest.raises(ValueError, match="D=7"):
        sde.vec_to_sym(jnp.zeros(7))


# --------------------------------------------------------------------------- closed forms (section 5)


def test_m1_no_attention_terms():
    V = jnp.array([[2.3]])
    for block in BLOCKS:
        p = sde.SDEParams(0.9, 0.3, block=block)
        assert float(drift_attention(V, p)[0, 0]) == 0.0
        assert float(acal(V)[0, 0]) == 0.0
        assert float(sde.drift(V, p)[0, 0]) == 0.0
        # m = 1: dV = sqrt(2 k_lin) V dW; full block kappa = gamma^2 (4 - gamma^2)
        np.testing.assert_allclose(float(sde.diffusion_matrix(V, p)[0, 0]), 2 * p.k_lin * 2.3**2)
    assert sde.SDEParams(0.9, block="transformer").k_lin == pytest.approx(0.81 * (4 - 0.81))


def test_m2_attention_drift_closed_form():
    rng = np.random.default_rng(2)
    for _ in range(5):
        V = random_psd(rng, 2)
        gamma, tau0 = rng.uniform(0.2, 1.0), rng.uniform(0.3, 3.0)
        p = sde.SDEParams(gamma, tau0, block="attention")
        q = (V[0, 0] + V[1, 1] - 2 * V[0, 1]) / 2
        expected = gamma**2 / (4 * tau0**2) * q**2 * V
        np.testing.assert_allclose(np.asarray(drift_attention(jnp.asarray(V), p)), expected, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(sde.drift(jnp.asarray(V), p)), expected, rtol=1e-12)


def test_homogeneity_and_temperature_scaling():
    rng = np.random.default_rng(3)
    V = jnp.asarray(random_psd(rng, 4))
    p = sde.SDEParams(0.7, 1.3)
    s = 2.7
    np.testing.assert_allclose(drift_attention(s * V, p), s**3 * drift_attention(V, p), rtol=1e-12)
    # Sigma_lin is homogeneous of degree 2, Acal of degree 4 (G = V P V P V / m^2 is cubic), so
    # Sigma = k_lin Sigma_lin + acal_coeff Acal is homogeneous of degree 2 only without
    # attention (degree 2 holds for Sigma_lin only; docs/sde.md §9).
    np.testing.assert_allclose(sigma_lin(s * V), s**2 * sigma_lin(V), rtol=1e-12)
    np.testing.assert_allclose(acal(s * V), s**4 * acal(V), rtol=1e-12)
    np.testing.assert_allclose(
        sde.diffusion_matrix(s * V, p),
        s**2 * p.k_lin * sigma_lin(V) + s**4 * p.acal_coeff * acal(V),
        rtol=1e-12,
    )
    pm = sde.SDEParams(0.7, block="mlp")
    np.testing.assert_allclose(sde.diffusion_matrix(s * V, pm), s**2 * sde.diffusion_matrix(V, pm), rtol=1e-12)
    # Acal's coefficient scales as tau0^-2, like b_att
    np.testing.assert_allclose(
        sde.SDEParams(0.7, 2.6).acal_coeff, p.acal_coeff / 4, rtol=1e-14
    )
    np.testing.assert_allclose(drift_relu(s * V, p), s * drift_relu(V, p), rtol=1e-12, atol=1e-14)
    p2 = sde.SDEParams(0.7, 2.6)
    np.testing.assert_allclose(drift_attention(V, p2), drift_attention(V, p) / 4, rtol=1e-12)
    # tau0 -> inf: no attention drift, no Acal
    pinf = sde.SDEParams(0.7, math.inf)
    assert float(jnp.max(jnp.abs(drift_attention(V, pinf)))) == 0.0
    assert pinf.acal_coeff == 0.0
    np.testing.assert_allclose(
        sde.diffusion_matrix(V, pinf), pinf.k_lin * sigma_lin(V), rtol=1e-14
    )
    np.testing.assert_allclose(
        sde.drift(V, pinf), pinf.gamma**2 * drift_relu(V, pinf), rtol=1e-14
    )
    # large but finite tau0 approaches the limit continuously
    pbig = sde.SDEParams(0.7, 1e6)
    assert float(jnp.max(jnp.abs(sde.diffusion_matrix(V, pbig) - sde.diffusion_matrix(V, pinf)))) < 1e-9


def test_arccos_matches_numpy():
    x = np.concatenate([np.linspace(-1, 1, 100_001), [0.5, -0.5, np.nextafter(0.5, 1), np.nextafter(1, 0)]])
    np.testing.assert_allclose(np.asarray(arccos(jnp.asarray(x))), np.arccos(x), rtol=0, atol=1e-15)
    x32 = x.astype(np.float32)
    out32 = arccos(jnp.asarray(x32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out32), np.arccos(x32.astype(np.float64)), rtol=0, atol=1e-6)


def test_relu_nu_values():
    for cp, cm in [(0.0, -1.0), (0.5, 0.2), (-0.3, 0.9)]:
        assert float(relu_nu(jnp.array(1.0), cp, cm)) == pytest.approx(0.0, abs=1e-15)
        assert float(relu_nu(jnp.array(0.0), cp, cm)) == pytest.approx((cp - cm) ** 2 / (2 * math.pi))
        assert float(relu_nu(jnp.array(-1.0), cp, cm)) == pytest.approx((cp - cm) ** 2 / 2)
    # diagonal of b_relu is zero (nu(1) = 0), off-diagonal positive for c_plus != c_minus
    V = jnp.asarray(random_psd(np.random.default_rng(4), 3))
    b = drift_relu(V, sde.SDEParams(0.5))
    assert np.all(np.diag(np.asarray(b)) == 0.0)
    assert np.all(np.asarray(b)[~np.eye(3, dtype=bool)] > 0)


def test_heads_divide_acal_only():
    V = jnp.asarray(random_psd(np.random.default_rng(5), 3))
    p1 = sde.SDEParams(0.6, 0.8, heads=1)
    p4 = sde.SDEParams(0.6, 0.8, heads=4)
    np.testing.assert_allclose(sde.drift(V, p4), sde.drift(V, p1), rtol=1e-14)
    np.testing.assert_allclose(
        sde.diffusion_matrix(V, p4) - p4.k_lin * sigma_lin(V),
        (sde.diffusion_matrix(V, p1) - p1.k_lin * sigma_lin(V)) / 4,
        rtol=1e-12,
    )


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_correlation_sde_is_ito_image_of_matrix_sde(gamma):
    """The 1-d correlation SDE (docs/sde.md §8) equals Ito's formula applied to
    rho = V12 / sqrt(V11 V22) under the m = 2 MLP matrix SDE, computed here with jax
    derivatives of rho and the package's drift / diffusion_matrix (an exact check)."""
    p = sde.SDEParams(gamma, block="mlp", c_plus=0.2, c_minus=-0.9)
    rows, cols = upper_indices(2)

    def rho_of_vec(v):
        return v[1] / jnp.sqrt(v[0] * v[2])

    for V in [np.array([[1.0, 0.3], [0.3, 2.0]]), np.array([[0.5, -0.4], [-0.4, 0.7]])]:
        V = jnp.asarray(V)
        v = sde.sym_to_vec(V)
        grad = jax.grad(rho_of_vec)(v)
        hess = jax.hessian(rho_of_vec)(v)
        b = sde.sym_to_vec(sde.drift(V, p))
        S = sde.diffusion_matrix(V, p)
        ito_drift = grad @ b + 0.5 * jnp.sum(hess * S)
        ito_var = grad @ S @ grad
        rho = rho_of_vec(v)
        np.testing.assert_allclose(float(correlation_drift(rho, p)), float(ito_drift), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(correlation_diffusion(rho, p)) ** 2, float(ito_var), rtol=1e-12)
        # the explicit residual form of docs/sde.md §8
        nu = float(relu_nu(rho, 0.2, -0.9))
        r = float(rho)
        assert float(correlation_drift(rho, p)) == pytest.approx(gamma**2 * (nu - r * (1 - r * r)), rel=1e-12)
    with pytest.raises(ValueError, match="block"):
        correlation_drift(jnp.array(0.1), sde.SDEParams(0.5, block="transformer"))


# --------------------------------------------------------------------------- params validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=1.5), r"gamma=1.5 is outside \(0, 1\]"),
        (dict(gamma=0.0), r"gamma=0.0 is outside \(0, 1\]"),
        (dict(gamma=math.nan), "gamma=nan"),
        (dict(gamma=0.5, tau0=0.0), r"tau0=0.0 is outside \(0, inf\]"),
        (dict(gamma=0.5, tau0=-1.0), "tau0=-1.0"),
        (dict(gamma=0.5, tau0=math.nan), "tau0=nan"),
        (dict(gamma=0.5, c_plus=math.inf), "c_plus=inf"),
        (dict(gamma=0.5, c_minus="a"), "c_minus='a'"),
        (dict(gamma=0.5, block="rnn"), "block='rnn'"),
        (dict(gamma=0.5, heads=0), "heads=0"),
        (dict(gamma=0.5, heads=1.5), "heads=1.5"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sde.SDEParams(**kwargs)


def test_params_hashable_and_coefficients():
    p = sde.SDEParams(0.5, 2.0, heads=2)
    assert hash(p) == hash(sde.SDEParams(0.5, 2, heads=2))
    assert p.k_lin == pytest.approx(0.25 * 3.75)
    assert p.acal_coeff == pytest.approx(0.0625 / (4 * 2))
    assert p.attention_drift_coeff == pytest.approx(0.25 / 4)
    assert p.relu_drift_coeff == pytest.approx(0.25)
    pm = sde.SDEParams(0.5, block="mlp")
    assert pm.attention_drift_coeff == 0.0 and pm.acal_coeff == 0.0 and pm.k_lin == 0.5
    pa = sde.SDEParams(0.5, block="attention")
    assert pa.relu_drift_coeff == 0.0 and pa.k_lin == pytest.approx(0.25 * 1.75)


@pytest.mark.parametrize("xp", [np, jnp])
def test_correlation_of_tiny_and_zero_variances(xp):
    """float32 variances of 1e-30 (their product underflows) still give the right rho; a zero
    variance gives rho = 0 off the diagonal, never NaN."""
    base = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.0], [0.0, 0.0, 0.0]])
    rho = np.asarray(C.correlation(xp.asarray(1e-30 * base, dtype=xp.float32)))
    expected = np.array([[1.0, 0.6, 0.0], [0.6, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(rho, expected, rtol=1e-6)

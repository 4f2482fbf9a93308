"""Structured and generic noise against diffusion_matrix (docs/noise.md §1-2).

Exact checks use linearity: N is linear in the Gaussian input, so its covariance is J J^T with
J the Jacobian (jax.jacfwd). Monte Carlo checks compare every entry of the empirical covariance
with a tolerance of 5 standard errors estimated from the data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sde
from sde._helpers.linalg import SMALL_CHOLESKY_M, eigh_factor, factor_and_check, psd_factor, small_cholesky
from sde._theory.coefficients import acal, attention_gram, sigma_lin
from sde._theory.noise import attention_factor, generic_noise, noise_dim, noise_from_normals, sample_noise_generic, structured_noise
from helpers import random_psd, se_mean

BOUNDARY = {
    "rank1": np.outer([1.0, -0.5, 2.0], [1.0, -0.5, 2.0]),
    "rho1": np.array([[1.0, 1.0], [1.0, 1.0]]),
    "rank2_of_4": 2 * random_psd(9, 4, rank=2),  # A A^T, A (4, 2) standard normal
}


def structured_covariance(V, params, factor="eigh"):
    """Exact covariance of the upper triangle of the structured noise: N is linear in (Z1, Z2),
    so its Jacobian J has columns N(e_k) for the basis inputs e_k, and Cov = J J^T."""
    m = V.shape[-1]
    L = psd_factor(V, factor)
    basis = jnp.eye(2 * m * m, dtype=V.dtype).reshape(-1, 2, m, m)
    Vb = jnp.broadcast_to(V, (2 * m * m, m, m))
    Lb = jnp.broadcast_to(L, (2 * m * m, m, m))
    J = sde.sym_to_vec(structured_noise(Vb, Lb, basis[:, 0], basis[:, 1], params)).T
    return J @ J.T


def generic_covariance(V, params):
    D = V.shape[-1] * (V.shape[-1] + 1) // 2
    Vb = jnp.broadcast_to(V, (D,) + V.shape)
    J = sde.sym_to_vec(generic_noise(Vb, jnp.eye(D, dtype=V.dtype), params)).T
    return J @ J.T


def test_jacobian_by_basis_equals_jacfwd():
    V = jnp.asarray(random_psd(np.random.default_rng(0), 3))
    p = sde.SDEParams(0.8, 0.7)
    L = eigh_factor(V)
    f = lambda z: sde.sym_to_vec(structured_noise(V, L, z[0], z[1], p))
    J = jax.jacfwd(f)(jnp.zeros((2, 3, 3))).reshape(-1, 18)
    np.testing.assert_allclose(J @ J.T, structured_covariance(V, p), atol=1e-12)


PARAMS = [
    sde.SDEParams(1.0, 1.0),
    sde.SDEParams(0.4, 0.3, block="attention", heads=3),
    sde.SDEParams(0.7, math.inf),
    sde.SDEParams(0.6, 2.0, block="mlp"),
]


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("factor", ["eigh", "cholesky"])
def test_structured_covariance_exact(m, factor):
    """Cov(upper(N)) = diffusion_matrix to 1e-10 (relative to its scale), all blocks, heads,
    tau0 = inf, m = 1..5; also for the generic route."""
    rng = np.random.default_rng(m)
    for params in PARAMS:
        V = jnp.asarray(random_psd(rng, m))
        S = sde.diffusion_matrix(V, params)
        cov = structured_covariance(V, params, factor)
        np.testing.assert_allclose(cov, S, rtol=0, atol=1e-10 * max(1.0, float(jnp.max(jnp.abs(S)))))
        np.testing.assert_allclose(
            generic_covariance(V, params), S, rtol=0, atol=1e-10 * max(1.0, float(jnp.max(jnp.abs(S))))
        )


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_noise_from_normals_covariance_exact(m):
    """The solver's economical form (symmetric S from m(m+1)/2 normals, then Z2) has exactly the
    covariance diffusion_matrix; its input length is noise_dim."""
    rng = np.random.default_rng(20 + m)
    for params in PARAMS:
        V = jnp.asarray(random_psd(rng, m))
        L = psd_factor(V, "cholesky")
        k = noise_dim(m, params)
        D = m * (m + 1) // 2
        assert k == (D + m * m if (params.acal_coeff > 0 and m > 1) else D)
        basis = jnp.eye(k)
        Vb, Lb = jnp.broadcast_to(V, (k, m, m)), jnp.broadcast_to(L, (k, m, m))
        J = sde.sym_to_vec(noise_from_normals(Vb, Lb, basis, params)).T
        S = sde.diffusion_matrix(V, params)
        np.testing.assert_allclose(J @ J.T, S, rtol=0, atol=1e-10 * max(1.0, float(jnp.max(jnp.abs(S)))))


def test_structured_covariance_detects_wrong_scaling():
    """Power check: dropping the 1/sqrt(2) of the Sigma_lin part, or using M = L instead of
    M = V P L / m, gives a covariance that differs from diffusion_matrix far beyond 1e-10."""
    V = jnp.asarray(random_psd(np.random.default_rng(0), 3))
    p = sde.SDEParams(0.8, 0.7)
    L = eigh_factor(V)
    S = sde.diffusion_matrix(V, p)

    def cov_of(noise_fn):
        J = jax.jacfwd(lambda z: sde.sym_to_vec(noise_fn(z)))(jnp.zeros((2, 3, 3))).reshape(-1, 18)
        return J @ J.T

    a, c = math.sqrt(p.k_lin), math.sqrt(p.acal_coeff)
    no_sqrt2 = lambda z: a * L @ (z[0] + z[0].T) @ L.T + c * (L @ z[1] @ L.T + L @ z[1].T @ L.T)
    M = attention_factor(V, L)
    right = lambda z: a / math.sqrt(2) * L @ (z[0] + z[0].T) @ L.T + c * (L @ z[1] @ M.T + M @ z[1].T @ L.T)
    assert float(jnp.max(jnp.abs(cov_of(no_sqrt2) - S))) > 0.1
    np.testing.assert_allclose(cov_of(right), S, atol=1e-10 * float(jnp.max(jnp.abs(S))))


def test_attention_factor_squares_to_G():
    rng = np.random.default_rng(3)
    for m in [2, 4, 6]:
        V = jnp.asarray(random_psd(rng, m))
        for L in [eigh_factor(V), jnp.linalg.cholesky(V)]:
            M = attention_factor(V, L)
            np.testing.assert_allclose(M @ M.T, attention_gram(V), atol=1e-12)


@pytest.mark.parametrize("name", list(BOUNDARY))
def test_boundary_psd(name):
    """Singular V (rank-1, rho = 1, rank 2 of 4): plain Cholesky fails; the eigh factor and the
    Cholesky route (with its eigh fallback) are exact, and the PSD check passes."""
    V = jnp.asarray(BOUNDARY[name])
    p = sde.SDEParams(0.9, 0.8)
    S = sde.diffusion_matrix(V, p)
    tol = 1e-10 * float(jnp.max(jnp.abs(S)))
    assert not np.all(np.isfinite(np.asarray(jnp.linalg.cholesky(V))))  # plain Cholesky fails
    for factor in ["eigh", "cholesky"]:
        np.testing.assert_allclose(structured_covariance(V, p, factor), S, atol=tol)
        L, ok = factor_and_check(V, 1e-12, factor)
        assert bool(ok) and np.all(np.isfinite(np.asarray(L)))
        np.testing.assert_allclose(L @ L.T, V, atol=1e-12)
    np.testing.assert_allclose(generic_covariance(V, p), S, atol=tol)
    # a batch mixing boundary and interior matrices: Cholesky where it works, eigh elsewhere
    Vi = jnp.asarray(random_psd(np.random.default_rng(1), V.shape[0]))
    Lb, okb = factor_and_check(jnp.stack([Vi, V]), 1e-12, "cholesky")
    # (the unrolled small-m Cholesky: LAPACK's factor to rounding, not the eigh factor)
    np.testing.assert_allclose(np.asarray(Lb[0]), np.asarray(jnp.linalg.cholesky(Vi)), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(Lb[1] @ Lb[1].T, V, atol=1e-12)
    assert np.all(np.asarray(okb))
    # slightly indefinite V: the check fails below -tol, passes above
    w, Q = np.linalg.eigh(np.asarray(V))
    Vneg = jnp.asarray(V - 1e-6 * np.outer(Q[:, 0], Q[:, 0]))
    assert not bool(factor_and_check(Vneg, 1e-7, "cholesky")[1])
    assert bool(factor_and_check(Vneg, 1e-5, "cholesky")[1])
    assert not bool(factor_and_check(Vneg, 1e-7, "eigh")[1])
    # draws are finite and vanish in the null directions of V (u^T N u = 0 when V u = 0)
    for factor in ["eigh", "cholesky"]:
        N = sde.sample_noise(jax.random.key(0), jnp.broadcast_to(V, (64,) + V.shape), p, factor=factor)
        assert np.all(np.isfinite(np.asarray(N)))
        u = Q[:, 0]
        assert abs(w[0]) < 1e-12
        assert float(jnp.max(jnp.abs(jnp.einsum("i,pij,j->p", u, N, u)))) < 1e-10


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_small_cholesky_matches_lapack_and_falls_back(dtype):
    """The unrolled factor of m <= SMALL_CHOLESKY_M equals LAPACK's to rounding, flags exactly
    the matrices LAPACK fails on (singular, indefinite, non-finite), and factor_and_check then
    takes the eigh fallback for them (on both sides of the size threshold)."""
    rng = np.random.default_rng(5)
    eps = np.finfo(dtype).eps
    cholesky = jax.jit(small_cholesky)  # one program per m (eagerly, every entry is its own program)
    check = jax.jit(factor_and_check, static_argnums=2)
    for m in range(2, SMALL_CHOLESKY_M + 2):
        V = np.stack([random_psd(rng, m) for _ in range(16)]).astype(dtype)
        L, ok = cholesky(jnp.asarray(V))
        assert L.dtype == dtype and np.all(np.asarray(ok))
        ref = np.asarray(jnp.linalg.cholesky(jnp.asarray(V)))
        np.testing.assert_allclose(np.asarray(L), ref, rtol=0, atol=50 * eps * np.abs(ref).max())
        u = rng.standard_normal(m)
        bad = np.stack([np.outer(u, u), -np.eye(m), np.full((m, m), np.nan), np.diag([np.inf] + [1.0] * (m - 1))])
        _, okb = cholesky(jnp.asarray(bad, dtype))
        lapack_ok = np.all(np.isfinite(np.asarray(jnp.linalg.cholesky(jnp.asarray(bad, dtype)))), axis=(1, 2))
        assert not np.any(np.asarray(okb)) and not np.any(lapack_ok)
        # singular PSD (rank 1): the fallback factors it exactly and the PSD check passes
        Vb = jnp.asarray(np.stack([V[0], np.outer(u, u)]).astype(dtype))
        Lf, okf = check(Vb, 10 * eps * np.abs(u).max() ** 2, "cholesky")
        assert np.all(np.asarray(okf))
        np.testing.assert_allclose(np.asarray(Lf[0]), ref[0], rtol=0, atol=50 * eps * np.abs(ref[0]).max())
        np.testing.assert_allclose(np.asarray(Lf[1] @ jnp.swapaxes(Lf[1], -1, -2)), np.outer(u, u),
                                   atol=100 * eps * np.abs(u).max() ** 2)


def _mc_check(draws_vec, S, n_se=5.0):
    """Every entry of the empirical covariance of draws (N, D) within n_se standard errors of S.

    The mean is known to be 0, so cov = mean of products; SE = std(products) / sqrt(N).
    Returns the largest |z| score."""
    x = np.asarray(draws_vec)
    prods = x[:, :, None] * x[:, None, :]
    emp = prods.mean(axis=0)
    se = se_mean(prods, axis=0)
    z = np.abs(emp - np.asarray(S)) / se
    return float(z.max())


@pytest.mark.parametrize("route", ["structured", "generic"])
def test_noise_covariance_monte_carlo(route):
    m, n = 3, 100_000
    V = jnp.asarray(random_psd(np.random.default_rng(11), m))
    p = sde.SDEParams(0.8, 0.6)
    Vb = jnp.broadcast_to(V, (n, m, m))
    key = jax.random.key(2024)
    sampler = sde.sample_noise if route == "structured" else sample_noise_generic
    N = jax.jit(sampler, static_argnums=2)(key, Vb, p)
    assert N.shape == (n, m, m)
    np.testing.assert_array_equal(np.asarray(N), np.asarray(jnp.swapaxes(N, -1, -2)))
    vec = sde.sym_to_vec(N)
    S = sde.diffusion_matrix(V, p)
    assert _mc_check(vec, S) < 5.0
    # the same data reject a 10% error in k_lin or a 50% error in the Acal coefficient (power)
    wrong = 1.1 * p.k_lin * sigma_lin(V) + p.acal_coeff * acal(V)
    assert _mc_check(vec, wrong) > 5.0
    wrong = p.k_lin * sigma_lin(V) + 1.5 * p.acal_coeff * acal(V)
    assert _mc_check(vec, wrong) > 5.0
    # mean zero
    mean = np.asarray(vec).mean(axis=0)
    se = se_mean(vec, axis=0)
    assert np.all(np.abs(mean) < 5 * se)


def test_sample_noise_dtype_and_batching():
    V = jnp.asarray(random_psd(np.random.default_rng(1), 4), dtype=jnp.float32)
    p = sde.SDEParams(0.5)
    N = sde.sample_noise(jax.random.key(0), jnp.broadcast_to(V, (2, 3, 4, 4)), p)
    assert N.dtype == jnp.float32 and N.shape == (2, 3, 4, 4)
    assert not np.allclose(np.asarray(N[0, 0]), np.asarray(N[0, 1]))  # independent draws
    Ng = sample_noise_generic(jax.random.key(0), V, p)
    assert Ng.dtype == jnp.float32 and Ng.shape == (4, 4)
    with pytest.raises(ValueError, match="factor='qr'"):
        psd_factor(V, "qr")

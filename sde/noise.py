"""Noise of the covariance SDE: the structured O(m^3) route and the generic square-root route.

Structured route (spec/sde.md section 3). With ``L L^T = V`` and ``Z1, Z2`` iid standard
Gaussian ``m x m`` matrices,

    N = sqrt(k_lin / 2) L (Z1 + Z1^T) L^T + c (L Z2 M^T + M Z2^T L^T),   c = sqrt(acal_coeff),

has, over its upper-triangular entries, covariance ``k_lin Sigma_lin(V) + acal_coeff Acal(V)``
= :func:`sde.coefficients.diffusion_matrix` (``acal_coeff = gamma^4 / (tau0^2 H)``, so
``c = gamma^2 / (tau0 sqrt(H))``). Proof: with ``U = L Z M^T``,
``Cov(U_ab, U_dw) = (L L^T)_ad (M M^T)_bw``, ``Cov(U_ab, U_wd) = (L L^T)_aw (M M^T)_bd``, so
``Cov((U + U^T)_ab, (U + U^T)_dw) = V_ad G_bw + V_aw G_bd + G_ad V_bw + G_aw V_bd = Acal[ab, dw]``
when ``M M^T = G``; ``M = L`` gives ``2 Sigma_lin``, hence the ``1/sqrt(2)``. Z1 and Z2 are
independent, so the two covariances add. Diagonal entries are included (``a = b``).

We do not factor ``G`` separately: ``M = V P L / m`` satisfies
``M M^T = V P (L L^T) P V / m^2 = V P V P V / m^2 = G`` exactly, for any ``L`` with ``L L^T = V``
(one factorisation per step, no second eigendecomposition, and ``M`` is exact on the PSD
boundary).

Factor of ``V`` (:func:`psd_factor`): ``"eigh"`` uses the eigendecomposition with eigenvalues
clipped at 0 (exact for PSD ``V``, including singular ``V``; for slightly indefinite ``V`` it
factors the PSD part ``V_+``). ``"cholesky"`` uses ``chol(V)`` and falls back to ``"eigh"``
where Cholesky fails (singular or slightly indefinite ``V``; JAX returns NaN there), so it is
exact on the PSD boundary too. On CPU Cholesky is 5-15x faster than ``eigh`` for the small
matrices used here, so the solver uses it by default; the fallback runs only when some path
of a chunk needs it.

Generic route: build ``Sigma(V)`` (``D x D``, ``D = m (m + 1) / 2``), take a PSD square root by
``eigh`` with clipped eigenvalues, multiply a standard normal ``D``-vector and map it back to a
symmetric matrix. O(m^6) per draw; it is the reference the structured route is tested against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .coefficients import diffusion_matrix, vec_to_sym
from .params import SDEParams

Array = jax.Array

FACTORS = ("eigh", "cholesky")


# --------------------------------------------------------------------------- factors


def eigh_factor(V: Array) -> Array:
    """``L = Q diag(sqrt(max(w, 0)))`` with ``V = Q diag(w) Q^T``; ``L L^T = V_+`` (PSD part)."""
    w, Q = jnp.linalg.eigh(V)
    return Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]


def factor_and_check(V: Array, tol, factor: str = "cholesky") -> tuple[Array, Array]:
    """A factor ``L`` (``L L^T = V``, or ``V_+`` on the boundary) and ``lambda_min(V) >= -tol``.

    ``factor="eigh"``: eigendecomposition with clipped eigenvalues. ``factor="cholesky"``:
    ``chol(V)`` (success implies ``V`` positive definite, so the check passes); where it fails
    (singular or indefinite ``V``) the eigendecomposition is used instead, for both the factor
    and the check. The fallback runs under ``lax.cond`` only if some matrix of the batch needs
    it (inside a user's ``vmap`` the cond becomes a select, still correct). ``tol`` broadcasts
    against ``V.shape[:-2]``.
    """
    tol = jnp.broadcast_to(jnp.asarray(tol, V.dtype), V.shape[:-2])
    if factor == "eigh":
        w, Q = jnp.linalg.eigh(V)
        return Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :], w[..., 0] >= -tol
    if factor != "cholesky":
        raise ValueError(f"factor={factor!r} is not one of {FACTORS}")
    L0 = jnp.linalg.cholesky(V)
    ok = jnp.all(jnp.isfinite(L0), axis=(-2, -1))

    def fallback(_):
        w, Q = jnp.linalg.eigh(V)
        Le = Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]
        return jnp.where(ok[..., None, None], L0, Le), ok | (w[..., 0] >= -tol)

    return jax.lax.cond(jnp.all(ok), lambda _: (L0, ok), fallback, None)


def psd_factor(V: Array, factor: str = "eigh") -> Array:
    """A matrix ``L`` with ``L L^T = V`` (``V_+`` for slightly indefinite ``V``).

    ``"eigh"``: clipped eigendecomposition. ``"cholesky"``: Cholesky, with the ``"eigh"``
    factor where Cholesky fails (singular ``V``); see :func:`factor_and_check`.
    """
    return factor_and_check(V, 0.0, factor)[0]


def attention_factor(V: Array, L: Array) -> Array:
    """``M = V P L / m`` with ``M M^T = G = V P V P V / m^2`` whenever ``L L^T = V``."""
    m = V.shape[-1]
    PL = L - jnp.mean(L, axis=-2, keepdims=True)
    return (V @ PL) / m


# --------------------------------------------------------------------------- structured route


def structured_noise(V: Array, L: Array, Z1: Array, Z2: Array, params: SDEParams) -> Array:
    """Structured noise ``N`` from a factor ``L`` of ``V`` and Gaussian matrices ``Z1, Z2``.

    ``N = sqrt(k_lin / 2) L (Z1 + Z1^T) L^T + c (L Z2 M^T + M Z2^T L^T)``, ``c^2 = acal_coeff``,
    ``M = V P L / m``. Linear in ``(Z1, Z2)``; all arrays ``(..., m, m)``. ``Z2`` is ignored when
    ``acal_coeff = 0`` (MLP block, ``tau0 = inf``, ``m = 1``).
    """
    a = math.sqrt(params.k_lin / 2.0)
    # X + X^T with X = L (a/2 (Z1 + Z1^T) L^T + c Z2 M^T) equals N; four m x m products.
    inner = (0.5 * a) * ((Z1 + jnp.swapaxes(Z1, -1, -2)) @ jnp.swapaxes(L, -1, -2))
    if params.acal_coeff != 0.0 and V.shape[-1] > 1:
        c = math.sqrt(params.acal_coeff)
        M = attention_factor(V, L)
        inner = inner + c * (Z2 @ jnp.swapaxes(M, -1, -2))
    X = L @ inner
    return X + jnp.swapaxes(X, -1, -2)


def sample_noise(key: Array, V: Array, params: SDEParams, *, factor: str = "eigh") -> Array:
    """One draw of the structured noise ``N`` (symmetric ``(..., m, m)``) at ``V``.

    The upper-triangle vector of ``N`` has covariance ``diffusion_matrix(V, params)``. Batched
    over the leading axes of ``V`` (independent draws). O(m^3) per draw.

    Arguments:
      key: a JAX PRNG key.
      V: ``(..., m, m)`` symmetric PSD.
      params: :class:`SDEParams`.
      factor: ``"eigh"`` (default) or ``"cholesky"`` (with ``"eigh"`` fallback); same law.
    """
    k1, k2 = jax.random.split(key)
    Z1 = jax.random.normal(k1, V.shape, V.dtype)
    Z2 = jax.random.normal(k2, V.shape, V.dtype)
    return structured_noise(V, psd_factor(V, factor), Z1, Z2, params)


# --------------------------------------------------------------------------- generic route


def psd_sqrt(S: Array) -> Array:
    """Symmetric PSD square root ``Q diag(sqrt(max(w, 0))) Q^T`` of a symmetric matrix."""
    w, Q = jnp.linalg.eigh(S)
    return (Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]) @ jnp.swapaxes(Q, -1, -2)


def generic_diffusion_factor(V: Array, params: SDEParams) -> Array:
    """``R`` with ``R R^T = Sigma(V)`` (``(..., D, D)``), from ``eigh`` with clipped eigenvalues."""
    return psd_sqrt(diffusion_matrix(V, params))


def generic_noise(V: Array, xi: Array, params: SDEParams) -> Array:
    """Symmetric matrix whose upper triangle is ``Sigma(V)^{1/2} xi`` (``xi``: ``(..., D)``)."""
    R = generic_diffusion_factor(V, params)
    return vec_to_sym(jnp.sum(R * xi[..., None, :], axis=-1))


def sample_noise_generic(key: Array, V: Array, params: SDEParams) -> Array:
    """One draw of the noise by the generic route (O(m^6)); same law as :func:`sample_noise`."""
    m = V.shape[-1]
    xi = jax.random.normal(key, V.shape[:-2] + (m * (m + 1) // 2,), V.dtype)
    return generic_noise(V, xi, params)

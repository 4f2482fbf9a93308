"""Noise of the covariance SDE: the structured O(m^3) route and the generic square-root route.

Structured route (docs/noise.md §1). With ``L L^T = V`` and ``Z1, Z2`` iid standard
Gaussian ``m x m`` matrices,

    N = sqrt(k_lin / 2) L (Z1 + Z1^T) L^T + c (L Z2 M^T + M Z2^T L^T),   c = sqrt(acal_coeff),

has, over its upper-triangular entries, covariance ``k_lin Sigma_lin(V) + acal_coeff Acal(V)``
= :func:`diffusion_matrix` (``acal_coeff = a1^2 gamma^4 / (tau0^2 H)``, so
``c = a1 gamma^2 / (tau0 sqrt(H))``; softmax has ``a1 = 1``). Proof: with ``U = L Z M^T``,
``Cov(U_ab, U_dw) = (L L^T)_ad (M M^T)_bw``, ``Cov(U_ab, U_wd) = (L L^T)_aw (M M^T)_bd``, so
``Cov((U + U^T)_ab, (U + U^T)_dw) = V_ad G_bw + V_aw G_bd + G_ad V_bw + G_aw V_bd = Acal[ab, dw]``
when ``M M^T = G``; ``M = L`` gives ``2 Sigma_lin``, hence the ``1/sqrt(2)``. Z1 and Z2 are
independent, so the two covariances add. Diagonal entries are included (``a = b``).

We do not factor ``G`` separately: ``M = V P L / m`` satisfies
``M M^T = V P (L L^T) P V / m^2 = V P V P V / m^2 = G`` exactly, for any ``L`` with ``L L^T = V``
(one factorisation per step, no second eigendecomposition, and ``M`` is exact on the PSD
boundary).

``Z1`` enters only through ``Z1 + Z1^T``, so the sampler draws ``S = (Z1 + Z1^T) / sqrt(2)``
directly (off-diagonal N(0, 1), diagonal N(0, 2)) from ``m (m + 1) / 2`` normals
(:func:`noise_from_normals`); with the ``m^2`` entries of ``Z2`` (absent for the MLP block) that
is 25% (50%) fewer random numbers than two full matrices, and random number generation is the
largest single cost of a step on CPU.

The factor ``L`` of ``V`` is a Cholesky or clipped-eigh factor (docs/noise.md §4).

Generic route: build ``Sigma(V)`` (``D x D``, ``D = m (m + 1) / 2``), take a PSD square root by
``eigh`` with clipped eigenvalues, multiply a standard normal ``D``-vector and map it back to a
symmetric matrix. O(m^6) per draw; it is the reference the structured route is tested
against (docs/noise.md §2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._helpers.linalg import psd_factor, psd_sqrt
from .._helpers.symmetric import upper_indices, vec_to_sym
from .coefficients import diffusion_matrix
from .params import SDEParams

Array = jax.Array

_barrier = jax.lax.optimization_barrier

_SMALL_M = 8


def _mm(A: Array, B: Array) -> Array:
    """Batched ``A @ B``; for ``m < 8`` as a broadcast multiply-and-sum, which XLA's CPU backend
    runs ~8x faster than its dot for 4 x 4 .. 6 x 6 batches (measured; equal at m = 8)."""
    if A.shape[-1] < _SMALL_M:
        return jnp.sum(A[..., :, :, None] * B[..., None, :, :], axis=-2)
    return A @ B


def attention_factor(V: Array, L: Array) -> Array:
    """``M = V P L / m`` with ``M M^T = G = V P V P V / m^2`` whenever ``L L^T = V``."""
    m = V.shape[-1]
    PL = L - jnp.mean(L, axis=-2, keepdims=True)
    return (V @ PL) / m


# --------------------------------------------------------------------------- structured route


def uses_acal(params: SDEParams, m: int) -> bool:
    """True if the ``Acal`` part of the noise is present (attention block, tau0 < inf, m > 1)."""
    return params.acal_coeff != 0.0 and m > 1


def structured_noise_sym(V: Array, L: Array, S: Array, Z2: Array | None, params: SDEParams) -> Array:
    """Structured noise from a symmetric Gaussian ``S`` (the economical form).

    ``N = sqrt(k_lin) L S L^T + c (L Z2 M^T + M Z2^T L^T)`` with ``S = (Z1 + Z1^T) / sqrt(2)``
    (off-diagonal N(0, 1), diagonal N(0, 2): ``m (m + 1) / 2`` numbers instead of ``m^2``),
    ``c^2 = acal_coeff``, ``M = V P L / m``. Linear in ``(S, Z2)``; ``Z2`` may be None when
    :func:`uses_acal` is False.
    """
    m = V.shape[-1]
    # N = X + X^T with X = L (sqrt(k_lin)/2 S L^T + c Z2 M^T) and M^T = L^T P V / m
    # (V symmetric): four m x m products. The transposes are materialised
    # (optimization_barrier) so that every product is a plain A @ B: XLA's CPU dot fusion is
    # about 2x slower at m = 64 when it folds the transposes into the products.
    LT = _barrier(jnp.swapaxes(L, -1, -2))
    inner = (0.5 * math.sqrt(params.k_lin)) * _mm(S, LT)
    if uses_acal(params, m):
        PV = V - jnp.mean(V, axis=-2, keepdims=True)  # P V
        MT = _mm(LT, PV) / m  # M^T = (V P L / m)^T
        inner = inner + math.sqrt(params.acal_coeff) * _mm(Z2, MT)
    X = _barrier(_mm(L, inner))  # materialised before X + X^T
    return X + jnp.swapaxes(X, -1, -2)


def structured_noise(V: Array, L: Array, Z1: Array, Z2: Array, params: SDEParams) -> Array:
    """Structured noise ``N`` from a factor ``L`` of ``V`` and Gaussian matrices ``Z1, Z2``.

    ``N = sqrt(k_lin / 2) L (Z1 + Z1^T) L^T + c (L Z2 M^T + M Z2^T L^T)``, ``c^2 = acal_coeff``,
    ``M = V P L / m`` (docs/noise.md §1). Linear in ``(Z1, Z2)``; all arrays ``(..., m, m)``.
    ``Z2`` is ignored when ``acal_coeff = 0`` (MLP block, ``tau0 = inf``, ``m = 1``).
    """
    S = _barrier(Z1 + jnp.swapaxes(Z1, -1, -2)) / math.sqrt(2.0)
    return structured_noise_sym(V, L, S, Z2, params)


def noise_dim(m: int, params: SDEParams) -> int:
    """Length of the standard normal vector driving :func:`noise_from_normals`:
    ``m (m + 1) / 2`` for ``S``, plus ``m^2`` for ``Z2`` when the ``Acal`` part is present."""
    return m * (m + 1) // 2 + (m * m if uses_acal(params, m) else 0)


def noise_from_normals(V: Array, L: Array, xi: Array, params: SDEParams) -> Array:
    """Structured noise driven by a flat standard normal vector ``xi`` (``(..., noise_dim)``).

    The first ``D = m (m + 1) / 2`` entries fill the upper triangle of ``S`` (diagonal scaled
    by ``sqrt(2)``), the remaining ``m^2`` (if any) are ``Z2`` row-major. Linear in ``xi``; the
    upper triangle of the result has covariance ``diffusion_matrix(V, params)``. This is the
    form the solver uses (25% fewer random numbers than ``(Z1, Z2)``; 50% for the MLP block).
    """
    m = V.shape[-1]
    D = m * (m + 1) // 2
    rows, cols = upper_indices(m)
    scale = np.where(rows == cols, math.sqrt(2.0), 1.0).reshape((1,) * (xi.ndim - 1) + (D,))
    S = vec_to_sym(xi[..., :D] * scale.astype(xi.dtype))
    Z2 = xi[..., D:].reshape(xi.shape[:-1] + (m, m)) if uses_acal(params, m) else None
    return structured_noise_sym(V, L, S, Z2, params)


def sample_noise(key: Array, V: Array, params: SDEParams, *, factor: str = "eigh") -> Array:
    """One draw of the structured noise ``N`` (symmetric ``(..., m, m)``) at ``V``.

    The upper-triangle vector of ``N`` has covariance ``diffusion_matrix(V, params)``. Batched
    over the leading axes of ``V`` (independent draws). O(m^3) per draw; uses
    :func:`noise_from_normals` (``noise_dim(m, params)`` normals per draw).

    Arguments:
      key: a JAX PRNG key.
      V: ``(..., m, m)`` symmetric PSD.
      params: :class:`SDEParams`.
      factor: ``"eigh"`` (default) or ``"cholesky"`` (with ``"eigh"`` fallback); same law.
    """
    xi = jax.random.normal(key, V.shape[:-2] + (noise_dim(V.shape[-1], params),), V.dtype)
    return noise_from_normals(V, psd_factor(V, factor), xi, params)


# --------------------------------------------------------------------------- generic route


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

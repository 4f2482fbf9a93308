"""Gram matrices and PSD factors (docs/noise.md §4).

``"eigh"`` factors use the eigendecomposition with eigenvalues clipped at 0: exact for PSD
``V``, singular ``V`` included (for a slightly indefinite ``V`` they factor its PSD part
``V_+``). ``"cholesky"`` uses ``chol(V)`` and falls back to ``"eigh"`` where Cholesky fails
(singular or slightly indefinite ``V``; JAX returns NaN there), so it is exact on the PSD
boundary too. On CPU Cholesky is 5-15x faster than ``eigh`` for small matrices; the fallback
runs only when some matrix of a batch needs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

FACTORS = ("eigh", "cholesky")


def gram(x: Array) -> Array:
    """``x x^T / n`` over the last axis of ``x: [..., m, n]`` (tokens are rows)."""
    return jnp.einsum("...an,...bn->...ab", x, x) / x.shape[-1]


def eigh_factor(V: Array) -> Array:
    """``L = Q diag(sqrt(max(w, 0)))`` with ``V = Q diag(w) Q^T``; ``L L^T = V_+`` (PSD part)."""
    w, Q = jnp.linalg.eigh(V)
    return Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]


def factor_and_check(V: Array, tol, factor: str = "cholesky", active=None) -> tuple[Array, Array]:
    """A factor ``L`` (``L L^T = V``, or ``V_+`` on the boundary) and ``lambda_min(V) >= -tol``.

    ``factor="eigh"``: eigendecomposition with clipped eigenvalues. ``factor="cholesky"``:
    ``chol(V)`` (success implies ``V`` positive definite, so the check passes); where it fails
    the eigendecomposition is used instead, for both the factor and the check. The fallback
    runs under ``lax.cond`` only if some matrix of the batch needs it (inside a user's ``vmap``
    the cond becomes a select, still correct). ``tol`` broadcasts against ``V.shape[:-2]``.
    ``active`` (bool, ``V.shape[:-2]``; default all) marks the matrices whose result matters:
    inactive ones (e.g. stopped paths, possibly non-finite) never trigger the fallback and
    their outputs are unspecified.
    """
    tol = jnp.broadcast_to(jnp.asarray(tol, V.dtype), V.shape[:-2])
    eye = jnp.eye(V.shape[-1], dtype=V.dtype)
    if factor == "eigh":
        if active is not None:
            V = jnp.where(active[..., None, None], V, eye)
        w, Q = jnp.linalg.eigh(V)
        return Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :], w[..., 0] >= -tol
    if factor != "cholesky":
        raise ValueError(f"factor={factor!r} is not one of {FACTORS}")
    # V is symmetric, so symmetrize_input is not needed (it would cost a transposed pass).
    L0 = jnp.linalg.cholesky(V, symmetrize_input=False)
    ok = jnp.all(jnp.isfinite(L0), axis=(-2, -1))
    need = ~ok if active is None else (~ok & active)

    def fallback(_):
        Vs = V if active is None else jnp.where(active[..., None, None], V, eye)
        w, Q = jnp.linalg.eigh(Vs)
        Le = Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]
        return jnp.where(ok[..., None, None], L0, Le), ok | (w[..., 0] >= -tol)

    return jax.lax.cond(jnp.any(need), fallback, lambda _: (L0, ok), None)


def psd_factor(V: Array, factor: str = "eigh") -> Array:
    """A matrix ``L`` with ``L L^T = V`` (``V_+`` for slightly indefinite ``V``); see
    :func:`factor_and_check`."""
    return factor_and_check(V, 0.0, factor)[0]


def psd_sqrt(S: Array) -> Array:
    """Symmetric PSD square root ``Q diag(sqrt(max(w, 0))) Q^T`` of a symmetric matrix."""
    w, Q = jnp.linalg.eigh(S)
    return (Q * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]) @ jnp.swapaxes(Q, -1, -2)

"""Input checks shared by every public entry point: one-line ValueErrors that name the
parameter, its value and the allowed range, raised before any work is done."""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

PSD_TOL = 1e-8
"""Relative tolerance for symmetry and for the smallest eigenvalue of an input covariance."""


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


def check_positive_real(name: str, value) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
    return float(value)


def check_psd_matrix(name: str, V, tol: float = PSD_TOL):
    """``V`` as a jax array after checking it is a finite, symmetric, PSD ``(m, m)`` matrix.

    Symmetry and the smallest eigenvalue are checked relative to ``max(1, max |V|)``.
    """
    a = np.asarray(V)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"{name} must be a square (m, m) matrix, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
        V = a
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or inf entries; it must be finite")
    scale = max(1.0, float(np.max(np.abs(a))))
    asym = float(np.max(np.abs(a - a.T)))
    if asym > tol * scale:
        raise ValueError(f"{name} is not symmetric: max |V - V^T| = {asym:.3g} > {tol * scale:.3g}")
    lowest = float(np.linalg.eigvalsh(a.astype(np.float64)).min())
    if lowest < -tol * scale:
        raise ValueError(f"{name} is not positive semi-definite: smallest eigenvalue {lowest:.3g} < 0")
    return jnp.asarray(V)

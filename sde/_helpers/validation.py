"""Input checks shared by every entry point of the repository (``sde``, the ``shaped_attn``
configs and the scripts): one-line ValueErrors that name the parameter, its value and the
allowed range, raised before any work is done. One function per rule, used everywhere."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import numpy as np

PSD_TOL = 1e-8
"""Smallest relative tolerance for symmetry and for the smallest eigenvalue of an input
covariance (the default is ``max(PSD_TOL, sqrt(eps))`` of its dtype)."""


def _bound(x) -> str:
    return "inf" if x == math.inf else ("-inf" if x == -math.inf else repr(x))


def check_real(name: str, value) -> float:
    """``value`` as a finite float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a real number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    return float(value)


def check_number(name: str, value, lo: float = 0, hi: float = math.inf, *, lo_closed: bool = False,
                 hi_closed: bool = False, hi_name: str = "") -> float:
    """``value`` as a float in the interval from ``lo`` to ``hi``; the default is ``(0, inf)``.

    NaN is never inside; ``inf`` only for ``hi = inf`` with ``hi_closed`` (e.g. ``tau0`` in
    ``(0, inf]``). ``hi_name`` labels a bound that is another parameter, e.g. ``(0, T=1]``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a real number")
    v = float(value)
    inside = (v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)
    if not inside:
        label = f"{hi_name}=" if hi_name else ""
        interval = f"{'[' if lo_closed else '('}{_bound(lo)}, {label}{_bound(hi)}{']' if hi_closed else ')'}"
        raise ValueError(f"{name}={value!r} is outside {interval}")
    return v


def check_int(name: str, value, lo: int = 1, hi: Optional[int] = None) -> int:
    """``value`` as an int ``>= lo`` (and ``<= hi`` if given); bools are refused."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo
    if not ok or (hi is not None and value > hi):
        limit = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value!r} must be an integer {limit}")
    return int(value)


def check_choice(name: str, value, allowed: Sequence):
    """``value`` if it is one of ``allowed``."""
    if value not in tuple(allowed):
        raise ValueError(f"{name}={value!r} is not one of {tuple(allowed)}")
    return value


def check_each(name: str, values: Sequence, check: Callable, *args, **kwargs) -> tuple:
    """``check(name, v, ...)`` for every element of a non-empty list parameter."""
    if not values:
        raise ValueError(f"{name} is empty; give at least one value")
    return tuple(check(name, v, *args, **kwargs) for v in values)


def check_dtype(name: str, value) -> np.dtype:
    """``value`` as a floating NumPy dtype (``"float32"``, ``"float64"``, ...)."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{name}={value!r} must be a floating dtype such as 'float32'")
    return dtype


def default_psd_tol(dtype) -> float:
    """``max(PSD_TOL, sqrt(eps))`` of a floating dtype."""
    return max(PSD_TOL, float(np.sqrt(np.finfo(dtype).eps)))


def check_gram_values(name: str, V: np.ndarray, tol: float) -> None:
    """Raise unless every ``(m, m)`` matrix of ``V (..., m, m)`` is finite, symmetric and PSD.

    Symmetry and the smallest eigenvalue are checked relative to ``max(1, max |V|)`` of each
    matrix.
    """
    if not np.all(np.isfinite(V)):
        raise ValueError(f"{name} holds NaN or inf entries (non-finite); it must be finite")
    V = np.asarray(V, np.float64)
    scale = np.maximum(1.0, np.max(np.abs(V), axis=(-2, -1)))
    asym = np.max(np.abs(V - np.swapaxes(V, -1, -2)), axis=(-2, -1))
    if np.any(asym > tol * scale):
        raise ValueError(f"{name} is not symmetric: max |{name} - {name}^T| = {np.max(asym):.3g} "
                         f"> {tol:.3g} * max(1, max|{name}|)")
    lowest = np.linalg.eigvalsh(0.5 * (V + np.swapaxes(V, -1, -2)))[..., 0]
    if np.any(lowest < -tol * scale):
        raise ValueError(f"{name} is not positive semi-definite (not PSD): smallest eigenvalue "
                         f"{np.min(lowest):.3g} < -{tol:.3g} * max(1, max|{name}|)")


def check_psd_matrix(name: str, V, tol: Optional[float] = None) -> np.ndarray:
    """``V`` as a NumPy array after checking it is a finite, symmetric, PSD ``(m, m)`` matrix
    (:func:`check_gram_values`; ``tol`` defaults to :func:`default_psd_tol` of its dtype;
    non-float input becomes float64)."""
    a = np.asarray(V)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(f"{name} must be a square (m, m) matrix, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    check_gram_values(name, a, default_psd_tol(a.dtype) if tol is None else tol)
    return a

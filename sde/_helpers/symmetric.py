"""Index maps between symmetric ``(m, m)`` matrices and their upper-triangle vectors.

The covariance SDE's diffusion matrix is a covariance over the ``D = m (m + 1) / 2`` entries
``(a, b)``, ``a <= b``, ordered row-major: ``(0,0), (0,1), ..., (0,m-1), (1,1), ...``
(docs/sde.md §1). Every function here uses that order.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np

Array = jax.Array


@functools.lru_cache(maxsize=None)
def upper_indices(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the upper triangle (diagonal included), row-major.

    Returns ``(rows, cols)``, two read-only int arrays of length ``D = m (m + 1) / 2``.
    """
    if m < 1:
        raise ValueError(f"m={m} must be >= 1")
    rows, cols = np.triu_indices(m)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def num_upper(m: int) -> int:
    """``D = m (m + 1) / 2``, the number of upper-triangular entries of an m x m matrix."""
    return m * (m + 1) // 2


def dim_from_num_upper(D: int) -> int:
    """Inverse of :func:`num_upper`; raises ValueError if ``D`` is not triangular."""
    m = int(round((math.sqrt(8 * D + 1) - 1) / 2))
    if m < 1 or num_upper(m) != D:
        raise ValueError(f"D={D} is not m (m + 1) / 2 for an integer m >= 1")
    return m


@functools.lru_cache(maxsize=None)
def sym_index(m: int) -> np.ndarray:
    """``(m, m)`` int array: position in the upper-triangle vector of entry ``(a, b)``.

    Symmetric: ``sym_index(m)[a, b] == sym_index(m)[b, a]``.
    """
    rows, cols = upper_indices(m)
    idx = np.empty((m, m), dtype=np.int64)
    idx[rows, cols] = np.arange(len(rows))
    idx[cols, rows] = np.arange(len(rows))
    idx.setflags(write=False)
    return idx


def sym_to_vec(A: Array) -> Array:
    """Upper-triangle vector ``(..., D)`` of a (symmetric) matrix ``(..., m, m)``."""
    rows, cols = upper_indices(A.shape[-1])
    return A[..., rows, cols]


def vec_to_sym(v: Array) -> Array:
    """Symmetric matrix ``(..., m, m)`` from its upper-triangle vector ``(..., D)``."""
    m = dim_from_num_upper(v.shape[-1])
    return v[..., sym_index(m)]


"""Helpers shared by the test files (import with ``from helpers import ...``; pytest puts
``tests/`` on ``sys.path``).

- :func:`random_psd`: random symmetric PSD matrices, full rank or of a given rank;
- :data:`F64`, :func:`normal64`: float64 parameters and float64 Gaussian draws;
- :func:`se_mean`, :func:`se_var`: Monte Carlo standard errors of a sample mean and variance
  (two-sample z-scores between ensembles are the library's ``sde.compare_moments``).

Float64 itself is switched on for every test in ``tests/conftest.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

F64 = dict(param_dtype="float64")
"""Keyword arguments that give a config or module float64 parameters."""


def random_psd(rng: Union[np.random.Generator, int], m: int = 3, rank: Optional[int] = None,
               ridge: float = 0.1) -> np.ndarray:
    """``A A^T / rank + ridge I`` with ``A`` an ``(m, rank)`` standard normal matrix.

    ``rank=None`` means full rank ``m``; the ridge is added at full rank only, so a matrix of
    smaller rank is exactly singular (on the PSD boundary). ``rng`` is a NumPy ``Generator`` or
    an integer seed for ``np.random.default_rng``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    rank = m if rank is None else rank
    A = rng.standard_normal((m, rank))
    return A @ A.T / rank + (ridge * np.eye(m) if rank == m else 0.0)


def normal64(seed: int, shape: tuple) -> jax.Array:
    """Standard normal float64 draws from ``jax.random.key(seed)``."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


def se_mean(x, axis=None, ddof: int = 0):
    """Standard error of the sample mean of ``x`` along ``axis`` (all of ``x`` by default)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size if axis is None else x.shape[axis]
    return x.std(axis=axis, ddof=ddof) / math.sqrt(n)


def se_var(x) -> float:
    """Standard error of the sample variance ``s^2`` of the 1-d sample ``x``:
    ``sqrt((m4 - s^4) / N)`` with ``m4`` the fourth central sample moment (no normality
    assumed; equal to the standard deviation of ``(x - mean)^2`` over ``sqrt(N)``)."""
    x = np.asarray(x, dtype=np.float64)
    c2 = (x - x.mean()) ** 2
    return math.sqrt(max(float((c2 * c2).mean() - c2.mean() ** 2), 0.0) / x.size)

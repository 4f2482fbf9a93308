"""The one chi-square and Bartlett-factor sampler of every exact sampler, and the one-draw
pool of a layer's random numbers (docs/samplers.md §2).

Bartlett decomposition: ``B B^T ~ Wishart(df, I_m)`` for the lower-triangular ``B`` with
``B_ii^2 ~ chi^2(df - i)`` (i = 0..m-1) and ``B_ij ~ N(0, 1)`` below the diagonal, all
independent (needs ``df >= m``). A layer's normals and chi-squares come from one draw each
(:class:`LayerDraws`): every call site of the random-bit generator is compiled on its own,
and under ``vmap`` many small draws cost far more than their size.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
T = TypeVar("T")


def chi_square(key: Array, df, shape: tuple, dtype=jnp.float32, proposals: int = 4) -> Array:
    """Exact ``chi^2(df)`` draws of ``shape`` (``df`` broadcasts), as ``2 Gamma(df / 2)``.

    The rejection sampler of Marsaglia and Tsang (2000) in rounds (``lax.while_loop``, round
    ``i`` from ``fold_in(key, i)``): each round draws ``proposals`` candidates per element and
    keeps the first accepted one; a further round runs only while some element has none
    accepted (rare: each candidate is accepted with probability > 0.95). Shape < 1 via
    ``Gamma(a) = Gamma(a + 1) U^(1/a)``. A round's numbers are one uniform draw (the normal
    candidates through ``sqrt(2) erfinv(2u - 1)``, as :func:`jax.random.normal` makes them).
    Same law as :func:`jax.random.chisquare`, several times faster under ``vmap`` (that one
    runs a nested while loop per element).
    """
    alpha = jnp.broadcast_to(jnp.asarray(df, dtype) / 2, shape)
    boost = alpha < 1
    d = (jnp.where(boost, alpha + 1, alpha) - 1.0 / 3.0)[None]  # broadcasts over candidates
    c = jax.lax.rsqrt(9.0 * d)
    lowest = jnp.nextafter(jnp.asarray(-1, dtype), jnp.asarray(0, dtype))

    def draw_round(i):
        # Slabs: the normal candidates, their acceptance uniforms, and the uniform of the
        # shape-< 1 boost (independent of the round's candidates, so of the value kept).
        u = jax.random.uniform(jax.random.fold_in(key, i), (2 * proposals + 1, *shape), dtype)
        x = math.sqrt(2) * jax.lax.erf_inv(jnp.maximum(2 * u[:proposals] - 1, lowest))
        v = (1 + c * x) ** 3
        log_ratio = 0.5 * x * x + d - d * v + d * jnp.log(jnp.where(v > 0, v, 1))
        ok = (v > 0) & (jnp.log(u[proposals:-1]) < log_ratio)
        gamma = jnp.take_along_axis(d * v, jnp.argmax(ok, axis=0)[None], axis=0)[0]
        gamma = jnp.where(boost, gamma * u[-1] ** (1 / jnp.where(boost, alpha, 1)), gamma)
        return 2 * gamma, jnp.any(ok, axis=0)

    def next_round(state):
        value, done, i = state
        new, ok = draw_round(i)
        return jnp.where(done, value, new), done | ok, i + 1

    start = (jnp.zeros(shape, dtype), jnp.zeros(shape, bool), 0)
    return jax.lax.while_loop(lambda s: ~jnp.all(s[1]), next_round, start)[0]


def bartlett_dfs(df: int, rows: int) -> np.ndarray:
    """Degrees of freedom ``df, df - 1, ..., df - rows + 1`` of the diagonal of a Bartlett
    factor of ``Wishart(df, I_rows)``."""
    return np.arange(df, df - rows, -1)


def bartlett_from(normals: Array, chi2: Array) -> Array:
    """The Bartlett factor with strictly lower part from ``normals (..., m, m)`` (upper part
    ignored) and squared diagonal ``chi2 (..., m)`` drawn with :func:`bartlett_dfs`."""
    eye = jnp.broadcast_to(jnp.eye(normals.shape[-1], dtype=normals.dtype), normals.shape)
    return jnp.tril(normals, -1) + jnp.sqrt(chi2)[..., None] * eye


class LayerDraws:
    """The random numbers of one layer: one ``jax.random.normal`` and one :func:`chi_square`
    call, handed out in disjoint parts.

    :meth:`build` runs a map builder twice: first on a recording instance, whose requests
    return ``None`` and only count the numbers, then on one that draws them all at once and
    hands out the parts in the same order."""

    def __init__(self, dtype, key: Optional[Array] = None, record: Optional["LayerDraws"] = None):
        self.dtype, self.count, self.dfs = dtype, 0, []
        self.normals = self.chi2 = None
        if key is not None:
            k_normal, k_chi = jax.random.split(key)
            self.normals = jax.random.normal(k_normal, (record.count,), dtype)
            if record.dfs:
                dfs = np.asarray(record.dfs, np.float64)
                self.chi2 = chi_square(k_chi, dfs.astype(dtype), dfs.shape, dtype)

    @classmethod
    def build(cls, builder: Callable[["LayerDraws"], T], key: Array, dtype) -> T:
        """``builder(draws)`` with its random numbers drawn from ``key`` in one call each."""
        record = cls(dtype)
        builder(record)
        return builder(cls(dtype, key, record))

    def normal(self, shape: tuple) -> Optional[Array]:
        """iid N(0, 1) of ``shape``."""
        start, self.count = self.count, self.count + math.prod(shape)
        return None if self.normals is None else self.normals[start:self.count].reshape(shape)

    def wishart_factor(self, lead: tuple, rows: int, df: int) -> Optional[Array]:
        """``T`` of shape ``(*lead, rows, min(rows, df))`` with ``T T^T`` distributed as
        ``G G^T`` for ``G`` iid N(0, 1) of shape rows x df (``Wishart(df, I_rows)``): the
        Bartlett factor if ``df >= rows``, else ``G`` itself."""
        if df < rows:
            return self.normal((*lead, rows, max(df, 0)))
        below = self.normal((*lead, rows, rows))
        start = len(self.dfs)
        self.dfs += list(np.tile(bartlett_dfs(df, rows), math.prod(lead)))
        if self.normals is None:
            return None
        return bartlett_from(below, self.chi2[start:len(self.dfs)].reshape(*lead, rows))

"""The one chi-square and Bartlett-factor sampler of every exact sampler (docs/samplers.md §2).

Bartlett decomposition: ``B B^T ~ Wishart(df, I_m)`` for the lower-triangular ``B`` with
``B_ii^2 ~ chi^2(df - i)`` (i = 0..m-1) and ``B_ij ~ N(0, 1)`` below the diagonal, all
independent (needs ``df >= m``). Samplers that draw all of a layer's numbers in one call
(faster under ``vmap``) pass them to :func:`bartlett_from`; :func:`bartlett_factor` draws
its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def chi_square(key: Array, df, shape: tuple, dtype=jnp.float32, proposals: int = 4) -> Array:
    """Exact ``chi^2(df)`` draws of ``shape`` (``df`` broadcasts), as ``2 Gamma(df / 2)``.

    The rejection sampler of Marsaglia and Tsang (2000) with ``proposals`` candidates per
    element drawn at once and the first accepted one kept; rounds of fresh candidates are
    repeated (``lax.while_loop``) only while some element has none accepted (rare: each
    candidate is accepted with probability > 0.95). Shape < 1 via
    ``Gamma(a) = Gamma(a + 1) U^(1/a)``. Same law as :func:`jax.random.chisquare`, several
    times faster under ``vmap`` (that one runs a nested while loop per element).
    """
    alpha = jnp.broadcast_to(jnp.asarray(df, dtype) / 2, shape)
    boost = alpha < 1
    d = (jnp.where(boost, alpha + 1, alpha) - 1.0 / 3.0)[None]  # broadcasts over candidates
    c = jax.lax.rsqrt(9.0 * d)

    def candidates(k):
        kx, ku = jax.random.split(k)
        x = jax.random.normal(kx, (proposals, *shape), dtype)
        u = jax.random.uniform(ku, (proposals, *shape), dtype)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (jnp.log(u) < 0.5 * x * x + d - d * v + d * jnp.log(jnp.where(v > 0, v, 1)))
        first = jnp.argmax(ok, axis=0)
        return jnp.take_along_axis(d * v, first[None], axis=0)[0], jnp.any(ok, axis=0)

    k_first, k_more, k_boost = jax.random.split(key, 3)
    value, done = candidates(k_first)

    def more(state):
        value, done, i = state
        new, ok = candidates(jax.random.fold_in(k_more, i))
        return jnp.where(done, value, new), done | ok, i + 1

    value, _, _ = jax.lax.while_loop(lambda s: ~jnp.all(s[1]), more, (value, done, 0))
    u = jax.random.uniform(k_boost, shape, dtype)
    return 2 * jnp.where(boost, value * u ** (1 / jnp.where(boost, alpha, 1)), value)


def bartlett_dfs(df: int, rows: int) -> np.ndarray:
    """Degrees of freedom ``df, df - 1, ..., df - rows + 1`` of the diagonal of a Bartlett
    factor of ``Wishart(df, I_rows)``."""
    return np.arange(df, df - rows, -1)


def bartlett_from(normals: Array, chi2: Array) -> Array:
    """The Bartlett factor with strictly lower part from ``normals (..., m, m)`` (upper part
    ignored) and squared diagonal ``chi2 (..., m)`` drawn with :func:`bartlett_dfs`."""
    eye = jnp.broadcast_to(jnp.eye(normals.shape[-1], dtype=normals.dtype), normals.shape)
    return jnp.tril(normals, -1) + jnp.sqrt(chi2)[..., None] * eye


def bartlett_factor(key: Array, shape: tuple, df: int, dtype) -> Array:
    """Lower-triangular ``B`` of ``shape`` (``(..., m, m)``) with ``B B^T ~ Wishart(df, I_m)``."""
    m = shape[-1]
    k_chi, k_normal = jax.random.split(key)
    dfs = jnp.broadcast_to(jnp.asarray(bartlett_dfs(df, m), dtype), shape[:-1])
    chi2 = chi_square(k_chi, dfs, shape[:-1], dtype)
    return bartlett_from(jax.random.normal(k_normal, shape, dtype), chi2)

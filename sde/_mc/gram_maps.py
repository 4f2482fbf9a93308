"""The maps of the Gram sampler (docs/samplers.md §1, §3).

At initialisation each weight matrix is fresh and used once, so given ``x`` (m x n_in) the
product ``x W`` with ``W ~ N(0, 1/n_in)`` has iid columns ``N(0, x x^T / n_in)`` and is drawn
as ``R G`` with ``R R^T = x x^T / n_in`` and ``G`` iid N(0, 1) of shape m x n_out: O(m^2 n)
work and m n random numbers instead of O(m n^2) and n^2. The m x n features are kept, so
LayerNorm and the per-feature ReLU stay exact.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from shaped_attn.config import BlockConfig
from shaped_attn.functional import BlockMaps

from .._helpers.linalg import gram, psd_factor
from .._helpers.wishart import bartlett_factor


def gram_map(key: jax.Array, n_out: int) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> x W``, ``W ~ N(0, 1/n_in)`` (n_in x n_out), drawn as ``R G``."""

    def apply(x):
        g = jax.random.normal(key, (*x.shape[:-1], n_out), x.dtype)
        return psd_factor(gram(x), "cholesky") @ g

    return apply


def gram_scores(key: jax.Array, heads: int, key_width: int) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> (x W_Q,h)(x W_K,h)^T`` per head, drawn with O(m^2) random numbers.

    With ``R R^T = x x^T / n`` the product is ``R G1 G2^T R^T`` for iid N(0, 1) ``G1, G2``
    (m x n_k). Given G1 the columns of ``G1 G2^T`` are iid ``N(0, G1 G1^T)``, so
    ``G1 G2^T = B G3`` in law, with ``B`` the Bartlett factor of ``G1 G1^T ~ Wishart(n_k, I)``
    and ``G3`` iid m x m: exact, and ``2 m n_k`` random numbers become ``m (3m + 1) / 2``.
    """

    def apply(x):
        m = x.shape[-2]
        shape = (*x.shape[:-2], heads, m, m)
        k_b, k_g = jax.random.split(key)
        b = bartlett_factor(k_b, shape, key_width, x.dtype)
        g = jax.random.normal(k_g, shape, x.dtype)
        r = psd_factor(gram(x), "cholesky")[..., None, :, :]
        return r @ b @ g @ jnp.swapaxes(r, -1, -2)

    return apply


def gram_maps(cfg: BlockConfig, key: jax.Array, m_tokens: int) -> BlockMaps:
    """The maps of one block for the Gram sampler; sizes as listed in :class:`BlockMaps`.

    The scores come from :func:`gram_scores` (zero for ``query_init="zero"``, as the module's
    zero query kernel gives)."""
    att = cfg.attention
    ks = jax.random.split(key, 6)
    n, qk, v = cfg.width, att.num_heads * att.head_dim, att.num_heads * att.value_dim
    if att.query_init == "zero":
        scores = lambda x: jnp.zeros((*x.shape[:-2], att.num_heads, m_tokens, m_tokens), x.dtype)  # noqa: E731
    elif att.head_dim >= m_tokens:
        scores = gram_scores(ks[0], att.num_heads, att.head_dim)
    else:  # n_k < m: no Bartlett factor; draw X W_Q and X W_K themselves
        scores = None
    return BlockMaps(
        query=gram_map(ks[0], qk) if scores is None else None,
        key=gram_map(ks[1], qk) if scores is None else None,
        scores=scores,
        value=gram_map(ks[2], v),
        output=gram_map(ks[3], n) if att.out_proj else None,
        mlp_in=gram_map(ks[4], cfg.mlp_hidden),
        mlp_out=gram_map(ks[5], n),
    )

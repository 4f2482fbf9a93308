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
from .._helpers.wishart import LayerDraws


def gram_map(normals: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> x W``, ``W ~ N(0, 1/n_in)`` (n_in x n_out), drawn as ``R G`` from the
    iid N(0, 1) ``G = normals`` (``x.shape[:-1] + (n_out,)``)."""
    return lambda x: psd_factor(gram(x), "cholesky") @ normals.astype(x.dtype)


def gram_scores(bartlett: jax.Array, normals: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> (x W_Q,h)(x W_K,h)^T`` per head, drawn with O(m^2) random numbers.

    With ``R R^T = x x^T / n`` the product is ``R G1 G2^T R^T`` for iid N(0, 1) ``G1, G2``
    (m x n_k). Given G1 the columns of ``G1 G2^T`` are iid ``N(0, G1 G1^T)``, so
    ``G1 G2^T = B G3`` in law, with ``B`` (``bartlett``, heads x m x m) the Bartlett factor of
    ``G1 G1^T ~ Wishart(n_k, I)`` and ``G3`` (``normals``) iid heads x m x m: exact, and
    ``2 m n_k`` random numbers become ``m (3m + 1) / 2``.
    """

    def apply(x):
        r = psd_factor(gram(x), "cholesky")[..., None, :, :]
        return r @ (bartlett @ normals).astype(x.dtype) @ jnp.swapaxes(r, -1, -2)

    return apply


def gram_maps(cfg: BlockConfig, key: jax.Array, m_tokens: int) -> BlockMaps:
    """The maps of one block on one sample's ``m_tokens`` tokens for the Gram sampler, their
    random numbers drawn from ``key`` by one :class:`LayerDraws`; sizes as listed in
    :class:`BlockMaps`.

    The scores come from :func:`gram_scores` (zero for ``query_init="zero"``, as the module's
    zero query kernel gives)."""
    att, m = cfg.attention, m_tokens
    n, qk, v, heads = cfg.width, att.num_heads * att.head_dim, att.num_heads * att.value_dim, att.num_heads

    def build(draws: LayerDraws) -> BlockMaps:
        maps = BlockMaps()
        if cfg.has_attention:
            if att.query_init == "zero":
                maps = maps._replace(scores=lambda x: jnp.zeros((heads, m, m), x.dtype))
            elif att.head_dim >= m:
                maps = maps._replace(scores=gram_scores(draws.wishart_factor((heads,), m, att.head_dim),
                                                        draws.normal((heads, m, m))))
            else:  # n_k < m: no Bartlett factor; draw X W_Q and X W_K themselves
                maps = maps._replace(query=gram_map(draws.normal((m, qk))),
                                     key=gram_map(draws.normal((m, qk))))
            maps = maps._replace(value=gram_map(draws.normal((m, v))),
                                 output=gram_map(draws.normal((m, n))) if att.out_proj else None)
        if cfg.has_mlp:
            maps = maps._replace(mlp_in=gram_map(draws.normal((m, cfg.mlp_hidden))),
                                 mlp_out=gram_map(draws.normal((m, n))))
        return maps

    return LayerDraws.build(build, key, jnp.dtype(cfg.param_dtype))

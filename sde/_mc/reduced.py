"""The reduced sampler: exact in law, for blocks without LayerNorm (docs/samplers.md §4).

Without LayerNorm every step of the block except the MLP's per-feature ReLU commutes with a
rotation of the residual features: the block with input X O and weights (O^T W_Q, O^T W_K,
O^T W_V, W_O O, O^T W_1, W_2 O) outputs X' O, and those weights have the law of the
originals. So the law of everything after X depends on X only through X X^T, and X may be
replaced by any matrix of the same Gram: ``reduced_tokens`` puts the tokens on the first m
features. A fresh map ``x -> x W`` into the residual stream, where only the first k features
are in use, has output ``R G`` (``R R^T = x x^T / n_in``, G iid m x n_out); its columns
``k..n_out`` only ever enter through ``G_rest G_rest^T ~ Wishart(n_out - k, I)`` (the same
rotation argument on the unused features), so they are replaced by the Bartlett factor of
that Wishart on m new features. The same holds per head in the value space of an output
projection. The hidden MLP features are drawn in full (m x hidden), so the ReLU is exact.

The residual stream (and the value space) is then stored on K = (features in use) columns
instead of n, scaled by sqrt(K / n) so that ``gram`` (which divides by the array width) gives
the true ``X X^T / n``. ``block_apply`` runs the true block's config on these arrays: it takes
the width-dependent scalars (temperature, shaped-ReLU slopes) from the config and the
per-head widths from the maps' outputs.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from shaped_attn.config import BlockConfig
from shaped_attn.functional import BlockMaps

from .._helpers.wishart import LayerDraws
from .gram_maps import gram_map


def reduced_root(x: jax.Array, used: int) -> jax.Array:
    """``R`` (m x p, ``p = min(m, used)``) with ``R R^T = gram(x)`` for ``x`` whose features
    beyond the first ``used`` are zero.

    ``used <= m``: those features over ``sqrt(width)``; else the triangular factor of a QR
    decomposition of them (exact for a singular Gram too, with no Cholesky fallback)."""
    m, width = x.shape[-2:]
    xu = x[..., :used]
    if used > m:
        xu = jnp.swapaxes(jnp.linalg.qr(jnp.swapaxes(xu, -1, -2), mode="r"), -1, -2)
    return xu / math.sqrt(width)


def _one_sample(x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"the reduced sampler's maps act on one sample (m x width), got shape "
                         f"{x.shape}; vmap over samples")


def coordinate_map(draws: LayerDraws, n_out: int, occupied: int, used_in: int, p: int, *,
                   width: int, scale: float = 1.0, heads: int = 1,
                   shared: bool = True) -> Callable[[jax.Array], jax.Array]:
    """A fresh ``x -> x W`` (``W ~ N(0, 1/n_in)``, ``heads`` blocks of ``n_out`` columns), in
    law for everything that depends on each block only through its first ``occupied``
    features and rotation-invariant functions of the others.

    ``x`` (m x width_in, one sample) is zero beyond its first ``used_in`` features, and
    ``gram(x) = x x^T / n_in``. With ``R = reduced_root(x, used_in)`` (m x p) block h is
    ``scale * R [G_h, T_h, 0]`` on ``width`` columns: ``G_h`` iid N(0, 1) (p x ``occupied``)
    on the features whose values matter and ``T_h`` on the next ones in place of the other
    ``n_out - occupied`` columns (:meth:`LayerDraws.wishart_factor`). ``shared=True``: the blocks lie in
    one space (the heads' values summed into the residual stream), so their free parts share
    directions and come from one factor of ``heads * p`` rows (block h: rows ``h p .. (h + 1)
    p``); ``shared=False``: separate spaces (the heads' value blocks before an output
    projection). ``occupied = n_out = width``: every feature drawn (the MLP's hidden units).
    """
    used = draws.normal((heads, p, occupied))
    free = draws.wishart_factor(() if shared else (heads,), heads * p if shared else p, n_out - occupied)

    def apply(x):
        _one_sample(x)
        r = reduced_root(x, used_in)
        g = jnp.concatenate([used, free.reshape(heads, p, free.shape[-1])], axis=-1).astype(x.dtype)
        y = r[None] @ g  # (heads, m, features in use)
        if scale != 1.0:
            y = scale * y
        y = jnp.pad(y, [(0, 0), (0, 0), (0, width - y.shape[-1])])
        return jnp.swapaxes(y, 0, 1).reshape(x.shape[-2], heads * width)

    return apply


def reduced_scores(draws: LayerDraws, heads: int, key_width: int, used_in: int,
                   m: int) -> Callable[[jax.Array], jax.Array]:
    """:func:`gram_scores` (``R B G3 R^T`` per head) with ``R = reduced_root(x, used_in)`` and
    the numbers from ``draws``."""
    b = draws.wishart_factor((heads,), m, key_width)
    g = draws.normal((heads, m, m))

    def apply(x):
        _one_sample(x)
        r = reduced_root(x, used_in)
        return (r[None] @ b @ g @ r.T[None]).astype(x.dtype)

    return apply


def reduced_occupancy(n_out: int, occupied: int, rows: int) -> int:
    """Features in use after adding a :func:`coordinate_map` output with ``rows`` free rows
    to a space of ``n_out`` features whose first ``occupied`` are in use."""
    return occupied + min(rows, max(n_out - occupied, 0))


def reduced_tokens(x: jax.Array, used: int, width: int) -> jax.Array:
    """``[sqrt(width) R, 0]`` (m x width), ``R = reduced_root(x, used)``: same ``gram``, the
    tokens on the first ``min(m, used)`` features."""
    root = math.sqrt(width) * reduced_root(x, used)
    return jnp.pad(root, [(0, 0)] * (x.ndim - 1) + [(0, width - root.shape[-1])])


def reduced_unsupported(cfg: BlockConfig) -> Optional[str]:
    """Why the reduced sampler cannot run ``cfg`` exactly, or ``None`` if it can."""
    if cfg.layer_norm:
        return (f"kind={cfg.kind!r} has LayerNorm, which is not invariant under rotations of the "
                "features (it singles out the all-ones direction)")
    return None


class ReducedLayout(NamedTuple):
    """Static layout of the reduced sampler for one block on m tokens.

    ``block_in``, ``value``, ``attention_out``, ``block_out``: features in use by the block
    input (after :func:`reduced_tokens`), by one head's values, after the attention sub-block
    and at the block output. ``width`` (K): stored features of the residual stream (and of the
    value space with an output projection), ``scale = sqrt(K / n)`` their scale.
    """

    block_in: int
    value: int
    attention_out: int
    block_out: int
    width: int
    scale: float


def reduced_layout(cfg: BlockConfig, m_tokens: int) -> ReducedLayout:
    """The :class:`ReducedLayout` of ``cfg`` on ``m_tokens`` tokens; a ValueError naming the
    reason for a block the reduced sampler cannot run."""
    reason = reduced_unsupported(cfg)
    if reason is not None:
        raise ValueError(f"sampler='reduced' does not support this block: {reason}; "
                         "use sampler='gram', 'weights' or 'auto'")
    att, n, heads = cfg.attention, cfg.width, cfg.attention.num_heads
    k_in = value = k = min(m_tokens, n)
    if cfg.has_attention and att.out_proj:
        value = min(k_in, att.value_dim)
        k = reduced_occupancy(n, k, min(m_tokens, value if heads == 1 else heads * value))
    elif cfg.has_attention:
        k = reduced_occupancy(n, k, heads * k_in)
    k_att = k
    if cfg.has_mlp:
        k = reduced_occupancy(n, k, min(m_tokens, cfg.mlp_hidden))
    width = k
    if att.out_proj:  # the value space is stored on K columns too: heads * value of them per head
        width = min(n, -(-max(k, heads * value) // heads) * heads)
    return ReducedLayout(k_in, value, k_att, k, width, math.sqrt(width / n))


def reduced_maps(cfg: BlockConfig, key: jax.Array, m_tokens: int) -> BlockMaps:
    """The maps of one block for the reduced sampler, on one sample's tokens from
    :func:`reduced_tokens` stored as in :func:`reduced_layout` (apply them with
    ``block_apply(cfg, ...)``).

    Same roles as :func:`gram_maps`: the scores are :func:`reduced_scores` (the query and key
    maps of :func:`gram_maps` when ``n_k < m``, zero scores for a zero query), all other maps
    are :func:`coordinate_map` s; their random numbers come from one :class:`LayerDraws`.
    """
    lay = reduced_layout(cfg, m_tokens)
    return LayerDraws.build(lambda draws: _reduced_maps(cfg, lay, m_tokens, draws), key,
                            jnp.dtype(cfg.param_dtype))


def _reduced_maps(cfg: BlockConfig, lay: ReducedLayout, m: int, draws: LayerDraws) -> BlockMaps:
    att, n, heads, hidden = cfg.attention, cfg.width, cfg.attention.num_heads, cfg.mlp_hidden
    maps = BlockMaps()
    if cfg.has_attention:
        if att.query_init == "zero":
            maps = maps._replace(scores=lambda x: jnp.zeros((heads, m, m), x.dtype))
        elif att.head_dim >= m:
            maps = maps._replace(scores=reduced_scores(draws, heads, att.head_dim, lay.block_in, m))
        else:  # n_k < m: X W_Q and X W_K themselves, as the Gram sampler
            maps = maps._replace(query=gram_map(draws.normal((m, heads * att.head_dim))),
                                 key=gram_map(draws.normal((m, heads * att.head_dim))))
        stream = dict(width=lay.width, scale=lay.scale)
        if att.out_proj:
            value = coordinate_map(draws, att.value_dim, 0, lay.block_in, lay.block_in,
                                   width=lay.width // heads, scale=lay.scale, heads=heads, shared=False)
            used = lay.value if heads == 1 else lay.width
            output = coordinate_map(draws, n, lay.block_in, used, min(m, used), **stream)
        else:
            value = coordinate_map(draws, n, lay.block_in, lay.block_in, lay.block_in, heads=heads, **stream)
            output = None
        maps = maps._replace(value=value, output=output)
    if cfg.has_mlp:
        p = min(m, lay.attention_out)
        maps = maps._replace(
            mlp_in=coordinate_map(draws, hidden, hidden, lay.attention_out, p, width=hidden),
            mlp_out=coordinate_map(draws, n, lay.attention_out, hidden, min(m, hidden),
                                   width=lay.width, scale=lay.scale),
        )
    return maps
